"""Tests for ddim_lab.study.loggers: the local no-op logger and the W&B backend (offline / disabled, no
network)."""

import math
import time

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from ddim_lab.study.loggers import LocalLogger, open_logger
from ddim_lab.study.records import save_grid

WANDB_CFG = {"name": "wandb", "project": "ddim-lab-test", "entity": None, "mode": "offline", "tags": ["test"]}


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """Keep every W&B file (cache, config, artifacts) under tmp_path; never talk to the server."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")


def _results() -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "image": ["img0", "img1"],
            "num_steps": pd.array([10, 10], dtype="Int64"),
            "psnr": [21.5, 23.25],
            "lpips": [math.nan, 0.125],
            "inversion_cached": pd.array([False, pd.NA], dtype="boolean"),
            "edit_prompt": [None, "a cat"],
        }
    )
    return df


def _offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _wait_for_records(path, marker: bytes, timeout: float = 10.0) -> bytes:
    """The .wandb file's bytes once ``marker`` is in it. wandb-core writes the file when it closes the run's
    stream, which ``run.finish()`` only requests (seen here: a 7-byte header for ~5 ms after finish returns)."""
    deadline = time.monotonic() + timeout
    data = path.read_bytes()
    while marker not in data and time.monotonic() < deadline:
        time.sleep(0.02)
        data = path.read_bytes()
    return data


def test_local_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open_logger(OmegaConf.create({"name": "local"}), {"a": 1}, run_dir, None, None) as lg:
        assert isinstance(lg, LocalLogger)
        lg.log_rows(_results())
        lg.log_image(run_dir / "grid.png", "caption")
    assert list(run_dir.iterdir()) == []


def test_unknown_logger_and_mode_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown logger"):
        open_logger({"name": "tensorboard"}, {}, tmp_path, None, None)
    with pytest.raises(ValueError, match="mode"):
        open_logger({**WANDB_CFG, "mode": "offlien"}, {}, tmp_path, None, None)


def test_offline_run_writes_wandb_file_quietly(tmp_path, capfd):
    run_dir = tmp_path / "run"
    grid = save_grid(tmp_path / "grid.png", [("input", torch.rand(1, 3, 8, 8))], ["img0"], min_cell=16)
    cfg = OmegaConf.create(WANDB_CFG)
    with open_logger(cfg, {"model": {"name": "digits"}, "num_steps": 10}, run_dir, "sweep-1", "job-0") as lg:
        lg.log_rows(_results())
        lg.log_image(grid, "reconstruction-grid-caption")
    runs = _offline_runs(run_dir)
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    data = _wait_for_records(files[0], b"reconstruction-grid-caption")
    for marker in (b"psnr", b"22.375", b"results", b"reconstruction-grid-caption", b"job-0", b"sweep-1"):
        assert marker in data, marker  # summary mean, table, image, run names
    out, err = capfd.readouterr()
    assert out == "" and "wandb:" not in err  # silent: no banner or run summary on the console


def test_two_loggers_in_one_process_are_two_runs(tmp_path):
    first = open_logger(WANDB_CFG, {"job": 0}, tmp_path / "job0", "g", "job-0")
    first.log_rows(_results())
    # the first job "forgot" to finish: the second must still get a run of its own
    second = open_logger(WANDB_CFG, {"job": 1}, tmp_path / "job1", "g", "job-1")
    second.log_rows(_results())
    assert second.run is not first.run and second.run.id != first.run.id
    assert first.run._is_finished  # finished by the second init, not merged into
    second.finish()
    first.finish()  # finishing twice is harmless
    runs = _offline_runs(tmp_path / "job0") + _offline_runs(tmp_path / "job1")
    assert len(runs) == 2 and len({r.name for r in runs}) == 2
    assert runs[0].name.endswith(first.run.id) and runs[1].name.endswith(second.run.id)


def test_context_manager_finishes_run_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), open_logger(WANDB_CFG, {}, tmp_path, None, None) as lg:
        raise RuntimeError("boom")
    assert lg.run._is_finished
    assert len(_offline_runs(tmp_path)) == 1


def test_disabled_mode_is_a_no_op(tmp_path):
    grid = save_grid(tmp_path / "grid.png", [("input", torch.rand(1, 3, 8, 8))], ["img0"], min_cell=16)
    with open_logger({**WANDB_CFG, "mode": "disabled"}, {"a": 1}, tmp_path, None, None) as lg:
        lg.log_rows(_results())
        lg.log_image(grid, "caption")
    assert not (tmp_path / "wandb").exists()


class _FakeRun:
    def __init__(self):
        self.logged: list[dict] = []
        self.summary: dict = {}

    def log(self, data: dict) -> None:
        self.logged.append(data)


def test_results_are_one_table_and_summary_means_not_one_step_per_row():
    import wandb

    from ddim_lab.study.loggers import WandbLogger

    run = _FakeRun()
    WandbLogger(run).log_rows(_results())
    assert len(run.logged) == 1 and set(run.logged[0]) == {"results"}
    assert isinstance(run.logged[0]["results"], wandb.Table) and len(run.logged[0]["results"].data) == 2
    assert run.summary["mean/psnr"] == pytest.approx(22.375)
    assert run.summary["mean/lpips"] == pytest.approx(0.125)  # NaN rows left out
    assert run.summary["rows"] == 2 and "mean/image" not in run.summary


def test_sweep_group_is_the_full_sweep_path(tmp_path):
    from ddim_lab.cli.main import wandb_group

    a = wandb_group(str(tmp_path / "2026-11-27" / "10-00-00"))
    b = wandb_group(str(tmp_path / "2026-11-28" / "10-00-00"))
    assert a != b and a.endswith("2026-11-27/10-00-00") and a.startswith("/")
