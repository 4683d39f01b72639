"""A non-editable install: the wheel carries conf/, the models and the sample data; its commands run anywhere
(from another directory, with only the install on the import path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a fresh folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("ddim_lab", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        check=True,
        timeout=300,
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("ddim_lab-*.whl")
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    return target


def run_installed(target: Path, command: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a console script of the install with only the install (not the checkout) on the import path."""
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["DDIM_LAB_CACHE"] = str(cwd / "cache")
    return subprocess.run(
        [sys.executable, str(target / "bin" / command), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_wheel_carries_configs_models_and_data(installed):
    assert (installed / "ddim_lab" / "conf" / "config.yaml").is_file()
    assert (installed / "ddim_lab" / "conf" / "hydra" / "launcher" / "slurm.yaml").is_file()
    assert (installed / "ddim_lab" / "conf" / "experiment" / "quickstart.yaml").is_file()
    assert (installed / "ddim_lab" / "assets" / "digits-ldm" / "model_index.json").is_file()
    assert (installed / "ddim_lab" / "assets" / "digits-heldout" / "captions.csv").is_file()


def test_installed_commands_run_from_another_directory(installed, tmp_path):
    probe = run_installed(
        installed, "ddim-lab-prefetch", ["--check", "metrics.lpips=off"], tmp_path
    )  # also proves which ddim_lab is imported, below
    assert probe.returncode == 0, probe.stderr[-2000:]
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ddim_lab, ddim_lab.config.compose as c; print(ddim_lab.__file__, c.config_dir())",
        ],
        env={**os.environ, "PYTHONPATH": str(installed)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where)  # the editable checkout does not leak in

    run = tmp_path / "quick"
    image = installed / "ddim_lab" / "assets" / "digits-heldout" / "digit3_0.png"  # the installed sample data
    args = [
        "+experiment=quickstart",
        "num_steps=26",
        f"data.path={image}",
        "metrics.lpips=off",
        f"hydra.run.dir={run}",
    ]
    proc = run_installed(installed, "ddim-lab", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_parquet(run / "results.parquet")) == 2 * 2 * 2  # targets × guidance scales × start steps
    assert json.loads((run / "provenance.json").read_text())["git_revision"] == "unknown"  # not a checkout
    report = run_installed(installed, "ddim-lab-report", [str(run)], tmp_path)
    assert report.returncode == 0 and (run / "report.md").exists()
