"""The short kill test: SIGKILL a small sweep a few times, rerun it, compare with an uninterrupted run; and
Ctrl-C (SIGINT), which ends a run with one line and exit code 130."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd

from ddim_lab.study.records import read_parts
from tests.conftest import ROOT
from tests.test_cli import ddim_lab_here

DIGITS = ROOT / "ddim_lab" / "assets" / "digits-heldout"


def load_kill_test():
    spec = importlib.util.spec_from_file_location("kill_test", ROOT / "scripts" / "kill_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killed_and_resumed_sweep_equals_an_uninterrupted_one(tmp_path):
    data = tmp_path / "digits"
    data.mkdir()
    names = sorted(p.name for p in DIGITS.glob("*.png"))[:4]
    for name in names:
        shutil.copy(DIGITS / name, data / name)
    (data / "captions.csv").write_text(
        "image,prompt\n" + "".join(f"{n},a handwritten digit {n[5]}\n" for n in names)
    )
    overrides = ["-m", "num_steps=3,4", f"data.path={data}", "batch_size=2", "metrics.lpips=off"]
    problems, killed = load_kill_test().kill_test(
        tmp_path / "kt", kills=2, seed=0, overrides=overrides, groups_delay=1.0
    )
    assert problems == [] and killed >= 1
    assert len(list((tmp_path / "kt" / "killed").glob("*/parts/*.parquet"))) == 2 * 2  # 2 jobs × 2 groups


def test_ctrl_c_is_one_line_exit_130_and_a_rerun_resumes(tmp_path):
    """SIGINT (Ctrl-C) in the middle of a run: one line saying how many image groups are saved, exit code 130,
    no traceback; the parts written stay valid and the same command finishes the rest."""
    data = tmp_path / "digits"
    data.mkdir()
    for name in sorted(p.name for p in DIGITS.glob("*.png"))[:4]:
        shutil.copy(DIGITS / name, data / name)
    run_dir = tmp_path / "run"
    args = [f"data.path={data}", "batch_size=1", "num_steps=10", "metrics.lpips=off", "runtime.progress=false"]
    args.append(f"hydra.run.dir={run_dir}")
    command = [sys.executable, "-m", "ddim_lab.cli.main", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DDIM_LAB_CACHE": str(tmp_path / "c")}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while (
        not list((run_dir / "parts").glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    done = re.search(r"interrupted after (\d) of 4 image groups; rerun the same command to resume", errors[0])
    assert done and 1 <= int(done[1]) <= 3, errors[0]
    saved = read_parts(run_dir)
    assert len(saved) == int(done[1]) and saved.psnr.notna().all()  # the saved parts are whole
    again = ddim_lab_here(args, tmp_path, env={"DDIM_LAB_CACHE": str(tmp_path / "c")})  # the same command
    assert again.returncode == 0 and f"{done[1]} of 4 image groups already done: skipped" in again.stderr
    assert len(pd.read_parquet(run_dir / "results.parquet")) == 4
