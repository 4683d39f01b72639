"""Result logging backends: ``local`` (the result files are the record) and ``wandb`` (Weights & Biases)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import pandas as pd
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
_NUMERIC_KINDS = ["number", "bool", "boolean"]


class RunLogger(Protocol):
    """What the lab logs to: per-row metrics, images, and the end of the run. Usable as a context manager."""

    def log_rows(self, df: pd.DataFrame) -> None: ...

    def log_image(self, path: Path, caption: str) -> None: ...

    def finish(self) -> None: ...

    def __enter__(self) -> RunLogger: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _ContextLogger:
    """Context-manager support: ``finish`` on the way out, also when an exception leaves the block."""

    def finish(self) -> None:
        raise NotImplementedError

    def _fail(self) -> None:
        self.finish()

    def __enter__(self) -> _ContextLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
        else:
            self._fail()


class LocalLogger(_ContextLogger):
    """Logs nothing: the run directory's result tables and images are the record."""

    def log_rows(self, df: pd.DataFrame) -> None:
        logger.debug("local logger: %d rows (kept in the run's result files)", len(df))

    def log_image(self, path: Path, caption: str) -> None:
        logger.debug("local logger: image %s (%s)", path, caption)

    def finish(self) -> None:
        pass


def _plain(value: Any) -> Any:
    """A pandas/numpy scalar as a plain Python value; missing values as None."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def summary_means(df: pd.DataFrame) -> dict[str, float]:
    """``{"mean/<column>": mean}`` over the numeric columns of ``df`` that have a value."""
    numeric = df.select_dtypes(include=_NUMERIC_KINDS)
    means = {}
    for col in numeric.columns:
        values = pd.to_numeric(numeric[col], errors="coerce").astype("float64").dropna()
        if len(values):
            means[f"mean/{col}"] = float(values.mean())
    return means


class WandbLogger(_ContextLogger):
    """Logs to one W&B run: the results as one ``wandb.Table``, their means in the run summary, and images;
    finishes the run once."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._finished = False

    def log_rows(self, df: pd.DataFrame) -> None:
        """Log the whole table as ``results`` (one ``wandb.Table``) and each numeric column's mean over the rows
        in the run summary (``mean/<column>``, missing values skipped)."""
        import wandb

        # wandb.Table rejects pd.NA: hand it plain objects with None for missing values
        plain = df.astype(object).map(_plain)
        self.run.log({"results": wandb.Table(dataframe=plain)})
        self.run.summary.update(summary_means(df))
        self.run.summary["rows"] = len(df)

    def log_image(self, path: Path, caption: str) -> None:
        import wandb

        self.run.log({f"images/{Path(path).stem}": wandb.Image(str(path), caption=caption)})

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (once). Offline, wandb-core writes the .wandb file a few ms after this returns, and
        for sure at process exit (W&B's atexit teardown)."""
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)

    def _fail(self) -> None:
        self.finish(exit_code=1)


def _wandb_logger(
    cfg: Mapping, config: dict, run_dir: Path, group: str | None, name: str | None
) -> WandbLogger:
    import wandb

    mode = cfg.get("mode", "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {mode!r}")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # silent + console off: W&B writes nothing to stdout/stderr and leaves Hydra's logging alone
    settings = wandb.Settings(silent=True, console="off")
    run = wandb.init(
        project=cfg.get("project", "ddim-lab"),
        entity=cfg.get("entity"),
        mode=mode,
        dir=str(run_dir),
        group=group,
        name=name,
        config=config,
        tags=[str(t) for t in (cfg.get("tags") or [])],
        reinit="finish_previous",  # one run per job: never hand back a previous job's unfinished run
        settings=settings,
    )
    if mode == "offline":
        logger.info("W&B offline run: upload it later with `wandb sync %s`", Path(run.dir).parent)
    return WandbLogger(run)


def open_logger(
    cfg: Mapping | DictConfig, config: dict, run_dir: Path, group: str | None, name: str | None
) -> RunLogger:
    """Open the logger named by ``cfg.name`` (``local`` or ``wandb``) for one run."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    kind = cfg.get("name", "local")
    if kind == "local":
        return LocalLogger()
    if kind == "wandb":
        return _wandb_logger(cfg, config, run_dir, group, name)
    raise ValueError(f"unknown logger {kind!r}: expected 'local' or 'wandb'")
