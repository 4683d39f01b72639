"""The report's tables with bootstrap intervals (per group, costs, paired): markdown, CSV and LaTeX (booktabs).

:func:`write_tables` writes an :class:`~ddim_lab.report.analysis.Analysis` as ``intervals.{csv,md,tex}``
(outcomes and the VAE reference), ``costs.{csv,md,tex}`` (what each arm spent) and ``paired.{csv,md,tex}``;
:func:`intervals_markdown` is the section the report's markdown embeds.

Rows that score well by construction rather than by the method's quality (Direct inversion's reconstructions,
which return the input) are marked with :data:`~ddim_lab.report.text.MARK`, explained under the table and
listed last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ddim_lab.report.analysis import BY_CONSTRUCTION_NOTE, Analysis
from ddim_lab.report.text import MARK, MISSING, fmt, interval_cell, key_text, latex, markdown
from ddim_lab.schema import label

INTERVALS = "intervals"
COSTS = "costs"
PAIRED = "paired"
NFE = "nfe"  # the model evaluations a row actually spent: shown beside the means


def _key_columns(analysis: Analysis) -> pd.DataFrame:
    """``#`` (the group's row number, which figures refer to as ``#i``) and the key values, as text."""
    table = analysis.intervals
    out = pd.DataFrame({"#": [str(i + 1) for i in range(len(table))]})
    for k in analysis.keys:
        out[k] = [key_text(k, v) for v in table[k]]
    return out


def _cells(analysis: Analysis, column: str, marked: bool = False) -> list[str]:
    """``mean [low, high]`` of ``column`` per group; ``marked``: prefixed with :data:`MARK` in marked groups."""
    t = analysis.intervals
    cells = [
        interval_cell(a, b, c)
        for a, b, c in zip(t[f"{column}_mean"], t[f"{column}_low"], t[f"{column}_high"], strict=True)
    ]
    if f"{column}_seed_sd" in t.columns:  # seed replicates: the spread across seeds beside the image interval
        spread = t[f"{column}_seed_sd"]
        cells = [
            c if pd.isna(sd) or sd == 0 else f"{c} ±{fmt(float(sd))} seeds"  # no spread shown where none
            for c, sd in zip(cells, spread, strict=True)
        ]
    if marked:
        cells = [
            f"{MARK} {c}" if m and c != MISSING else c for c, m in zip(cells, t["by_construction"], strict=True)
        ]
    return cells


def intervals_display(analysis: Analysis) -> pd.DataFrame:
    """String table: ``#``, the key values, n, the model evaluations actually spent (``nfe``, mean per
    group, when rows carry it), then ``mean [low, high]`` per outcome and reference (headers with units);
    outcomes of groups scored by construction are marked."""
    table = analysis.intervals
    out = _key_columns(analysis)
    out["n"] = table["n"].map(str)
    if NFE in analysis.costs:
        out[label(NFE)] = [fmt(float(v)) for v in table[f"{NFE}_mean"]]
    for m in analysis.metrics:
        out[label(m)] = _cells(analysis, m, marked=True)
    for m in analysis.references:
        out[label(m)] = _cells(analysis, m)
    return out


def costs_display(analysis: Analysis) -> pd.DataFrame:
    """String table of what each group spent: the key values, n, the mean (and interval when it varies) of each
    cost column, and how many rows' inversions came from the cache (their cost is the formula's all the
    same)."""
    table = analysis.intervals
    if not analysis.costs:
        return pd.DataFrame()
    out = _key_columns(analysis)
    out["n"] = table["n"].map(str)
    for c in analysis.costs:
        out[label(c)] = _cells(analysis, c)
    if table["cached_rows"].any():
        out["inversion cached"] = [f"{c} of {n}" for c, n in zip(table["cached_rows"], table["n"], strict=True)]
    return out


def costs_frame(analysis: Analysis) -> pd.DataFrame:
    """The numbers behind :func:`costs_display`: keys, n, per cost ``<c>_{mean,low,high,n}``, cached rows."""
    cols = [f"{c}_{s}" for c in analysis.costs for s in ("mean", "low", "high", "n")]
    return analysis.intervals[[*analysis.keys, "n", *cols, "cached_rows"]]


def paired_display(analysis: Analysis) -> pd.DataFrame:
    """String table of the paired comparisons: strata, comparison, metric, pairs, Δ [interval], p."""
    p = analysis.paired
    if p.empty:
        return pd.DataFrame()
    out = pd.DataFrame({k: [key_text(k, v) for v in p[k]] for k in analysis.strata})
    out[f"{analysis.compare}: other − baseline"] = [
        f"{o} − {b}" for o, b in zip(p["other"], p["baseline"], strict=True)
    ]
    out["metric"] = p["metric"].map(label)
    out["pairs"] = p["pairs"].map(str)
    out["baseline mean"] = p["baseline_mean"].map(fmt)
    out["other mean"] = p["other_mean"].map(fmt)
    out["Δ mean [CI]"] = [
        interval_cell(a, b, c) for a, b, c in zip(p["diff_mean"], p["diff_low"], p["diff_high"], strict=True)
    ]
    out["p (Wilcoxon)"] = p["p_wilcoxon"].map(lambda v: MISSING if pd.isna(v) else f"{v:.3g}")
    return out


def intervals_markdown(analysis: Analysis) -> str:
    """The markdown section of intervals and paired comparisons (with the bootstrap settings)."""
    lines = [
        "## Means with bootstrap intervals",
        "",
        f"{analysis.settings.describe()}; grouped by: {', '.join(analysis.keys) or 'nothing (one group)'}.",
        "",
        *[f"- {note}" for note in analysis.notes],
        *([""] if analysis.notes else []),
        markdown(intervals_display(analysis)),
        "",
    ]
    costs = costs_display(analysis)
    if not costs.empty:
        lines += ["## What each arm spent", "", COSTS_CAPTION, "", markdown(costs), ""]
    if analysis.compare is not None:
        lines += [
            f"## Paired comparisons of `{analysis.compare}` on the same images",
            "",
            "Δ = other − baseline per image, averaged; interval: the same bootstrap on the differences; "
            "p: two-sided Wilcoxon signed-rank test (1 when every difference is 0). Outcome metrics only: "
            "costs are in the table above, the VAE ceiling is the image's, not the method's.",
            "",
            markdown(paired_display(analysis))
            if not analysis.paired.empty
            else "(no image measured under both)",
            "",
        ]
    return "\n".join(lines)


COSTS_CAPTION = (
    "Mean per row [interval when it varies]: sampling evaluations of the row's trajectory; inversion "
    "evaluations of the row's artifact by its method's formula (shared by the rows of one image, and the "
    "same whether this run computed it or read it from the cache: `inversion cached` counts those rows); "
    "seconds: the image group's wall time per row."
)


def write_tables(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Write ``intervals.{csv,md,tex,json}``, ``costs.{csv,md,tex}`` (when rows carry costs) and ``paired.*``
    (when a key is compared) into ``out_dir``.

    ``intervals.json`` records the bootstrap settings (resamples, seed, confidence, method) and the grouping.

    The CSVs hold numbers (mean, low, high, n per metric); markdown and LaTeX hold ``mean [low, high]``."""
    from ddim_lab.study.records import atomic_write

    out_dir = Path(out_dir)
    written = []
    caption = f"Mean [{analysis.settings.describe()}] per configuration."

    def put(name: str, text_or_frame) -> None:
        path = out_dir / name
        if isinstance(text_or_frame, pd.DataFrame):
            atomic_write(path, lambda tmp: text_or_frame.to_csv(tmp, index=False))
        else:
            atomic_write(path, lambda tmp: tmp.write_text(text_or_frame, encoding="utf-8"))
        written.append(path)

    shown = intervals_display(analysis)
    settings = {
        "bootstrap": analysis.settings.as_dict(),
        "grouped_by": analysis.keys,
        "image_attributes": analysis.attributes,
        "metrics": analysis.metrics,
        "references": analysis.references,
        "costs": analysis.costs,
        "paired_key": analysis.compare,
        "paired_within": analysis.strata if analysis.compare is not None else None,
        "notes": analysis.notes,
    }
    marked = [BY_CONSTRUCTION_NOTE] if analysis.intervals["by_construction"].any() else []
    put(f"{INTERVALS}.json", json.dumps(settings, indent=2) + "\n")
    put(f"{INTERVALS}.csv", analysis.intervals)
    put(f"{INTERVALS}.md", "\n\n".join([analysis.settings.describe(), markdown(shown), *marked]) + "\n")
    put(f"{INTERVALS}.tex", latex(shown, " ".join([caption, *marked]), "tab:intervals"))
    costs = costs_display(analysis)
    if not costs.empty:
        put(f"{COSTS}.csv", costs_frame(analysis))
        put(f"{COSTS}.md", f"{COSTS_CAPTION}\n\n{markdown(costs)}\n")
        put(f"{COSTS}.tex", latex(costs, "What each configuration spent. " + COSTS_CAPTION, "tab:costs"))
    if analysis.compare is not None:
        shown = paired_display(analysis)
        what = f"Paired differences of {analysis.compare} on the same images [{analysis.settings.describe()}]"
        put(f"{PAIRED}.csv", analysis.paired)
        put(f"{PAIRED}.md", f"{what}\n\n{markdown(shown) if not shown.empty else '(no pairs)'}\n")
        put(f"{PAIRED}.tex", latex(shown, what + "; p: Wilcoxon signed-rank.", "tab:paired"))
    return written
