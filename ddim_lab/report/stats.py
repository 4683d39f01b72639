"""Bootstrap confidence intervals per group and paired comparisons between the values of one config key.

Everything is deterministic given :class:`Bootstrap`'s seed: the resampled indices depend only on the seed and
the number of values resampled, so a group's interval never changes when other groups are added or the metrics
are reordered, and one resample-count matrix serves every group and metric of the same size (the intervals of
10,000 rows take well under a second).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from ddim_lab.report.replicates import SEED, image_means, matched_seeds, replicated, seed_spread
from ddim_lab.schema import IMAGE, METRIC, PROTOCOL, QUALIFIES, role_of

METHODS = ("percentile", "bca")


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed (recorded in every report)."""

    resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95
    method: str = "percentile"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"bootstrap method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {self.resamples}")

    def describe(self) -> str:
        return (
            f"{self.confidence:.0%} {self.method} bootstrap interval of the mean, "
            f"{self.resamples} resamples, seed {self.seed}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT = Bootstrap()


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


CACHE_CELLS = 4_000_000  # resample-count matrices up to this size (B × n) are kept for reuse
_CHUNK_CELLS = 2_000_000


def _count_chunks(rng: np.random.Generator, resamples: int, n: int):
    """(start, counts) chunks: row r of ``counts`` is how often each of ``n`` items is drawn in resample
    ``start + r`` (drawing with replacement)."""
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield start, np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype("float64")


def bootstrap_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of the rows of ``x`` ((n,) or (n, m) → (B,) or (B, m)).

    One set of resampled row indices serves every column: each resample's count per row, times ``x``."""
    x = np.asarray(x, dtype="float64")
    x2 = x[:, None] if x.ndim == 1 else x
    out = np.empty((resamples, x2.shape[1]))
    for start, counts in _count_chunks(rng, resamples, len(x2)):
        out[start : start + len(counts)] = counts @ x2 / len(x2)
    return out[:, 0] if x.ndim == 1 else out


@functools.lru_cache(maxsize=8)
def _cached_counts(seed: int, resamples: int, n: int) -> np.ndarray:
    counts = np.concatenate([c for _, c in _count_chunks(np.random.default_rng([seed, n]), resamples, n)])
    counts.setflags(write=False)
    return counts


def _boot(x: np.ndarray, settings: Bootstrap) -> np.ndarray:
    """Bootstrap means of the rows of ``x`` under ``settings``: the resamples depend only on the seed and the
    number of values, so they are reused across groups and metrics of the same size (fast, deterministic, and
    a group's interval never depends on the other groups)."""
    n = len(x)
    if settings.resamples * n <= CACHE_CELLS:
        return _cached_counts(settings.seed, settings.resamples, n) @ x / n
    return bootstrap_means(x, settings.resamples, np.random.default_rng([settings.seed, n]))


def _interval(x: np.ndarray, boot: np.ndarray | None, settings: Bootstrap) -> Interval:
    """The interval of the finite values ``x`` from their bootstrap means ``boot`` (None: nothing drawn)."""
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    if boot is None or np.all(x == x[0]):
        return Interval(mean, mean, mean, n)
    alpha = 1 - settings.confidence
    probs = np.array([alpha / 2, 1 - alpha / 2])
    if settings.method == "bca":
        probs = _bca_probs(x, boot, mean, probs)
    low, high = np.quantile(boot, probs)
    return Interval(mean, float(low), float(high), n)


def mean_interval(values, settings: Bootstrap = DEFAULT) -> Interval:
    """Mean of the finite ``values`` and its bootstrap interval; NaN bounds with fewer than two values."""
    x = np.asarray(values, dtype="float64")
    x = x[np.isfinite(x)]
    if len(x) < 2 or np.all(x == x[0]):
        return _interval(x, None, settings)
    return _interval(x, _boot(x, settings), settings)


def frame_intervals(values: pd.DataFrame, settings: Bootstrap = DEFAULT) -> dict[str, Interval]:
    """The interval of every column of ``values`` (rows = observations, NaN = missing).

    Columns without missing values are resampled together (one matrix product); the others on their own finite
    values."""
    arr = values.to_numpy("float64", na_value=np.nan)
    finite = np.isfinite(arr)
    complete = [j for j in range(arr.shape[1]) if finite[:, j].all()]
    varied = [j for j in complete if len(arr) >= 2 and np.any(arr[:, j] != arr[0, j])]
    out: dict[str, Interval] = {}
    if varied:
        boot = _boot(arr[:, varied], settings)
        for b, j in enumerate(varied):
            out[values.columns[j]] = _interval(arr[:, j], boot[:, b], settings)
    for j, name in enumerate(values.columns):
        if name not in out:
            out[name] = (
                _interval(arr[:, j], None, settings) if j in complete else mean_interval(arr[:, j], settings)
            )
    return out


def _bca_probs(x: np.ndarray, boot: np.ndarray, mean: float, probs: np.ndarray) -> np.ndarray:
    """BCa-adjusted quantile levels (Efron 1987): bias from the bootstrap, acceleration from the jackknife."""
    share = (np.sum(boot < mean) + 0.5 * np.sum(boot == mean)) / len(boot)
    share = min(max(share, 1 / (2 * len(boot))), 1 - 1 / (2 * len(boot)))
    z0 = sps.norm.ppf(share)
    n = len(x)
    jack = (x.sum() - x) / (n - 1)  # leave-one-out means, closed form
    d = jack.mean() - jack
    denom = 6 * np.sum(d**2) ** 1.5
    a = float(np.sum(d**3) / denom) if denom > 0 else 0.0
    z = sps.norm.ppf(probs)
    adjusted = sps.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
    return np.clip(adjusted, 0, 1)


def _key_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _groups(df: pd.DataFrame, keys: list[str]):
    """(key tuple, sub-frame) per combination of ``keys``, missing values kept (dropna=False), sorted."""
    if not keys:
        return [((), df)]
    return [(_key_tuple(k), g) for k, g in df.groupby(keys, dropna=False, sort=True)]


def group_intervals(
    df: pd.DataFrame, keys: list[str], metrics: list[str], settings: Bootstrap = DEFAULT
) -> pd.DataFrame:
    """One row per combination of ``keys``: the key values, ``n`` (rows), and per metric ``<m>_mean``,
    ``<m>_low``, ``<m>_high``, ``<m>_n`` (finite values)."""
    nested = replicated(df)  # seed replicates: images resampled with their seeds, ``<m>_n`` counts images
    values = df[metrics].apply(pd.to_numeric, errors="coerce").astype("float64")
    if keys or nested:
        values = values.join(df[[*keys, *([IMAGE, SEED] if nested else [])]])
    records = []
    for key, group in _groups(values, keys):
        record: dict = dict(zip(keys, key, strict=True))
        record["n"] = len(group)
        ivs = frame_intervals(image_means(group, metrics) if nested else group[metrics], settings)
        for m in metrics:
            iv = ivs[m]
            record.update({f"{m}_mean": iv.mean, f"{m}_low": iv.low, f"{m}_high": iv.high, f"{m}_n": iv.n})
        if nested:
            record.update({f"{m}_seed_sd": v for m, v in seed_spread(group, metrics).items()})
        records.append(record)
    parts = ("mean", "low", "high", "n", *(("seed_sd",) if nested else ()))
    columns = [*keys, "n", *(f"{m}_{s}" for m in metrics for s in parts)]
    return pd.DataFrame.from_records(records, columns=columns)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1.0 when every difference is 0, NaN
    without pairs.

    The exact null distribution when there are at most 50 differences, none zero and no ties; otherwise the
    normal approximation with tie correction (scipy's "auto" would run a slow permutation test there)."""
    d = np.asarray(diffs, dtype="float64")
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            exact = len(d) <= 50 and np.all(d != 0) and len(np.unique(np.abs(d))) == len(d)
            return float(sps.wilcoxon(d, method="exact" if exact else "approx").pvalue)
        except ValueError:
            return math.nan


def default_compare_key(keys: list[str]) -> str | None:
    """The key to pair on by default: ``inverter`` when it varies, else the first varying key that is not a
    step count (those are the figures' x axis), else None."""
    if "inverter" in keys:
        return "inverter"
    rest = [k for k in keys if k not in ("num_steps", "start_step", PROTOCOL)]
    return rest[0] if rest else None


def _cell(v) -> str:
    return "n/a" if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else str(v)


def _levels(df: pd.DataFrame, key: str, qualifiers: list[str]) -> pd.Series:
    """Each row's value of ``key`` as text, its qualifiers' values appended where one value of ``key`` comes
    with several of them (two ``fixed_point`` runs of different ``iters`` are two levels)."""
    level = df[key].map(_cell)
    for q in qualifiers:
        text = df[q].map(_cell)
        several = text.groupby(level).transform("nunique") > 1
        level = level.where(~several, level + " " + text)
    return level


# a key that each method derives from another column when that column is set: at a budget (``budget_nfe``)
# every method picks its own num_steps, so the arms of one budget are paired across their different N
DERIVED_FROM = {"num_steps": "budget_nfe"}


def derived_keys(df: pd.DataFrame) -> list[str]:
    """The columns of ``df`` that :data:`DERIVED_FROM` derives from a column set on every row."""
    return [
        k for k, src in DERIVED_FROM.items() if k in df.columns and src in df.columns and df[src].notna().all()
    ]


def paired_strata(
    keys: list[str], key: str, derived: list[str] = (), df: pd.DataFrame | None = None
) -> list[str]:
    """The keys within whose combinations the values of ``key`` are paired: all others but ``key``'s own
    qualifiers (``inverter_knobs`` differ between inverters by nature), the ``derived`` keys (each method's
    num_steps at a budget) and, given the rows ``df``, the keys that ``follows`` ``key``."""
    return [
        k
        for k in keys
        if k != key and QUALIFIES.get(k) != key and k not in derived and (df is None or not follows(df, key, k))
    ]


# keys that are part of an arm of the compared key when each of its values fixes them: an editor's own inverter
# (flowedit runs with inverter=none, prompt swap with rf_solver); elsewhere a differing setting stays a stratum
ARM_PARTS = {"editor": ("inverter", "inverter_knobs")}


def follows(df: pd.DataFrame, key: str, other: str) -> bool:
    """Whether ``other`` (one of ``key``'s :data:`ARM_PARTS`) has one value per value of ``key`` and several
    across them: a stratum on it would hold one level of ``key`` and pair nothing, so the arms are compared
    with it, as part of each level."""
    if other not in ARM_PARTS.get(key, ()) or key not in df.columns or other not in df.columns:
        return False
    values = df[other].astype(str)
    return values.nunique() > 1 and bool((values.groupby(df[key].astype(str)).nunique() == 1).all())


def paired_comparisons(
    df: pd.DataFrame,
    key: str,
    keys: list[str],
    metrics: list[str],
    settings: Bootstrap = DEFAULT,
    baseline=None,
    pair_on: str = IMAGE,
) -> pd.DataFrame:
    """Compare the values of config ``key`` on the same images, within each combination of the other ``keys``.

    For each stratum and each value ``b`` of ``key`` other than the baseline ``a`` (default: the first value in
    sort order), per metric: the images measured under both, the mean paired difference ``b − a`` with its
    bootstrap interval, and the Wilcoxon signed-rank p-value. Several rows of one image in one cell (e.g. a
    repeated run) are averaged first. Never pairs across protocols (``protocol`` is a stratum key).

    Only outcome metrics are tested: a cost (model evaluations, seconds) follows from the method and a
    reference (the VAE ceiling) from the image, so a p-value on either says nothing (ValueError).
    """
    not_outcomes = [m for m in metrics if role_of(m, df[m] if m in df.columns else None) != METRIC]
    if not_outcomes:
        raise ValueError(f"paired tests compare outcome metrics only, not costs or references: {not_outcomes}")
    qualifiers = [k for k in keys if QUALIFIES.get(k) == key]  # e.g. inverter_knobs when comparing inverters
    strata = paired_strata(keys, key, derived_keys(df), df)
    columns = [
        *strata,
        "key",
        "baseline",
        "other",
        "metric",
        "pairs",
        "baseline_mean",
        "other_mean",
        "diff_mean",
        "diff_low",
        "diff_high",
        "p_wilcoxon",
    ]
    if key not in df.columns or pair_on not in df.columns:
        return pd.DataFrame(columns=columns)
    if key == PROTOCOL:
        raise ValueError("rows of different protocols are not comparable: refusing to pair across protocols")
    levels = _levels(df, key, qualifiers)  # (rows,) each row's level of ``key``, as text
    try:
        rank = df[key].rank(method="dense", na_option="bottom")
    except TypeError:  # mixed types: sort as text
        rank = df[key].astype(str).rank(method="dense", na_option="bottom")
    ordered = list(dict.fromkeys(pd.DataFrame({"r": rank, "l": levels}).sort_values(["r", "l"])["l"]))
    base = _cell(baseline) if baseline is not None else (ordered[0] if ordered else None)
    if base not in ordered:
        raise ValueError(f"baseline {baseline!r} is not a value of {key!r} (values: {', '.join(ordered)})")
    work = df[metrics].apply(pd.to_numeric, errors="coerce").astype("float64")
    work["__level"] = levels.to_numpy()  # text: a missing value is a level too
    work["__unit"] = df[pair_on].astype(str).to_numpy()
    work["__seed"] = df[SEED].to_numpy() if SEED in df.columns else np.nan  # replicates pair on seed too
    if strata:
        work = work.join(df[strata])
    records = []
    for stratum, group in _groups(work, strata):
        for other in ordered:
            arms = group[group["__level"].isin([base, other])]
            arms = matched_seeds(arms, "__unit", "__level", "__seed", base, other)
            means = arms.groupby(["__unit", "__level"], sort=True)[metrics].mean()
            if other == base or means.empty:
                continue
            tables = {m: means[m].unstack("__level") for m in metrics}
            both = [m for m in metrics if {base, other} <= set(tables[m].columns)]
            if not both:
                continue
            diffs = pd.DataFrame({m: tables[m][other] - tables[m][base] for m in both})
            diffs = diffs[diffs.notna().any(axis=1)]
            if diffs.empty:
                continue
            ivs = frame_intervals(diffs, settings)
            for m in both:
                pair = tables[m][[base, other]].dropna()
                if pair.empty:
                    continue
                iv = ivs[m]
                records.append(
                    {
                        **dict(zip(strata, stratum, strict=True)),
                        "key": key,
                        "baseline": base,
                        "other": other,
                        "metric": m,
                        "pairs": iv.n,
                        "baseline_mean": float(pair[base].mean()),
                        "other_mean": float(pair[other].mean()),
                        "diff_mean": iv.mean,
                        "diff_low": iv.low,
                        "diff_high": iv.high,
                        "p_wilcoxon": wilcoxon_p(diffs[m].to_numpy()),
                    }
                )
    return pd.DataFrame.from_records(records, columns=columns)
