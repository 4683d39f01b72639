"""One job over several processes (``accelerate launch``/torchrun): each takes its share of image groups, the
main process merges one table, equal to a single process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ddim_lab.study.distributed import my_share, process_info
from tests.conftest import ROOT
from tests.test_cli import ddim_lab_here

DIGITS = ROOT / "ddim_lab" / "assets" / "digits-heldout"
VOLATILE = ["seconds", "peak_memory_mb", "inversion_cached", "inversion_unet_evals", "inversion_unet_backwards"]


@pytest.mark.parametrize(
    "count, world, shares",
    [(5, 1, [[0, 1, 2, 3, 4]]), (5, 2, [[0, 2, 4], [1, 3]]), (2, 4, [[0], [1], [], []])],
)
def test_each_process_takes_every_world_th_group(count, world, shares):
    assert [my_share(count, r, world) for r in range(world)] == shares
    assert sorted(i for share in shares for i in share) == list(range(count))


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert process_info() == (0, 1, 0)


def six_digits(tmp_path: Path) -> Path:
    data = tmp_path / "digits"
    data.mkdir()
    names = sorted(p.name for p in DIGITS.glob("*.png"))[:6]
    for name in names:
        shutil.copy(DIGITS / name, data / name)
    (data / "captions.csv").write_text(
        "image,prompt\n" + "".join(f"{n},a handwritten digit {n[5]}\n" for n in names)
    )
    return data


def test_two_processes_write_one_table_equal_to_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [f"data.path={six_digits(tmp_path)}", "num_steps=3", "batch_size=2", "metrics.lpips=off"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DDIM_LAB_CACHE": str(tmp_path / "c1")}
    split = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ddim_lab.cli.main", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert split.returncode == 0, split.stderr[-3000:]
    (run,) = [p.parent for p in tmp_path.glob("outputs/*/*/done.json")]  # both processes wrote into one dir
    assert len(list((run / "parts").glob("*.parquet"))) == 3
    single = ddim_lab_here(  # one plain process: this one
        [*args, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path, env={"DDIM_LAB_CACHE": str(tmp_path / "c2")}
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a = pd.read_parquet(run / "results.parquet").drop(columns=VOLATILE)
    b = pd.read_parquet(tmp_path / "single" / "results.parquet").drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
