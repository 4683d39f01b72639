"""The tables a study declares (``report.tables``), from the study's rows.

- ``groups``: a row per ``group_by`` combination with each column's mean, bootstrap interval, count or
  template (:func:`ddim_lab.report.stats.group_intervals`); with ``spread`` the columns repeat per value of
  that key (a pivot: ``PSNR ≤{budget_nfe}`` per budget).
- ``paired``: each value of ``compare`` against a baseline on the same images within ``group_by``
  (:func:`ddim_lab.report.stats.paired_comparisons`): a row per comparison (``long``), or the levels side by
  side with their differences (``wide``).

Each returns (shown, numbers): the markdown cells and the numbers behind them (the CSV). Where the rows hold
several protocols, ``protocol`` joins ``group_by``: no cell pools protocols and no pair crosses them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pandas as pd

from ddim_lab.config.report_spec import (
    MISSING_TEXT,
    STATS,
    ReportSpecError,
    fill_template,
    is_missing,
    template_fields,
)
from ddim_lab.report.protocols import mixes_protocols
from ddim_lab.report.stats import Bootstrap, group_intervals, paired_comparisons
from ddim_lab.report.text import fmt, interval_cell, key_text
from ddim_lab.schema import PROTOCOL

logger = logging.getLogger(__name__)

EMPTY_CELL = "–"  # a pivot cell without rows


def number(value, spec: str | None) -> str:
    """A number as text: ``spec`` (e.g. ``.2f``), else 4 significant digits; missing as n/a."""
    if is_missing(value):
        return MISSING_TEXT
    return format(value, spec) if spec else fmt(float(value))


def interval_text(mean, low, high, spec: str | None) -> str:
    """``mean [low, high]`` in ``spec`` (every bound written, equal or not); without ``spec`` as the report's
    tables write it (:func:`ddim_lab.report.text.interval_cell`)."""
    if spec is None:
        return interval_cell(mean, low, high)
    if is_missing(mean):
        return MISSING_TEXT
    if is_missing(low) or is_missing(high):
        return format(mean, spec)
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def measured(rows: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    """The ``metrics`` with at least one value in ``rows``."""
    return [m for m in metrics if pd.to_numeric(rows[m], errors="coerce").notna().any()]


def _one_value(values: pd.Series):
    """A column's value within a group: the value when there is one, else the values joined by ``/``."""
    found = list(dict.fromkeys(v for v in values.tolist() if not is_missing(v)))
    return found[0] if len(found) == 1 else "/".join(map(str, found)) if found else None


def _cell_text(cell: dict, record: dict, where: str) -> str:
    show, metric = cell.get("show", "interval"), cell.get("metric")
    if show == "n":
        return str(record["n"])
    if show == "template":
        return fill_template(cell["template"], record, where)
    if show == "mean":
        return number(record[f"{metric}_mean"], cell.get("format"))
    return interval_text(*(record[f"{metric}_{s}"] for s in ("mean", "low", "high")), cell.get("format"))


def groups_table(rows: pd.DataFrame, table: dict, settings: Bootstrap, where: str):
    """(shown, numbers) of a ``groups`` table: a row per ``group_by`` combination, or a pivot on ``spread``."""
    group_by, spread = list(table["group_by"]), table.get("spread")
    keys = [*group_by, *([spread] if spread else [])]
    metrics, extras = [], []
    for cell in table["columns"]:
        metrics += [cell["metric"]] if cell.get("metric") and cell.get("show") in ("mean", "interval") else []
        for name in template_fields(cell["template"], where) if cell.get("template") else []:
            base, _, stat = name.rpartition("_")
            if name not in rows.columns and stat in STATS and base:
                metrics.append(base)
            elif name != "n" and name not in keys:
                extras.append(name)
    stats = group_intervals(rows, keys, list(dict.fromkeys(metrics)), settings)
    groups = rows.groupby(keys, dropna=False, sort=True) if keys else [((), rows)]  # group_intervals' order
    for name in dict.fromkeys(extras):
        stats[name] = [_one_value(g[name]) for _, g in groups]
    records = stats.astype(object).where(stats.notna(), None).to_dict("records")
    headers = [c.get("header") or c.get("metric") or "n" for c in table["columns"]]
    if not spread:
        shown = pd.DataFrame({k: [key_text(k, r[k]) for r in records] for k in group_by})
        for j, (header, cell) in enumerate(zip(headers, table["columns"], strict=True)):
            shown[header] = [_cell_text(cell, r, f"{where}.columns[{j}]") for r in records]
        return shown, stats
    index = list(dict.fromkeys(tuple(key_text(k, r[k]) for k in group_by) for r in records))
    values = stats[spread].drop_duplicates().sort_values(na_position="last").astype(object).tolist()
    cells = {(tuple(key_text(k, r[k]) for k in group_by), key_text(spread, r[spread])): r for r in records}
    columns = {}
    for value in values:
        for j, (header, cell) in enumerate(zip(headers, table["columns"], strict=True)):
            at = f"{where}.columns[{j}]"
            name = fill_template(header, {spread: value}, f"{at}.header")
            if name in columns:
                raise ReportSpecError(
                    f"{at}.header={header!r} must tell the {spread} values apart ({{{spread}}})"
                )
            found = [cells.get((i, key_text(spread, value))) for i in index]
            columns[name] = [EMPTY_CELL if r is None else _cell_text(cell, r, at) for r in found]
    shown = pd.DataFrame(index, columns=group_by)
    return shown.assign(**columns), stats


def _level(value) -> str:
    """A compared value as the paired comparisons name it."""
    return MISSING_TEXT if is_missing(value) else str(value)


def paired_long(rows: pd.DataFrame, table: dict, settings: Bootstrap):
    """(shown, numbers) of a ``paired`` table, one row per comparison, metric and stratum."""
    compare, within, per = table["compare"], list(table["group_by"]), table.get("per")
    keys, metrics = [*within, compare], measured(rows, table["metrics"])
    if per:
        parts = []
        for value, base in table["baselines"].items():
            part = rows[rows[per].astype(str) == str(value)]
            if part.empty or base not in set(part[compare].astype(str)):
                logger.info("no paired rows for %s=%s (baseline %s)", per, value, base)
                continue
            pairs = paired_comparisons(part, compare, keys, metrics, settings, baseline=base)
            parts.append(pairs.assign(**{per: value}))
    else:
        parts = [paired_comparisons(rows, compare, keys, metrics, settings, baseline=table.get("baseline"))]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(), pd.DataFrame()
    strata = [k for k in within if k in parts[0].columns]
    order = ["metric", *strata, *([per] if per else []), "other"]
    pairs = pd.concat(parts, ignore_index=True).sort_values(order, kind="stable").reset_index(drop=True)
    diffs = zip(pairs["diff_mean"], pairs["diff_low"], pairs["diff_high"], strict=True)
    shown = pd.DataFrame({"metric": pairs["metric"]})
    for k in [*strata, *([per] if per else [])]:
        shown[k] = [key_text(k, v) for v in pairs[k]]
    shown["arm − baseline"] = [f"{o} − {b}" for o, b in zip(pairs["other"], pairs["baseline"], strict=True)]
    shown[f"difference [{settings.confidence:.0%} CI]"] = [
        interval_text(*d, table.get("format")) for d in diffs
    ]
    shown["p (Wilcoxon)"] = [number(p, table["p_format"]) for p in pairs["p_wilcoxon"]]
    shown["pairs"] = pairs["pairs"].map(str)
    return shown, pairs


def paired_wide(rows: pd.DataFrame, table: dict, settings: Bootstrap):
    """(shown, numbers) of a ``paired`` table with the levels side by side: per stratum and metric, each
    level's mean [interval], each other level's paired difference from the baseline and its p-value."""
    compare, within, spec = table["compare"], list(table["group_by"]), table.get("format")
    keys, metrics = [*within, compare], measured(rows, table["metrics"])
    levels = group_intervals(rows, keys, metrics, settings)
    levels["level"] = levels[compare].map(_level)
    pairs = paired_comparisons(rows, compare, keys, metrics, settings, baseline=table.get("baseline"))
    names = list(dict.fromkeys(levels["level"]))
    base = pairs["baseline"].iloc[0] if len(pairs) else _level(table.get("baseline") or names[0])
    others = [n for n in names if n != base]
    on = [*within, "__all"]  # a constant column: merging works without strata too
    numbers = levels[on[:-1]].assign(__all=0).drop_duplicates().reset_index(drop=True)
    for name in [base, *others]:
        renamed = {"n": f"n_{name}"} | {
            f"{m}_{s}": f"{m}_{name}_{s}" for m in metrics for s in ("mean", "low", "high")
        }
        part = levels[levels["level"] == name][[*within, *renamed]].rename(columns=renamed)
        numbers = numbers.merge(part.assign(__all=0), on=on, how="left")
    for name in others:
        for m in metrics:
            renamed = {f"diff_{s}": f"{m}_{name}_diff_{s}" for s in ("mean", "low", "high")}
            renamed |= {"p_wilcoxon": f"{m}_{name}_p", "pairs": f"{m}_{name}_pairs"}
            one = pairs[(pairs["metric"] == m) & (pairs["other"] == name)][[*within, *renamed]]
            numbers = numbers.merge(one.rename(columns=renamed).assign(__all=0), on=on, how="left")
    numbers = numbers.drop(columns="__all")
    shown = pd.DataFrame({k: [key_text(k, v) for v in numbers[k]] for k in within})
    for m in metrics:
        for name in [base, *others]:
            cells = numbers[[f"{m}_{name}_{s}" for s in ("mean", "low", "high")]].itertuples(index=False)
            shown[f"{m}: {name}"] = [interval_text(*c, spec) for c in cells]
        for name in others:
            cells = numbers[[f"{m}_{name}_diff_{s}" for s in ("mean", "low", "high")]].itertuples(index=False)
            shown[f"{m}: {name} − {base}"] = [interval_text(*c, spec) for c in cells]
            p_header = f"{m}: p" if len(others) == 1 else f"{m}: p ({name})"
            shown[p_header] = [number(p, table["p_format"]) for p in numbers[f"{m}_{name}_p"]]
    return shown, numbers


def with_protocol(rows: pd.DataFrame, table: dict) -> dict:
    """``table`` grouped by ``protocol`` too where the rows hold several (say, an editor given the benchmark's
    masks as input): rows of different protocols are never pooled, nor paired across."""
    if not mixes_protocols(rows) or PROTOCOL in table["group_by"] or table.get("compare") == PROTOCOL:
        return table
    return {**table, "group_by": [*table["group_by"], PROTOCOL]}


def study_table(rows: pd.DataFrame, table: dict, settings: Bootstrap, where: str):
    """(shown, numbers) of one declared table, never pooling protocols (:func:`with_protocol`)."""
    table = with_protocol(rows, table)
    if table.get("kind", "groups") == "groups":
        return groups_table(rows, table, settings, where)
    if table.get("layout", "long") == "wide":
        return paired_wide(rows, table, settings)
    return paired_long(rows, table, settings)
