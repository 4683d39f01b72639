"""Job state on disk, so sweeps survive failures and restarts.

Every job directory holds ``job.json`` (its claim: the hash of its resolved config) as soon as it starts,
``done.json`` (the completion marker) when it finished, or ``error.json`` (type, message, config) when it
failed. A rerun with the same config skips a finished job and resumes an unfinished one; a directory that
holds another config's run is refused. :class:`SweepCallback` (a Hydra callback) writes the sweep's plan to
``<sweep dir>/sweep.json`` at the start and every job's status at the end, and logs one line per failed job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddim_lab.errors import ConfigError
from ddim_lab.study.records import RESULTS_PARQUET, atomic_write, parts_dir

log = logging.getLogger("ddim_lab")

JOB_JSON = "job.json"
DONE_JSON = "done.json"
ERROR_JSON = "error.json"
SWEEP_JSON = "sweep.json"
# settings that do not change a job's results: left out of its config hash, so a rerun that changes only them
# still resumes (and skips finished jobs); ``report`` declares a study's tables and figures, drawn afterwards
VOLATILE_KEYS = (("runtime", "progress"), ("cache", "dir"), ("logger",), ("grids",), ("report",))

# exit code of the last run or multirun in this process (read by ddim_lab.cli.main.main)
OUTCOME: dict[str, Any] = {"code": 0, "failures": []}


class RunDirConflict(ConfigError):
    """The run directory already holds another config's run."""


def config_hash(cfg: DictConfig | dict) -> str:
    """sha256 (16 hex) of the resolved job config, without settings that do not change results."""
    data = cfg
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data = json.loads(json.dumps(data, sort_keys=True, default=str))
    for path in VOLATILE_KEYS:
        node = data
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path, digest: str) -> bool:
    """Whether ``run_dir`` holds a finished run of the config with hash ``digest``."""
    done = read_json(Path(run_dir) / DONE_JSON)
    return bool(done) and done.get("config_hash") == digest


def claim(run_dir: Path, digest: str, overrides: list[str]) -> bool:
    """Claim ``run_dir`` for the config ``digest``; True when it resumes an earlier attempt of that config.

    The claim (``job.json``) appears atomically with its content (a hard link of a finished temporary file),
    so concurrent claimants never read a half-written one. Raises RunDirConflict when the directory holds
    another config's run, or results without a claim.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JOB_JSON
    record = {"config_hash": digest, "overrides": overrides, "started": time.time(), "pid": os.getpid()}
    if not path.exists() and (
        (run_dir / RESULTS_PARQUET).exists() or any(parts_dir(run_dir).glob("*.parquet"))
    ):
        raise RunDirConflict(f"{run_dir} already holds results of another run; choose a new directory")
    tmp = run_dir / f".{JOB_JSON}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**record, "attempts": 1}, indent=2), encoding="utf-8")
    try:
        os.link(tmp, path)
        return False
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    earlier = read_json(path) or {}
    if earlier.get("config_hash") != digest:
        raise RunDirConflict(
            f"{run_dir} already holds another run (config {earlier.get('config_hash')}, this one "
            f"{digest}); choose a new directory (hydra.run.dir / hydra.sweep.dir)"
        )
    (run_dir / ERROR_JSON).unlink(missing_ok=True)
    write_json(path, {**record, "attempts": int(earlier.get("attempts", 1)) + 1})
    return True


def mark_done(run_dir: Path, digest: str, **info: Any) -> None:
    """Write the completion marker (after every result file is in place)."""
    write_json(Path(run_dir) / DONE_JSON, {"config_hash": digest, "finished": time.time(), **info})


def record_failure(run_dir: Path, err: BaseException, config: dict | None, overrides: list[str]) -> dict:
    """Write ``error.json`` (type, message, config, traceback) into ``run_dir``; return the record."""
    record = {
        "type": type(err).__name__,
        "message": one_line(err),
        "usage": is_usage_error(err),
        "overrides": overrides,
        "config": config,
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        "time": time.time(),
    }
    try:
        write_json(Path(run_dir) / ERROR_JSON, record)
    except OSError as write_err:  # a full disk must not hide the original error
        log.error("could not write %s: %s", Path(run_dir) / ERROR_JSON, write_err)
    return record


def one_line(err: BaseException) -> str:
    """The error's message on one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def is_usage_error(err: BaseException) -> bool:
    """Config, model-availability and data errors (exit code 2), as opposed to failures while running."""
    from ddim_lab.data.folders import DataError
    from ddim_lab.models.errors import ModelUnavailable

    # only an imported ddim_lab.metrics.image can have raised LpipsUnavailable; importing it here would pull in
    # torchvision, which is what a broken install (ModelUnavailable's BrokenInstall) fails on
    metrics = sys.modules.get("ddim_lab.metrics.image")
    lpips = (metrics.LpipsUnavailable,) if metrics is not None else ()
    return isinstance(err, (ConfigError, ModelUnavailable, DataError, FileNotFoundError, *lpips))


def pinned_device(device: str, job_num: int, gpus: int) -> str:
    """The device of job ``job_num`` when ``gpus`` GPUs are visible: ``cuda:<job_num % gpus>`` for
    ``auto``/``cuda``; anything else (and every job on a machine without GPUs) is left as it is."""
    if gpus < 1 or device not in ("auto", "cuda"):
        return device
    return f"cuda:{job_num % gpus}"


def job_status(job_dir: Path) -> str:
    """``done``, ``failed``, ``running`` (claimed, unfinished: running or killed) or ``missing``."""
    job_dir = Path(job_dir)
    if (job_dir / DONE_JSON).exists():
        return "done"
    if (job_dir / ERROR_JSON).exists():
        return "failed"
    if (job_dir / JOB_JSON).exists():
        return "running"
    return "missing"


def sweep_jobs(sweep_dir: Path) -> list[dict]:
    """Every job of a sweep with its status: the plan in ``sweep.json`` when there is one, else the job
    directories found (those holding ``job.json``)."""
    sweep_dir = Path(sweep_dir)
    plan = read_json(sweep_dir / SWEEP_JSON) or {}
    jobs = [dict(j) for j in plan.get("jobs", [])]
    if not jobs:
        markers = [*sweep_dir.rglob(JOB_JSON), *sweep_dir.rglob(ERROR_JSON)]
        found = sorted({p.parent for p in markers}, key=lambda p: p.as_posix())
        for job_dir in found:
            rel = job_dir.relative_to(sweep_dir).as_posix()
            record = read_json(job_dir / JOB_JSON) or read_json(job_dir / ERROR_JSON) or {}
            jobs.append({"dir": rel, "overrides": record.get("overrides", [])})
    for job in jobs:
        job_dir = sweep_dir / job["dir"]
        job["status"] = job_status(job_dir)
        if job["status"] == "failed":
            error = read_json(job_dir / ERROR_JSON) or {}
            job["error"] = f"{error.get('type', 'Error')}: {error.get('message', '')}"
            job["usage"] = bool(error.get("usage"))
    return jobs


def failure_line(job: dict) -> str:
    """One line for a failed job: its directory, overrides and error."""
    overrides = " ".join(job.get("overrides", [])) or "(no overrides)"
    return f"job {job['dir']} [{overrides}] failed: {job.get('error', 'unknown error')}"


def _planned_jobs(config: DictConfig) -> list[dict] | None:
    """The jobs of a basic-sweeper multirun, as Hydra's BasicSweeper will number them (None otherwise)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if subdir != "${hydra.job.num}":
        return None
    overrides = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + overrides
    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, None)
    flat = [job for batch in batches for job in batch]
    return [{"num": i, "dir": str(i), "overrides": list(job)} for i, job in enumerate(flat)]


class SweepCallback(Callback):
    """Hydra callback: the sweep plan at the start, every job's status and the failures at the end."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        OUTCOME.update(code=0, failures=[])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        OUTCOME.update(code=0, failures=[])
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            jobs = _planned_jobs(config)
        except Exception as err:  # a sweep the basic sweeper rules cannot expand: statuses come from job dirs
            log.debug("no sweep plan: %s", err)
            jobs = None
        if jobs is not None:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            write_json(sweep_dir / SWEEP_JSON, {"sweep_dir": str(sweep_dir.resolve()), "jobs": jobs})

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.FAILED:  # an error the task itself did not catch
            run_dir = Path(config.hydra.runtime.output_dir)
            err = job_return._return_value
            if not (run_dir / ERROR_JSON).exists():
                record_failure(run_dir, err, None, list(config.hydra.overrides.task))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sweep_jobs(sweep_dir)
        plan = read_json(sweep_dir / SWEEP_JSON) or {"sweep_dir": str(sweep_dir.resolve())}
        write_json(sweep_dir / SWEEP_JSON, {**plan, "jobs": jobs})
        failed = [j for j in jobs if j["status"] != "done"]
        counts = {s: sum(j["status"] == s for j in jobs) for s in ("done", "failed", "running", "missing")}
        for job in failed:
            if job["status"] == "failed":
                log.error("%s", failure_line(job))
            else:
                log.error(
                    "job %s [%s] did not finish (%s)", job["dir"], " ".join(job["overrides"]), job["status"]
                )
        if failed:
            usage = all(j.get("usage") for j in failed)
            OUTCOME.update(code=2 if usage else 1, failures=[failure_line(j) for j in failed])
            log.error(
                "%d of %d jobs did not finish (%s); rerun the same command to retry them",
                len(failed),
                len(jobs),
                ", ".join(f"{n} {s}" for s, n in counts.items() if n),
            )
        else:
            log.info("all %d jobs finished; sweep summary in %s", len(jobs), sweep_dir / SWEEP_JSON)
