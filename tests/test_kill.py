"""The short kill test: SIGKILL a small sweep a few times, rerun it, compare with an uninterrupted run."""

from __future__ import annotations

import importlib.util
import shutil

from tests.conftest import ROOT

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
