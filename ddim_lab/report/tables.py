"""Report tables with bootstrap intervals: markdown, CSV and LaTeX (booktabs), per group, costs and paired.

:func:`analyze` turns the merged rows into an :class:`Analysis` (grouping keys from the schema, intervals per
group, paired comparisons of the outcome metrics); :func:`write_tables` writes it as
``intervals.{csv,md,tex}`` (outcomes and the VAE reference), ``costs.{csv,md,tex}`` (what each arm spent) and
``paired.{csv,md,tex}``; :func:`intervals_markdown` is the section the report's markdown embeds.

Rows that score well by construction rather than by the method's quality (Direct inversion's reconstructions,
which return the input) are marked with :data:`MARK`, explained under the table and listed last.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ddim_lab.report.stats import (
    DEFAULT,
    Bootstrap,
    default_compare_key,
    derived_keys,
    group_intervals,
    paired_comparisons,
    paired_strata,
)
from ddim_lab.schema import (
    COST,
    PER_IMAGE,
    PROTOCOL,
    QUALIFIES,
    REFERENCE,
    grouping_frame,
    label,
    metric_columns,
    normalize,
    protocol_problem,
)

logger = logging.getLogger(__name__)

MISSING = "n/a"
RECONSTRUCTION = "(reconstruction)"
INTERVALS = "intervals"
COSTS = "costs"
DEFAULT_BASELINES = {"inverter": "ddim"}  # else the first value in sort order
PAIRED = "paired"
NFE = "nfe"  # the model evaluations a row actually spent: shown beside the means
BUDGET = "budget_nfe"  # the evaluation budget a row was run at (a config column)
CACHED = "inversion_cached"

MARK = "†"
# inverters whose reconstructions return the input by construction (ddim_lab/methods/inversion/direct.py: the source
# branch is pulled back onto the DDIM pivot at every step): their reconstruction scores measure the VAE
BY_CONSTRUCTION = ("direct",)
BY_CONSTRUCTION_NOTE = (
    f"{MARK} reconstructions by inverter={', '.join(BY_CONSTRUCTION)} return the input by construction (the "
    "source branch is pulled back onto the inversion trajectory at every step): their scores measure the VAE "
    "round-trip, not the inversion, so they are listed last and never ranked"
)


@dataclass
class Analysis:
    """Everything the tables, figures and page are drawn from (computed once, from the saved rows)."""

    rows: pd.DataFrame
    keys: list[str]
    attributes: list[str]
    metrics: list[str]  # outcomes: averaged and paired-tested
    settings: Bootstrap
    intervals: pd.DataFrame  # one row per group: keys, n, <col>_{mean,low,high,n}, cached_rows, by_construction
    references: list[str] = field(default_factory=list)  # the VAE ceiling: averaged, never paired
    costs: list[str] = field(default_factory=list)  # what each row spent: averaged, never paired
    strata: list[str] = field(default_factory=list)  # the keys the compared values are paired within
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
    """Group ``df`` by the varying config keys (never pooling configs or protocols), bootstrap every outcome,
    reference and cost column, and pair the outcomes of the values of ``compare`` (default:
    :func:`default_compare_key`) on the same images, each against ``baseline`` (default: ``ddim`` for
    inverters, else the first value)."""
    rows = normalize(df)
    df, keys, attributes, per_image = grouping_frame(rows)
    measured = metric_columns(df)
    metrics = [m for m in metrics if m in measured] if metrics is not None else measured
    references, costs = metric_columns(df, REFERENCE), metric_columns(df, COST)
    notes = []
    problem = protocol_problem(df)
    if problem:
        notes.append(problem)
    df, unrecorded = _unrecorded_cached_costs(df)
    if unrecorded:
        notes.append(
            f"{unrecorded} rows with a cached inversion record 0 inversion evaluations (written before cached "
            "inversions carried their formula cost): their inversion cost is shown as n/a"
        )
    if BUDGET in df.columns and BUDGET not in keys and df[BUDGET].notna().all() and len(df):
        notes.append(f"every row at {BUDGET}={fmt(df[BUDGET].iloc[0])} (model evaluations per image)")
    if attributes:
        notes.append(
            f"not grouped (one value per image, they vary only with the image): {', '.join(attributes)}"
        )
    if per_image:
        notes.append(
            f"one value per image besides missing ones, grouped as missing or {PER_IMAGE}: "
            + ", ".join(per_image)
        )
    intervals = _with_flags(df, keys, group_intervals(df, keys, [*metrics, *references, *costs], settings))
    if intervals["by_construction"].any():
        notes.append(BY_CONSTRUCTION_NOTE)
    strata = paired_strata(keys, "", derived_keys(df))
    analysis = Analysis(
        rows, keys, attributes, metrics, settings, intervals, references, costs, strata, notes=notes
    )
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
        analysis.strata = paired_strata(keys, compare, derived_keys(df))
        if baseline is None and compare in DEFAULT_BASELINES:
            present = set(df[compare].dropna().astype(str))
            baseline = DEFAULT_BASELINES[compare] if DEFAULT_BASELINES[compare] in present else None
        marked = by_construction(df)
        if marked.any():  # a score by construction is no evidence about the method: never tested
            notes.append(f"paired comparisons leave out the {int(marked.sum())} {MARK}-marked rows")
        kept = df[~marked.to_numpy()]
        analysis.paired = paired_comparisons(kept, compare, keys, metrics, settings, baseline=baseline)
    return analysis


def _unrecorded_cached_costs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``df`` with the inversion costs of cached rows that record 0 made missing, and how many there were.

    Tables written before cached inversions carried their formula cost record 0 for them; every inversion
    costs at least one evaluation, so a 0 there means "not recorded", never "free"."""
    cost = "inversion_unet_evals"
    if CACHED not in df.columns or cost not in df.columns:
        return df, 0
    zero = df[CACHED].astype("boolean").fillna(False) & pd.to_numeric(df[cost], errors="coerce").eq(0)
    zero = zero.fillna(False).astype(bool)
    if not zero.any():
        return df, 0
    df = df.copy()
    for c in (cost, "inversion_unet_backwards"):
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64").mask(zero)
    return df, int(zero.sum())


def by_construction(df: pd.DataFrame) -> pd.Series:
    """Per row: a reconstruction by an inverter of :data:`BY_CONSTRUCTION` (no edit prompt, or the image's
    own prompt), whose scores say nothing about the inversion."""
    if "inverter" not in df.columns:
        return pd.Series(False, index=df.index)
    inverter = df["inverter"].astype(object).isin(BY_CONSTRUCTION).to_numpy(dtype=bool)
    if "edit_prompt" not in df.columns:
        return pd.Series(inverter, index=df.index)
    target = df["edit_prompt"].map(lambda v: "" if v is None or pd.isna(v) else str(v)).to_numpy(dtype=object)
    recon = target == ""
    if "prompt" in df.columns:
        recon |= target == df["prompt"].map(lambda v: None if v is None or pd.isna(v) else str(v)).to_numpy(
            object
        )
    return pd.Series(inverter & recon, index=df.index)


def _with_flags(df: pd.DataFrame, keys: list[str], intervals: pd.DataFrame) -> pd.DataFrame:
    """``intervals`` with, per group, ``cached_rows`` (rows whose inversion came from the cache) and
    ``by_construction`` (every row is a :func:`by_construction` reconstruction); the marked groups last."""
    flags = pd.DataFrame(
        {
            "cached": df[CACHED].astype("boolean").fillna(False).astype(int) if CACHED in df.columns else 0,
            "mark": by_construction(df),
        },
        index=df.index,
    )
    if keys:
        grouped = flags.join(df[keys]).groupby(keys, dropna=False, sort=True)  # the order of group_intervals
        cached, mark = grouped["cached"].sum().to_numpy(), grouped["mark"].all().to_numpy()
    else:
        cached, mark = [int(flags["cached"].sum())], [bool(flags["mark"].all()) and len(flags) > 0]
    out = intervals.assign(cached_rows=cached, by_construction=mark)
    return out.sort_values("by_construction", kind="stable").reset_index(drop=True)


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


def short_value(key: str, value: object) -> str:
    """A config value for a legend or caption: knobs (a JSON object) as ``k=v, k=v`` (empty for none), other
    values as :func:`key_text` writes them."""
    text = key_text(key, value)
    if text.startswith("{"):
        try:
            knobs = json.loads(text)
        except ValueError:
            return text
        if isinstance(knobs, dict):
            return ", ".join(f"{k}={json.dumps(v)}" for k, v in knobs.items())
    return text


def config_label(keys: list[str], values: tuple) -> str:
    """``key=value, …`` for a legend, a caption or an arm: a qualifier (``inverter_knobs``) in parentheses
    after the key it qualifies when both are shown, and left out when it holds no knobs."""
    given = dict(zip(keys, values, strict=True))
    parts = []
    for k, v in given.items():
        if QUALIFIES.get(k) in given:
            continue  # written after the key it qualifies
        text = f"{k}={short_value(k, v) or 'none'}"
        knobs = [short_value(q, given[q]) for q, of in QUALIFIES.items() if of == k and q in given]
        parts.append(text + "".join(f" ({t})" for t in knobs if t and t != MISSING))
    return ", ".join(parts)


def interval_cell(mean: float, low: float, high: float) -> str:
    """``mean [low, high]``; just the mean when there is no interval (one value, or every value equal);
    ``n/a`` when unmeasured."""
    if mean is None or not math.isfinite(mean):
        return MISSING
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low == high:
        return fmt(float(mean))
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


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
    MARK: r"\dag{}",
}


def latex_escape(text: object) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex(table: pd.DataFrame, caption: str, label_: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): text columns left-aligned, the rest right."""
    if table.empty:
        return f"% {latex_escape(caption)}: no rows\n"
    numeric_like = [
        all(v == MISSING or v[:1].isdigit() or v[:1] in "-." + MARK for v in table[c].astype(str))
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
