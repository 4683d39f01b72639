"""Helpers for the study tests: a sweep folder of saved rows and configs, as ``ddim-lab -m`` leaves one."""

from __future__ import annotations

from pathlib import Path

import yaml

from ddim_lab.config.compose import config_dir
from ddim_lab.study.records import write_results


def preset_report(name: str) -> dict:
    """The ``report:`` section of ``conf/experiment/<name>.yaml``, as written there."""
    return yaml.safe_load((config_dir() / "experiment" / f"{name}.yaml").read_text(encoding="utf-8"))["report"]


def save_job(run_dir: Path, rows: list[dict], report: dict | None, **config) -> Path:
    """A finished job: its results table and its saved config (with ``report``, as ``ddim-lab`` saves it)."""
    write_results(rows, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "report": report}), encoding="utf-8")
    return run_dir


def draw(sweep: Path, out: Path) -> int:
    """``ddim-lab-report SWEEP --out OUT/report --study-out OUT``; its exit code."""
    from ddim_lab.report.main import main

    return main([str(sweep), "--out", str(out / "report"), "--study-out", str(out), "--resamples", "500"])
