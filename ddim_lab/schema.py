"""One definition of the result-row schema: every column with its role and dtype.

``records`` takes ``COLUMNS`` and the FLOAT/INT/BOOL column lists from here, and the report its grouping
keys: all are derived from :data:`SCHEMA`, so a new column is declared once.
Tasks build their rows with :func:`row` (every core column, undeclared ones refused) and take the run-wide
config columns from the run's config with :func:`config_values`.

Roles:

- ``config``: a setting of the run. Rows whose config keys differ are never averaged together.
- ``metric``: an outcome (quality of the result); averaged within a group and paired-tested across arms.
- ``reference``: a measurement the method does not control (the VAE ceiling); averaged, never paired-tested.
- ``cost``: what a row spent (model evaluations, time, memory); averaged within a group and reported in its
  own table, never paired-tested (a cost follows from the method's formula, it is not an outcome).
- ``bookkeeping``: identifies or describes a row (image id, cache flag, per-trajectory seed, run directory);
  neither a grouping key nor averaged.

A config column whose value is fixed by the image (every image has one value, e.g. per-image captions or
PIE-Bench's per-image editing prompt) is an *image attribute*: it varies only because the images do, so it does
not split groups (:func:`grouping_keys`). When the same image appears with two values, it is a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

CONFIG = "config"
METRIC = "metric"
REFERENCE = "reference"
COST = "cost"
BOOKKEEPING = "bookkeeping"
ROLES = (CONFIG, METRIC, REFERENCE, COST, BOOKKEEPING)
AVERAGED = (METRIC, REFERENCE, COST)  # the roles whose columns are averaged within a group

STR, FLOAT, INT, BOOL = "object", "float64", "Int64", "boolean"

PROTOCOL = "protocol"
IMAGE = "image"


@dataclass(frozen=True)
class Column:
    """One result column: its name, role, pandas dtype, unit (for tables and figures) and meaning.

    ``core``: written by every reconstruct/edit row today (``records.COLUMNS``); optional columns (the PIE-Bench
    protocol, edit success, ControlNet settings, the report's ``run_dir``) have a role and dtype but only exist
    when a task or a data set's scorer (``ddim_lab/data/scoring.py``, which names its columns here) writes them.
    """

    name: str
    role: str
    dtype: str
    doc: str = ""
    unit: str = ""
    core: bool = True
    lower_is_better: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"column {self.name!r}: unknown role {self.role!r}")
        if self.dtype not in (STR, FLOAT, INT, BOOL):
            raise ValueError(f"column {self.name!r}: unknown dtype {self.dtype!r}")


SCHEMA: tuple[Column, ...] = (
    Column(IMAGE, BOOKKEEPING, STR, "image path relative to data.path (the unit that paired tests pair on)"),
    Column("prompt", CONFIG, STR, "source prompt"),
    Column("edit_prompt", CONFIG, STR, "target prompt; empty/null = reconstruction"),
    Column("negative_prompt", CONFIG, STR, "negative prompt"),
    Column("task", CONFIG, STR),
    Column("model", CONFIG, STR),
    Column("scheduler", CONFIG, STR),
    Column("inverter", CONFIG, STR),
    Column("inverter_knobs", CONFIG, STR, "every knob of the inverter, sampling knobs included (JSON)"),
    Column("scheduler_overrides", CONFIG, STR, "scheduler.overrides (JSON)"),
    Column("num_steps", CONFIG, INT, "steps N of the schedule", "steps"),
    Column("budget_nfe", CONFIG, INT, "budget.nfe: the row cost N was chosen to stay within", "model evals"),
    Column("inversion_guidance_scale", CONFIG, FLOAT),
    Column("guidance_scale", CONFIG, FLOAT),
    Column("start_step", CONFIG, INT, "sampling start step k", "steps"),
    Column("eta", CONFIG, FLOAT),
    Column("seed", CONFIG, INT, "the run's seed; under seed=[0,1,2] the row's replicate (pooled per image)"),
    Column("dtype", CONFIG, STR),
    Column("psnr", METRIC, FLOAT, "result vs input", "dB"),
    Column("ssim", METRIC, FLOAT, "result vs input", "[0, 1]"),
    Column("lpips", METRIC, FLOAT, "result vs input", "LPIPS distance", lower_is_better=True),
    Column("lpips_net", CONFIG, STR, "LPIPS backbone: numbers from different backbones are not comparable"),
    Column("latent_mse", METRIC, FLOAT, "result latent vs encoded input", "MSE", lower_is_better=True),
    Column("vae_psnr", REFERENCE, FLOAT, "VAE ceiling (encode→decode)", "dB"),
    Column(
        "vae_lpips", REFERENCE, FLOAT, "VAE ceiling (encode→decode)", "LPIPS distance", lower_is_better=True
    ),
    Column("unet_evals", COST, INT, "sampling model evaluations", "model evals", lower_is_better=True),
    Column(
        "inversion_unet_evals",
        COST,
        INT,
        "model forwards the row's inversion artifact costs (by its formula, cached or not)",
        "model evals",
        lower_is_better=True,
    ),
    Column(
        "inversion_unet_backwards", COST, INT, "inversion backwards (formula)", "passes", lower_is_better=True
    ),
    Column(
        "nfe",
        COST,
        INT,
        "model forwards this row costs by its method's formulas: its inversion (pivot included) + trajectory",
        "model evals",
        lower_is_better=True,
    ),
    Column("inversion_cached", BOOKKEEPING, BOOL, "inversion came from the cache"),
    Column("sample_seed", BOOKKEEPING, INT, "per-trajectory seed when eta > 0 (derived from seed)"),
    Column("seconds", COST, FLOAT, "wall time per row", "s", lower_is_better=True),
    Column("peak_memory_mb", COST, FLOAT, "peak memory so far", "MB", lower_is_better=True),
    # optional columns: written by some tasks only
    Column(
        PROTOCOL, CONFIG, STR, "benchmark protocol id: rows of different protocols are never pooled", core=False
    ),
    Column("edit_success", METRIC, FLOAT, "edit judged successful (0/1 or a rate)", "rate", core=False),
    # generation rows (task=sample, task=controlnet): scores of the generated image itself
    Column(
        "judge_agreement",
        METRIC,
        FLOAT,
        "the digit judge reads the digit the prompt names (0/1; digits models)",
        "rate",
        core=False,
    ),
    Column(
        "control_ssim",
        METRIC,
        FLOAT,
        "control adherence: SSIM of the control image to the same signal of the result (edge-SSIM for canny)",
        "[0, 1]",
        core=False,
    ),
    # editing metrics on annotated (PIE-Bench-format) data, ddim_lab/metrics/edit.py (scorer pie_masked)
    Column("psnr_unedited", METRIC, FLOAT, "PSNR on the unedited region (mask inverted)", "dB", core=False),
    Column("ssim_unedited", METRIC, FLOAT, "SSIM on the unedited region", "[0, 1]", core=False),
    Column(
        "lpips_unedited",
        METRIC,
        FLOAT,
        "LPIPS on the unedited region",
        "LPIPS distance",
        core=False,
        lower_is_better=True,
    ),
    Column(
        "mse_unedited", METRIC, FLOAT, "MSE on the unedited region", "MSE", core=False, lower_is_better=True
    ),
    Column(
        "clip_whole",
        METRIC,
        FLOAT,
        "CLIP similarity to the target prompt, whole image",
        "CLIP score",
        core=False,
    ),
    Column(
        "clip_edited",
        METRIC,
        FLOAT,
        "CLIP similarity to the target prompt, edited region",
        "CLIP score",
        core=False,
    ),
    Column(
        "structure_distance",
        METRIC,
        FLOAT,
        "DINO self-similarity distance to the input",
        "distance",
        core=False,
        lower_is_better=True,
    ),
    # the editor of edit rows (ddim_lab/editing): rows of different editors or knobs are never pooled
    Column("editor", CONFIG, STR, "how edits are sampled: prompt_swap or p2p (prompt-to-prompt)", core=False),
    Column("editor_knobs", CONFIG, STR, "the editor's knobs (JSON)", core=False),
    Column("control", CONFIG, STR, "control signal", core=False),
    Column("control_knobs", CONFIG, STR, core=False),
    Column("controlnet", CONFIG, STR, core=False),
    Column("controlnet_scale", CONFIG, FLOAT, core=False),
    Column("control_guidance_start", CONFIG, FLOAT, core=False),
    Column("control_guidance_end", CONFIG, FLOAT, core=False),
    Column("output", BOOKKEEPING, STR, "the row's result image file (task=controlnet)", core=False),
    Column(
        "run_dir",
        BOOKKEEPING,
        STR,
        "run directory relative to the report root (added by the report)",
        core=False,
    ),
)

BY_NAME: dict[str, Column] = {c.name: c for c in SCHEMA}

# columns that only qualify another (a method's knobs): comparing the values of the qualified column pairs
# across them, and a value whose qualifier varies is told apart by it (``fixed_point {"iters": 2}``)
QUALIFIES: dict[str, str] = {"inverter_knobs": "inverter", "editor_knobs": "editor", "control_knobs": "control"}
assert all(c in BY_NAME and q in BY_NAME for c, q in QUALIFIES.items()), "QUALIFIES names unknown columns"

# what records.py writes: the core columns in this order, with these dtypes
COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.core)
FLOAT_COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.core and c.dtype == FLOAT)
INT_COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.core and c.dtype == INT)
BOOL_COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.core and c.dtype == BOOL)
CONFIG_KEYS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.role == CONFIG)
METRICS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.role == METRIC)  # outcomes only


def role_of(name: str, series: pd.Series | None = None) -> str:
    """The role of a column; a column not in the schema is a metric when it is float, else a config key
    (conservative: an unknown setting splits groups rather than being averaged over)."""
    if name in BY_NAME:
        return BY_NAME[name].role
    if series is not None and pd.api.types.is_float_dtype(series.dtype):
        return METRIC
    return CONFIG


def unknown_columns(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that the schema does not declare."""
    return [c for c in df.columns if c not in BY_NAME]


def config_columns(df: pd.DataFrame) -> list[str]:
    """Config keys present in ``df``: the schema's in schema order, then undeclared non-float columns."""
    known = [c for c in CONFIG_KEYS if c in df.columns]
    return known + [c for c in unknown_columns(df) if role_of(c, df[c]) == CONFIG]


def metric_columns(df: pd.DataFrame, role: str = METRIC) -> list[str]:
    """Columns of ``role`` (an averaged role: outcome metrics by default, or references, or costs) present in
    ``df`` with at least one value, in schema order; undeclared float columns count as metrics."""
    if role not in AVERAGED:
        raise ValueError(f"role {role!r} is not averaged; choose one of {AVERAGED}")
    names = [c.name for c in SCHEMA if c.role == role and c.name in df.columns]
    names += [c for c in unknown_columns(df) if role_of(c, df[c]) == role]
    return [m for m in names if pd.to_numeric(df[m], errors="coerce").notna().any()]


def nunique(series: pd.Series) -> int:
    """Distinct values of ``series``, every kind of missing (None, NaN, NA) counted as one value."""
    present = series.dropna()
    try:
        n = present.nunique()
    except TypeError:  # unhashable cells (lists): compare their text
        n = present.astype(str).nunique()
    return n + int(bool(series.isna().any()))


def image_attributes(df: pd.DataFrame, columns: list[str], ignore_missing: bool = False) -> list[str]:
    """Of ``columns``, those that vary across ``df`` but hold one value per image (fixed by the image);
    ``ignore_missing``: one value per image besides missing ones."""
    if IMAGE not in df.columns or df[IMAGE].nunique(dropna=False) < 2:
        return []
    images = df[IMAGE].astype(str)
    out = []
    for c in columns:
        values = df[c] if df[c].dtype != object else df[c].map(lambda v: v if v is None else str(v))
        per_image = values.groupby(images, dropna=False, sort=False).nunique(dropna=ignore_missing)
        if int(per_image.max()) <= 1:
            out.append(c)
    return out


PER_IMAGE = "(per image)"


def grouping_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """(frame, keys, image attributes, per-image keys) for grouping ``df`` (after :func:`normalize`).

    keys: the config columns that vary across ``df`` and split groups. Image attributes: varying config columns
    with one value per image, which vary only with the images and do not split groups. A column with one value
    per image *besides missing* ones, several across images (PIE-Bench's per-image edit prompt beside
    reconstruction rows), is a per-image key with two values: missing, and ``(per image)`` (so in the returned
    frame).
    ``protocol`` is always a key when it varies: protocols are never pooled."""
    df = normalize(df)
    varying = [c for c in config_columns(df) if nunique(df[c]) > 1]
    attributes = [c for c in image_attributes(df, varying) if c != PROTOCOL]
    keys = [c for c in varying if c not in attributes]
    partial = [
        c
        for c in image_attributes(df, keys, ignore_missing=True)
        if c != PROTOCOL and df[c].dropna().astype(str).nunique() > 1
    ]
    if partial:
        df = df.copy()
        for c in partial:
            df[c] = df[c].astype(object).where(df[c].isna(), PER_IMAGE)
    return df, keys, attributes, partial


def grouping_keys(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(keys, image attributes) of :func:`grouping_frame`."""
    _, keys, attributes, _ = grouping_frame(df)
    return keys, attributes


def label(name: str) -> str:
    """A column's axis/table label with its unit, e.g. ``psnr (dB)``."""
    col = BY_NAME.get(name)
    return f"{name} ({col.unit})" if col is not None and col.unit else name


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with an empty ``edit_prompt`` made missing: reconstruction rows store it empty (older tables
    stored null), and the two spellings must be one group. Returns ``df`` itself when nothing changes."""
    if "edit_prompt" not in df.columns:
        return df
    empty = df["edit_prompt"].astype(object).eq("").fillna(False).astype(bool)
    if not empty.any():
        return df
    df = df.copy()
    df["edit_prompt"] = df["edit_prompt"].astype(object).mask(empty, None)
    return df


# -- building rows from the schema -------------------------------------------------------------------------
# config columns that every row of a run shares, with the run-config key each is read from; the per-row ones
# (prompt, edit_prompt, guidance_scale, start_step, inversion_guidance_scale, inverter_knobs) come from the task
RUN_CONFIG: dict[str, str] = {
    "negative_prompt": "negative_prompt",
    "task": "task",
    "model": "model.name",
    "scheduler": "scheduler.name",
    "inverter": "inverter.name",
    "scheduler_overrides": "scheduler.overrides",
    "num_steps": "num_steps",
    "budget_nfe": "budget.nfe",
    "eta": "eta",
    "seed": "seed",
    "dtype": "runtime.dtype",
    "lpips_net": "metrics.lpips_net",
}
_CASTS = {STR: str, FLOAT: float, INT: int, BOOL: bool}

assert all(c in BY_NAME and BY_NAME[c].role == CONFIG for c in RUN_CONFIG), "RUN_CONFIG: non-config columns"


def config_values(cfg: Any) -> dict[str, Any]:
    """The run-wide config columns of ``cfg`` (a composed lab config), cast to their column dtypes; a mapping
    value (``scheduler.overrides``) as sorted JSON, so runs that differ only there are never pooled."""
    import json

    from omegaconf import ListConfig, OmegaConf

    out: dict[str, Any] = {}
    for column, key in RUN_CONFIG.items():
        value = OmegaConf.select(cfg, key)
        if column == "seed" and isinstance(value, ListConfig | list):  # a seed list: each row names its own
            value = value[0] if len(value) == 1 else None
        if OmegaConf.is_config(value):
            value = json.dumps(OmegaConf.to_container(value, resolve=True), sort_keys=True)
        out[column] = None if value is None else _CASTS[BY_NAME[column].dtype](value)
    return out


def generation_values(cfg: Any) -> dict[str, Any]:
    """``config_values`` of a generation task (``sample``, ``controlnet``): no inversion, no edit and no
    metric against an input, so those settings are None, and every trajectory starts at step 0."""
    unused = ("edit_prompt", "inverter", "inverter_knobs", "inversion_guidance_scale", "lpips_net")
    return config_values(cfg) | dict.fromkeys(unused) | {"start_step": 0}


def row(**values: Any) -> dict[str, Any]:
    """One result row in schema order: every core column (a metric or bookkeeping column not given is None),
    then the optional columns given.

    Raises ValueError for a column the schema does not declare, and for a core config column left out: a
    row must say each of its settings (None where one does not apply), or the report could pool it wrongly.
    """
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ValueError(f"result row has undeclared columns {unknown}: declare them in ddim_lab.schema.SCHEMA")
    missing = [c.name for c in SCHEMA if c.core and c.role == CONFIG and c.name not in values]
    if missing:
        raise ValueError(f"result row leaves out the config columns {missing} (None where one does not apply)")
    return {c.name: values.get(c.name) for c in SCHEMA if c.core or c.name in values}
