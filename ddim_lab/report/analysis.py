"""The report's analysis of the saved rows: groups, bootstrap intervals and paired comparisons, computed once.

:func:`analyze` turns the merged rows into an :class:`Analysis` (grouping keys from the schema, intervals per
group, paired comparisons of the outcome metrics); the tables (:mod:`ddim_lab.report.tables`), the figures and
the page are drawn from it.

Rows that score well by construction rather than by the method's quality (Direct inversion's reconstructions,
which return the input) are flagged per group (:func:`by_construction`), listed last and never paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ddim_lab.report.protocols import protocol_problem
from ddim_lab.report.replicates import without_seed
from ddim_lab.report.stats import (
    DEFAULT,
    Bootstrap,
    default_compare_key,
    derived_keys,
    group_intervals,
    paired_comparisons,
    paired_strata,
)
from ddim_lab.report.text import MARK, fmt
from ddim_lab.schema import (
    COST,
    PER_IMAGE,
    PROTOCOL,
    REFERENCE,
    grouping_frame,
    metric_columns,
    normalize,
)

DEFAULT_BASELINES = {"inverter": "ddim"}  # else the first value in sort order
BUDGET = "budget_nfe"  # the evaluation budget a row was run at (a config column)
CACHED = "inversion_cached"

# inverters whose reconstructions return the input by construction (ddim_lab/methods/inversion/direct.py:
# the source branch is pulled back onto the DDIM pivot at every step): their reconstruction scores measure
# the VAE
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
    keys = without_seed(keys, df)  # seed replicates are pooled in their image
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
        analysis.strata = paired_strata(keys, compare, derived_keys(df), df)
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
    costs at least one evaluation, so a 0 there means "not recorded", never "free" — except ``inverter=none``
    (the clean latent: no inversion), whose 0 is its cost."""
    cost = "inversion_unet_evals"
    if CACHED not in df.columns or cost not in df.columns:
        return df, 0
    zero = df[CACHED].astype("boolean").fillna(False) & pd.to_numeric(df[cost], errors="coerce").eq(0)
    if "inverter" in df.columns:
        zero &= df["inverter"].astype(str).ne("none")
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
