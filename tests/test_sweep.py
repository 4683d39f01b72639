"""Job state on disk: config hashes, claims, completion markers, sweep plans and GPU pinning."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ddim_lab.study.records import write_part
from ddim_lab.study.sweep import (
    DONE_JSON,
    ERROR_JSON,
    SWEEP_JSON,
    RunDirConflict,
    claim,
    config_hash,
    is_done,
    mark_done,
    pinned_device,
    record_failure,
    sweep_jobs,
)


def test_config_hash_ignores_progress_and_key_order():
    a = OmegaConf.create({"num_steps": 3, "runtime": {"progress": True, "device": "cpu"}})
    b = OmegaConf.create({"runtime": {"device": "cpu", "progress": False}, "num_steps": 3})
    c = OmegaConf.create({"runtime": {"device": "cpu", "progress": False}, "num_steps": 4})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_claim_resume_done_and_conflict(tmp_path):
    run = tmp_path / "run"
    assert claim(run, "aaaa", ["num_steps=3"]) is False  # a new run
    assert claim(run, "aaaa", ["num_steps=3"]) is True  # the same config again: a resume
    assert json.loads((run / "job.json").read_text())["attempts"] == 2
    with pytest.raises(RunDirConflict, match="already holds another run"):
        claim(run, "bbbb", [])
    assert not is_done(run, "aaaa")
    mark_done(run, "aaaa")
    assert is_done(run, "aaaa") and not is_done(run, "bbbb")


def test_results_without_a_claim_are_not_overwritten(tmp_path):
    write_part([{"image": "a"}], tmp_path / "old", "g00000")
    with pytest.raises(RunDirConflict, match="already holds results"):
        claim(tmp_path / "old", "aaaa", [])
    assert not (tmp_path / "old" / "job.json").exists()


def test_failure_record_is_one_line_with_type_and_config(tmp_path):
    try:
        raise ValueError("bad\nthing")
    except ValueError as err:
        record = record_failure(tmp_path, err, {"num_steps": 3}, ["num_steps=3"])
    saved = json.loads((tmp_path / ERROR_JSON).read_text())
    assert saved["type"] == "ValueError" and saved["message"] == "bad thing" == record["message"]
    assert saved["config"] == {"num_steps": 3} and "Traceback" in saved["traceback"]


@pytest.mark.parametrize(
    "device, job, gpus, expected",
    [
        ("auto", 0, 0, "auto"),  # no GPU: nothing changes
        ("cuda", 5, 0, "cuda"),
        ("auto", 0, 2, "cuda:0"),
        ("auto", 1, 2, "cuda:1"),
        ("cuda", 2, 2, "cuda:0"),
        ("auto", 7, 4, "cuda:3"),
        ("cpu", 3, 4, "cpu"),  # an explicit device wins
        ("cuda:1", 0, 4, "cuda:1"),
    ],
)
def test_job_gpu_is_job_number_modulo_visible_gpus(device, job, gpus, expected):
    assert pinned_device(device, job, gpus) == expected


def test_sweep_jobs_report_done_failed_running_missing(tmp_path):
    jobs = [{"num": i, "dir": str(i), "overrides": [f"num_steps={i + 3}"]} for i in range(4)]
    (tmp_path / SWEEP_JSON).write_text(json.dumps({"jobs": jobs}))
    claim(tmp_path / "0", "h0", [])
    mark_done(tmp_path / "0", "h0")
    record_failure(tmp_path / "1", RuntimeError("out of memory"), None, ["num_steps=4"])
    claim(tmp_path / "2", "h2", [])  # started, never finished (killed)
    status = {j["dir"]: j["status"] for j in sweep_jobs(tmp_path)}
    assert status == {"0": "done", "1": "failed", "2": "running", "3": "missing"}
    failed = [j for j in sweep_jobs(tmp_path) if j["status"] == "failed"]
    assert failed[0]["error"] == "RuntimeError: out of memory"
    assert (tmp_path / "0" / DONE_JSON).exists()


def test_config_hash_ignores_cache_dir_and_logger_but_not_results_settings():
    base = {"num_steps": 3, "cache": {"dir": "a", "enabled": True}, "logger": {"name": "local"}}
    moved = {"num_steps": 3, "cache": {"dir": "b", "enabled": True}, "logger": {"name": "wandb", "mode": "x"}}
    assert config_hash(OmegaConf.create(base)) == config_hash(OmegaConf.create(moved))
    assert config_hash(OmegaConf.create(base)) != config_hash(OmegaConf.create({**base, "num_steps": 4}))
