"""Report tables with bootstrap intervals: markdown, CSV and LaTeX (booktabs), per group and paired.

:func:`analyze` turns the merged rows into an :class:`Analysis` (grouping keys from the schema, intervals per
group, paired comparisons); :func:`write_tables` writes it as ``intervals.{csv,md,tex}`` and
``paired.{csv,md,tex}``; :func:`intervals_markdown` is the section the report's markdown embeds.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ddim_lab.schema import (
    PER_IMAGE,
    PROTOCOL,
    grouping_frame,
    label,
    metric_columns,
    normalize,
    protocol_problem,
)
from ddim_lab.stats import (
    DEFAULT,
    Bootstrap,
    default_compare_key,
    group_intervals,
    paired_comparisons,
    paired_strata,
)

logger = logging.getLogger(__name__)

MISSING = "n/a"
RECONSTRUCTION = "(reconstruction)"
INTERVALS = "intervals"
DEFAULT_BASELINES = {"inverter": "ddim"}  # else the first value in sort order
PAIRED = "paired"


@dataclass
class Analysis:
    """Everything the tables, figures and page are drawn from (computed once, from the saved rows)."""

    rows: pd.DataFrame
    keys: list[str]
    attributes: list[str]
    metrics: list[str]
    settings: Bootstrap
    intervals: pd.DataFrame
    compare: str | None = None
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


def analyze(
    df: pd.DataFrame,
    settings: Bootstrap = DEFAULT,
    compare: str | None = None,
    baseline=None,
    metrics: list[str] | None = None,
) -> Analysis:
    """Group ``df`` by the varying config keys (never pooling configs or protocols), bootstrap every metric,
    and pair the values of ``compare`` (default: :func:`default_compare_key`) on the same images, each against
    ``baseline`` (default: ``ddim`` for inverters, else the first value)."""
    rows = normalize(df)
    df, keys, attributes, per_image = grouping_frame(rows)
    measured = metric_columns(df)
    metrics = [m for m in metrics if m in measured] if metrics is not None else measured
    notes = []
    problem = protocol_problem(df)
    if problem:
        notes.append(problem)
    if attributes:
        notes.append(
            f"not grouped (one value per image, they vary only with the image): {', '.join(attributes)}"
        )
    if per_image:
        notes.append(
            f"one value per image besides missing ones, grouped as missing or {PER_IMAGE}: "
            + ", ".join(per_image)
        )
    intervals = group_intervals(df, keys, metrics, settings)
    analysis = Analysis(rows, keys, attributes, metrics, settings, intervals, notes=notes)
    if compare is None:
        compare = default_compare_key(keys)
    elif compare == PROTOCOL:
        notes.append("no paired comparison across protocols: their numbers are not comparable")
        compare = None
    elif compare not in keys:
        notes.append(
            f"no paired comparison: {compare!r} does not vary (varying keys: {', '.join(keys) or 'none'})"
        )
        compare = None
    if compare is not None:
        analysis.compare = compare
        if baseline is None and compare in DEFAULT_BASELINES:
            present = set(df[compare].dropna().astype(str))
            baseline = DEFAULT_BASELINES[compare] if DEFAULT_BASELINES[compare] in present else None
        analysis.paired = paired_comparisons(df, compare, keys, metrics, settings, baseline=baseline)
    return analysis


def fmt(value: object) -> str:
    """A cell as text: missing as ``n/a``, floats with 4 significant digits."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_text(key: str, value: object) -> str:
    """A config value as text; an empty (or, in older tables, missing) ``edit_prompt`` is a reconstruction."""
    missing = value is None or (pd.api.types.is_scalar(value) and pd.isna(value))
    if key == "edit_prompt" and (missing or value == ""):
        return RECONSTRUCTION
    return fmt(value)


def interval_cell(mean: float, low: float, high: float) -> str:
    """``mean [low, high]``; just the mean when there is no interval (one value); ``n/a`` when unmeasured."""
    if mean is None or not math.isfinite(mean):
        return MISSING
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return fmt(float(mean))
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def intervals_display(analysis: Analysis) -> pd.DataFrame:
    """String table: the key values, n, then ``mean [low, high]`` per metric (headers with units)."""
    table = analysis.intervals
    out = pd.DataFrame({k: [key_text(k, v) for v in table[k]] for k in analysis.keys})
    out["n"] = table["n"].map(str)
    for m in analysis.metrics:
        out[label(m)] = [
            interval_cell(a, b, c)
            for a, b, c in zip(table[f"{m}_mean"], table[f"{m}_low"], table[f"{m}_high"], strict=True)
        ]
    return out


def paired_display(analysis: Analysis) -> pd.DataFrame:
    """String table of the paired comparisons: strata, comparison, metric, pairs, Δ [interval], p."""
    p = analysis.paired
    if p.empty:
        return pd.DataFrame()
    strata = paired_strata(analysis.keys, analysis.compare)
    out = pd.DataFrame({k: [key_text(k, v) for v in p[k]] for k in strata})
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


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-markdown table of string cells."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    if table.empty and not len(table.columns):
        return "(none)"
    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "−": "$-$",
    "Δ": r"$\Delta$",
    "→": r"$\to$",
}


def latex_escape(text: object) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex(table: pd.DataFrame, caption: str, label_: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): text columns left-aligned, the rest right."""
    if table.empty:
        return f"% {latex_escape(caption)}: no rows\n"
    numeric_like = [
        all(v == MISSING or v[:1].isdigit() or v[:1] in "-." for v in table[c].astype(str))
        for c in table.columns
    ]
    spec = "".join("r" if num else "l" for num in numeric_like)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
        *(" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label_}}}",
        r"\end{table}",
        "",
    ]
    return "\n".join(lines)


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
    if analysis.compare is not None:
        lines += [
            f"## Paired comparisons of `{analysis.compare}` on the same images",
            "",
            "Δ = other − baseline per image, averaged; interval: the same bootstrap on the differences; "
            "p: two-sided Wilcoxon signed-rank test (1 when every difference is 0).",
            "",
            markdown(paired_display(analysis))
            if not analysis.paired.empty
            else "(no image measured under both)",
            "",
        ]
    return "\n".join(lines)


def write_tables(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Write ``intervals.{csv,md,tex,json}`` (and ``paired.*`` when a key is compared) into ``out_dir``.

    ``intervals.json`` records the bootstrap settings (resamples, seed, confidence, method) and the grouping.

    The CSVs hold numbers (mean, low, high, n per metric); markdown and LaTeX hold ``mean [low, high]``."""
    from ddim_lab.records import atomic_write

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
        "paired_key": analysis.compare,
        "notes": analysis.notes,
    }
    put(f"{INTERVALS}.json", json.dumps(settings, indent=2) + "\n")
    put(f"{INTERVALS}.csv", analysis.intervals)
    put(f"{INTERVALS}.md", f"{analysis.settings.describe()}\n\n{markdown(shown)}\n")
    put(f"{INTERVALS}.tex", latex(shown, caption, "tab:intervals"))
    if analysis.compare is not None:
        shown = paired_display(analysis)
        what = f"Paired differences of {analysis.compare} on the same images [{analysis.settings.describe()}]"
        put(f"{PAIRED}.csv", analysis.paired)
        put(f"{PAIRED}.md", f"{what}\n\n{markdown(shown) if not shown.empty else '(no pairs)'}\n")
        put(f"{PAIRED}.tex", latex(shown, what + "; p: Wilcoxon signed-rank.", "tab:paired"))
    return written
