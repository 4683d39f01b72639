"""The objective of a tuning sweep (Hydra's Optuna sweeper), read from the results table a job wrote.

With a ``tune`` block in the config (``conf/experiment/tune_edit.yaml``), a job returns :func:`objective` of
its own rows to the sweeper instead of a status: the mean of ``tune.metric`` over the edit rows (e.g.
``edit_success``), less ``tune.penalty`` when the mean of ``tune.floor_metric`` over the same rows (e.g.
``psnr_unedited``, the background PSNR) is under ``tune.floor``. The sweeper maximises it. Reading the saved
table, not in-memory values, means a resumed (skipped) job returns the same number as the run that wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from ddim_lab.errors import ConfigError
from ddim_lab.schema import BY_NAME, METRIC


class TuneError(ConfigError):
    """The tuning objective cannot be computed; the message says which key or column is wrong."""


def check_tune(tune: Mapping[str, Any]) -> None:
    """Raise TuneError when ``tune`` names a column that is not a metric of the row schema."""
    for key in ("metric", "floor_metric"):
        name = tune[key]
        if name not in BY_NAME or BY_NAME[name].role != METRIC:
            metrics = ", ".join(c for c, col in BY_NAME.items() if col.role == METRIC)
            raise TuneError(f"tune.{key}={name!r} is not a metric column; choose one of: {metrics}")


def edit_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` that are edits: a non-empty ``edit_prompt`` other than the image's own prompt."""
    target = table["edit_prompt"].astype(object)
    edit = target.map(lambda t: isinstance(t, str) and t != "") & (target != table["prompt"].astype(object))
    return table[edit.astype(bool)]


def objective(table: pd.DataFrame, tune: Mapping[str, Any]) -> float:
    """The value a tuning job returns: mean ``metric`` over the edit rows, minus ``penalty`` when the mean
    ``floor_metric`` over them is below ``floor`` (a finite value; missing values are skipped)."""
    check_tune(tune)
    rows = edit_rows(table)
    values = {}
    for key in ("metric", "floor_metric"):
        name = tune[key]
        if name not in rows.columns:
            raise TuneError(f"tune.{key}={name!r}: the results table has no such column")
        values[key] = float(pd.to_numeric(rows[name], errors="coerce").mean())
        if not math.isfinite(values[key]):
            raise TuneError(f"tune.{key}={name!r}: no edit row has a value (edit rows: {len(rows)})")
    below = values["floor_metric"] < float(tune["floor"])
    return values["metric"] - (float(tune["penalty"]) if below else 0.0)
