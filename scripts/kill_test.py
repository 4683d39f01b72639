"""Kill test: a sweep survives SIGKILL at any moment, and the resumed tables equal an uninterrupted run's.

    python scripts/kill_test.py                       # 20 random SIGKILLs during a 12-job sweep (digits model)
    python scripts/kill_test.py --kills 3 --out /tmp/kt

1. The sweep runs once uninterrupted into ``OUT/reference`` (its own inversion cache).
2. The same command, with ``hydra.sweep.dir=OUT/killed`` (and a cache of its own), is started ``--kills``
   times and SIGKILLed after a random delay each time (the next start is the re-run that resumes it); then it
   is run to the end.
3. Every job's ``results.parquet`` is compared with the reference: the same rows in the same order with the
   same values, except the columns that describe how this attempt got them (time, memory, whether an
   inversion came from the cache); no (image, grid point) appears twice; every job has its completion marker.

Exit code 0 when all holds. Each attempt is killed a random time (seeded, ``--seed``) after it shows its
first progress (a new part, claim or completion marker on disk), between 0 and 3 image groups' worth of the
reference run's time, so the kills land anywhere: inside an image group, between groups, between jobs,
while a table is merged.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger("kill_test")

SWEEP = [
    "-m",
    "num_steps=4,6,8",
    "guidance_scale=1,2",
    "inverter=ddim,course",
    "batch_size=4",  # 4 images per group: 5 image groups (parts) per job
    "metrics.lpips=off",
]
VOLATILE = ("seconds", "peak_memory_mb", "inversion_cached", "inversion_unet_evals", "inversion_unet_backwards")
KEY = ("image", "edit_prompt", "guidance_scale", "start_step")


def command(sweep_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "ddim_lab.cli.main", *overrides, f"hydra.sweep.dir={sweep_dir}"]


def environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DDIM_LAB_CACHE": str(cache), "WANDB_MODE": "disabled"}


def run_to_end(sweep_dir: Path, overrides: list[str], cache: Path, cwd: Path) -> float:
    """Run the sweep until it exits; its duration in seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        command(sweep_dir, overrides), cwd=cwd, env=environment(cache), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def progress(sweep_dir: Path) -> dict[str, int]:
    """The state files of a sweep with their modification times (ns)."""
    if not sweep_dir.exists():
        return {}
    files = [
        *sweep_dir.glob("*/parts/*.parquet"),
        *sweep_dir.glob("*/job.json"),
        *sweep_dir.glob("*/done.json"),
    ]
    return {str(p): p.stat().st_mtime_ns for p in files if p.exists()}


def run_and_kill(sweep_dir: Path, overrides: list[str], cache: Path, cwd: Path, delay: float) -> bool:
    """Start the sweep, wait for its first progress, SIGKILL its process group ``delay`` s later; False when
    it ended by itself first."""
    before = progress(sweep_dir)
    proc = subprocess.Popen(
        command(sweep_dir, overrides),
        cwd=cwd,
        env=environment(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches any launcher children too
    )
    while proc.poll() is None and progress(sweep_dir) == before:
        time.sleep(0.02)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )


def compare(reference: Path, resumed: Path) -> list[str]:
    """Differences between two sweeps' tables (empty when they agree)."""
    problems = []
    ref_jobs, res_jobs = job_dirs(reference), job_dirs(resumed)
    if [p.name for p in ref_jobs] != [p.name for p in res_jobs]:
        return [f"job dirs differ: {[p.name for p in ref_jobs]} vs {[p.name for p in res_jobs]}"]
    for ref, res in zip(ref_jobs, res_jobs, strict=True):
        if not (res / "done.json").exists():
            problems.append(f"job {res.name}: no completion marker")
            continue
        a = pd.read_parquet(ref / "results.parquet")
        b = pd.read_parquet(res / "results.parquet")
        keys = [k for k in KEY if k in b.columns]
        if b.duplicated(subset=keys).any():
            problems.append(
                f"job {res.name}: duplicate rows {b[b.duplicated(subset=keys)][keys].values.tolist()}"
            )
        drop = [c for c in VOLATILE if c in a.columns]
        try:
            pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop), check_exact=True)
        except AssertionError as err:
            problems.append(f"job {res.name}: {' '.join(str(err).split())[:300]}")
    return problems


def kill_test(
    out: Path, kills: int, seed: int, overrides: list[str] | None = None, groups_delay: float = 3.0
) -> tuple[list[str], int]:
    """Run the whole test under ``out``: (problems, empty when it passed; how many attempts were killed).

    Each kill comes between 0 and ``groups_delay`` image groups' worth of time after the attempt's first
    progress."""
    overrides = list(overrides or SWEEP)
    out.mkdir(parents=True, exist_ok=True)
    duration = run_to_end(out / "reference", overrides, out / "cache-reference", out)
    groups = len(list((out / "reference").glob("*/parts/*.parquet")))
    per_group = duration / max(1, groups)
    log.info("reference sweep: %.1f s, %d image groups", duration, groups)
    rng = random.Random(seed)
    killed = 0
    for attempt in range(kills):
        # the first kill lands right at the first progress, so a loaded machine cannot make every attempt
        # finish before its kill
        delay = 0.0 if attempt == 0 else rng.uniform(0.0, groups_delay * per_group)
        was_killed = run_and_kill(out / "killed", overrides, out / "cache-killed", out, delay)
        killed += was_killed
        log.info("attempt %d: %s after %.1f s", attempt + 1, "SIGKILL" if was_killed else "finished", delay)
    run_to_end(out / "killed", overrides, out / "cache-killed", out)
    problems = compare(out / "reference", out / "killed")
    log.info("%d SIGKILLs; %s", killed, "tables equal, no duplicates" if not problems else "; ".join(problems))
    return problems, killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/kill_test"))
    parser.add_argument("overrides", nargs="*", help="the sweep (default: a 12-job sweep on the digits model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    problems, _ = kill_test(args.out, args.kills, args.seed, args.overrides or None)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
