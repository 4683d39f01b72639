"""The `ddim-lab` and `ddim-lab-report` commands, end to end, as a user runs them: in a process of their own
where the process is the point (the quickstart, concurrent runs, a fresh Hugging Face cache setting), else
inside the test's process (:func:`ddim_lab_here`: the same arguments, working directory, environment, exit code
and output, without paying the imports again)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch

from ddim_lab.study.records import COLUMNS
from tests.conftest import DIGITS, ROOT, lab_config

ISSUE_COLUMNS = [
    "image",
    "prompt",
    "edit_prompt",
    "model",
    "scheduler",
    "inverter",
    "num_steps",
    "inversion_guidance_scale",
    "guidance_scale",
    "start_step",
    "seed",
    "psnr",
    "ssim",
    "lpips",
    "lpips_net",
    "latent_mse",
    "vae_psnr",
    "vae_lpips",
    "unet_evals",
    "seconds",
]


def ddim_lab(args: list[str], tmp: Path, module: str = "ddim_lab.cli.main") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DDIM_LAB_CACHE": str(tmp / "cache"),
        "WANDB_DIR": str(tmp / "wandb-home"),
        "WANDB_CONFIG_DIR": str(tmp / "wandb-home"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-home"),
        "WANDB_DATA_DIR": str(tmp / "wandb-home"),
        "TORCH_HOME": str(tmp / "torch-home"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WANDB_MODE", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )


@contextlib.contextmanager
def fresh_logging() -> Iterator[None]:
    """Logging as a new process has it (no handlers: ``main``'s own ``basicConfig`` applies), restored after:
    Hydra's per-job handlers (console on the captured stderr, the job's log file) do not outlive the call."""
    named = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    loggers = [logging.getLogger(), *named]
    saved = {lg: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers}
    disabled_below = logging.root.manager.disable
    logging.getLogger().handlers = []
    try:
        yield
    finally:
        for lg, (level, handlers, propagate, disabled) in saved.items():
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.setLevel(level)
            lg.handlers = handlers
            lg.propagate, lg.disabled = propagate, disabled
        logging.disable(disabled_below)


@contextlib.contextmanager
def process_state() -> Iterator[None]:
    """The process-wide settings a run changes, restored after: torch's (threads, the global generator,
    determinism, denormals: the training scripts set them) and Hydra's current app config."""
    from hydra.core.hydra_config import HydraConfig

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    app_config = HydraConfig.instance().cfg
    try:
        yield
    finally:
        HydraConfig.instance().cfg = app_config
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_flush_denormal(False)  # torch's default; nothing else in the suite sets it


def run_here(
    main: Callable[[], object], argv: list[str], cwd: Path, env: Mapping[str, str], unset: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """``main`` run inside this process (its imports already paid for) as a new process would run it: working
    directory ``cwd``, ``sys.argv``, the environment with ``env`` set and ``unset`` removed, fresh logging, and
    its exit code and stdout/stderr captured; an exception that escapes ``main`` gives exit code 1 and its
    traceback on stderr, as the interpreter would. Everything is restored after."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, fresh_logging(), process_state():
        for name, value in env.items():
            patch.setenv(name, value)
        for name in unset:
            patch.delenv(name, raising=False)
        patch.chdir(cwd)
        patch.setattr(sys, "argv", list(argv))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main()
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # what the interpreter prints for an uncaught exception
                traceback.print_exc()
                code = 1
            if code is not None and not isinstance(code, int):  # sys.exit("message")
                print(code, file=sys.stderr)
                code = 1
    return subprocess.CompletedProcess(list(argv), code or 0, out.getvalue(), err.getvalue())


def as_main(script: Path) -> Callable[[], None]:
    """``python SCRIPT``'s work as a function: the script run as ``__main__`` (for :func:`run_here`)."""
    return lambda: runpy.run_path(str(script), run_name="__main__") and None


def ddim_lab_here(
    args: list[str], tmp: Path, module: str = "ddim_lab.cli.main", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """:func:`ddim_lab` run inside this process with :func:`run_here`: the same working directory, environment
    (``env`` on top), arguments, exit code and output. For what one process does; a test of process behaviour
    (signals, launchers, several processes, a fresh import, an install) uses :func:`ddim_lab`."""
    from ddim_lab.cli import main as cli
    from ddim_lab.report import main as report

    home = str(tmp / "wandb-home")
    env = {
        "DDIM_LAB_CACHE": str(tmp / "cache"),
        **dict.fromkeys(("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"), home),
        "TORCH_HOME": str(tmp / "torch-home"),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),  # cli.main sets it
        **(env or {}),
    }
    main = (lambda: report.main(list(args))) if module == "ddim_lab.report.main" else cli.main
    return run_here(main, [module, *args], tmp, env, unset=["WANDB_MODE"])


def four_digits(tmp_path: Path) -> Path:
    """Four of the held-out digits (every fifth) with their captions, in a folder of their own."""
    folder = tmp_path / "digits"
    folder.mkdir()
    header, *rows = (DIGITS / "captions.csv").read_text().splitlines()
    names = sorted(p.name for p in DIGITS.glob("*.png"))[::5]
    kept = [row for row in rows if row.split(",")[0] in names]
    assert len(kept) == len(names) == 4
    for name in names:
        shutil.copy(DIGITS / name, folder / name)
    (folder / "captions.csv").write_text("\n".join([header, *kept]) + "\n")
    return folder


def test_quickstart_writes_results_grids_and_config(tmp_path):
    """``make quickstart`` (``ddim-lab +experiment=quickstart``) in a process of its own, on four of its digits:
    every image × grid point gives a row, as the preset's whole data (the 20 held-out digits) would."""
    from ddim_lab.data.folders import load_dataset

    preset = lab_config("+experiment=quickstart")
    assert Path(preset.data.path) == DIGITS and preset.data.captions and len(load_dataset(DIGITS, 16, "")) == 20
    run_dir = tmp_path / "quick"
    proc = ddim_lab(
        ["+experiment=quickstart", f"data.path={four_digits(tmp_path)}", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(run_dir / "results.parquet")
    assert table.prompt.str.startswith("a handwritten digit").all()  # the captions were read
    assert set(ISSUE_COLUMNS) <= set(table.columns) and list(table.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(table) == 4 * 2 * 2 * 2  # images × targets × guidance scales × start steps
    assert len(pd.read_csv(run_dir / "results.csv")) == len(table)
    assert (
        table.lpips.isna().all() and (table.lpips_net == "alex").all()
    )  # no backbone here: missing, not made up
    assert table.psnr.notna().all() and (table.vae_psnr > table.psnr).mean() > 0.9
    assert [p.name for p in run_dir.glob("grid_*.png")] == ["grid_sheet.png"]  # one contact sheet per job
    assert (run_dir / "config.yaml").exists()
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["unet_evals"] == summary["minimum_unet_evals"]
    assert proc.stderr.count("LPIPS (alex) is unavailable") == 1 and "metrics.lpips=off" in proc.stderr
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["versions"]["torch"] and provenance["dtype"] == "fp32" and provenance["git_revision"]
    assert json.loads((run_dir / "done.json").read_text())["config_hash"]


def test_sweep_2x2_then_report_merges_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "model=tiny",
        "data=photos",
        "prompt=a photograph",
        "num_steps=3,4",
        "guidance_scale=1,2",
        "metrics.lpips=off",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = ddim_lab_here(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(sweep.glob("*/results.parquet"))
    assert len(jobs) == 4
    tables = [pd.read_parquet(j) for j in jobs]
    assert [len(t) for t in tables] == [5] * 4  # 5 bundled photos, one grid point per job
    assert {(t.num_steps[0], t.guidance_scale[0]) for t in tables} == {(3, 1.0), (3, 2.0), (4, 1.0), (4, 2.0)}
    # the four jobs shared two inversions per image: the later jobs read them from the cache
    assert sum(t.inversion_cached.sum() for t in tables) == 2 * 5

    report = ddim_lab_here([str(sweep)], tmp_path, module="ddim_lab.report.main")
    assert report.returncode == 0, report.stderr[-3000:]
    merged = pd.read_parquet(sweep / "report.parquet")
    assert len(merged) == 20 and merged.run_dir.nunique() == 4
    assert (sweep / "report.csv").exists() and "guidance_scale" in (sweep / "report.md").read_text()


def test_wandb_offline_run_writes_its_run_file(tmp_path):
    run_dir = tmp_path / "wb"
    image = ROOT / "ddim_lab" / "assets" / "photos" / "chelsea.jpg"
    args = [
        "model=tiny",
        f"data.path={image}",
        "prompt=a cat",
        "num_steps=3",
        "logger=wandb",
        "logger.mode=offline",
        "metrics.lpips=off",
        f"hydra.run.dir={run_dir}",
    ]
    proc = ddim_lab_here(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert len(pd.read_parquet(run_dir / "results.parquet")) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["start_step=50"], "start_step=50 must be an integer in [0, num_steps=50)"),
        (["guidance_scale=-1"], "guidance_scale=-1 must be a number >= 0"),
        (["model=sd15"], "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        (["data.path=no/such/folder"], "data.path=no/such/folder does not exist (relative to"),
    ],
)
def test_bad_input_fails_with_one_clear_message(tmp_path, args, message):
    proc = ddim_lab_here([*args, f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1
    if not args[0].startswith("model"):
        assert "loading model" not in proc.stderr  # rejected before any model loads
    assert not (tmp_path / "bad").exists()  # no work done: no run directory, no cli.log, no error.json


def test_unknown_group_option_names_the_choices(tmp_path):
    proc = ddim_lab(["inverter=magic"], tmp_path)
    assert proc.returncode != 0 and "inverter/magic" in proc.stderr and "course" in proc.stderr


def test_sample_and_alpha_plot_tasks(tmp_path):
    proc = ddim_lab_here(
        [
            "model=tiny",
            "task=sample",
            "prompt=[a cat,a dog]",
            "num_images=2",
            "num_steps=3",
            "eta=1.0",
            f"hydra.run.dir={tmp_path / 's'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_parquet(tmp_path / "s" / "results.parquet")) == 4
    assert (tmp_path / "s" / "samples.png").exists()
    proc = ddim_lab_here(["model=tiny", "task=alpha_plot", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alphas = pd.read_csv(tmp_path / "a" / "alphas.csv")
    assert len(alphas) == 50 and alphas.alpha_cumprod.is_monotonic_increasing


IMAGE = ROOT / "ddim_lab" / "assets" / "digits-heldout" / "digit0_0.png"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "[ERROR]" in line]


def test_failing_job_costs_only_itself_and_a_rerun_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", f"data.path={IMAGE}", "inverter=course", "num_steps=2,3", "metrics.lpips=off"]
    proc = ddim_lab_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(pd.read_parquet(sweep / "1" / "results.parquet")) == 1  # job 1 ran after job 0 failed
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert error["type"] == "ConfigError" and "num_steps=2 must be at least 3" in error["message"]
    assert error["config"]["num_steps"] == 2 and "num_steps=2" in error["overrides"]
    summary = json.loads((sweep / "sweep.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["failed", "done"]
    failed = [line for line in proc.stderr.splitlines() if "job 0 [" in line and "failed:" in line]
    assert len(failed) == 1 and "num_steps=2" in failed[0] and "at least 3" in failed[0]
    assert "start_step <= -1" not in proc.stderr

    again = ddim_lab_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)  # resume: the finished job is skipped
    assert again.returncode == 2 and "already finished" in again.stderr
    assert "loading model" not in again.stderr


def test_run_directories_are_unique_and_never_shared(tmp_path):
    cmd = ["task=alpha_plot", "num_steps=10"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ddim_lab.cli.main", *cmd],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    runs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/alphas.csv"))
    assert len(runs) == 2  # started within the same second, two directories

    fixed = tmp_path / "fixed"
    assert ddim_lab_here([*cmd, f"hydra.run.dir={fixed}"], tmp_path).returncode == 0
    other = ddim_lab_here(["task=alpha_plot", "num_steps=20", f"hydra.run.dir={fixed}"], tmp_path)
    assert other.returncode == 2 and "already holds another run" in other.stderr
    assert len(error_lines(other.stderr)) == 1 and not (fixed / "error.json").exists()
    assert len(pd.read_csv(fixed / "alphas.csv")) == 10  # the first run's results are untouched


def test_alpha_plot_needs_only_the_scheduler_config(tmp_path):
    from ddim_lab.models.build import SD_SCHEDULER

    # a Hugging Face cache holding nothing of SD 1.5 but its scheduler config
    repo = tmp_path / "hf" / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    scheduler = repo / "snapshots" / commit / "scheduler"
    scheduler.mkdir(parents=True)
    (scheduler / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", **SD_SCHEDULER})
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddim_lab.cli.main",
            "task=alpha_plot",
            "model=sd15",
            "num_steps=25",
            "hydra.run.dir=a",
        ],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "a" / "alphas.csv")) == 25 and (tmp_path / "a" / "alpha_t.png").exists()
    # the random-weight tiny model is not built for a plot of its schedule
    proc = ddim_lab_here(["model=tiny", "task=alpha_plot", f"hydra.run.dir={tmp_path / 't'}"], tmp_path)
    assert proc.returncode == 0 and not (tmp_path / "cache" / "models").exists()


def test_help_is_the_apps_own(tmp_path):
    proc = ddim_lab(["--help"], tmp_path)
    assert proc.returncode == 0 and "Config groups" in proc.stdout and "inverter" in proc.stdout
    assert "train" not in proc.stdout.replace("constraint", "")
    assert "submitit_local" in proc.stdout and "ddim-lab-prefetch" in proc.stdout
    # the options themselves, from the config groups (a wheel has no conf/ folder to point at)
    assert "conf/" not in proc.stdout
    listed = " ".join(proc.stdout.split())
    for group in ("model", "inverter", "editor", "data", "controlnet", "experiment"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            assert f" {option}," in listed or f" {option} " in listed, (group, option)
    assert "ddim (default)" in listed and "digits (default)" in listed


def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "num_steps=10,20", f"data.path={IMAGE}", "metrics.lpips=off"]
    proc = ddim_lab_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)  # the launcher starts the processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = [pd.read_parquet(sweep / str(i) / "results.parquet") for i in range(2)]
    assert [int(t.num_steps[0]) for t in tables] == [10, 20]
    pids = {json.loads((sweep / str(i) / "job.json").read_text())["pid"] for i in range(2)}
    assert len(pids) == 2 and os.getpid() not in pids and (sweep / ".submitit").is_dir()


def test_pie_editing_sweep_then_report_with_pairs_and_figures(tmp_path):
    """The benchmark path end to end, written as a user types it (``-m`` after some overrides): p2p edits of the
    digits mini-benchmark by two inverters, then a report with intervals, a paired comparison and figures."""
    sweep = tmp_path / "sweep"
    proc = ddim_lab_here(
        [
            "data=digits-pie",
            "data.categories=[1]",
            "task=edit",
            "editor=p2p",
            "num_steps=5",
            "-m",
            "inverter=ddim,null_text",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "report"
    proc = ddim_lab_here([str(sweep), "--out", str(out), "--figures"], tmp_path, module="ddim_lab.report.main")
    assert proc.returncode == 0, proc.stderr[-3000:]
    paired = (out / "paired.md").read_text()
    assert "null_text" in paired and "ddim" in paired and "(no pairs)" not in paired
    assert "[" in (out / "intervals.md").read_text()  # means with their intervals
    assert list(out.glob("*.png")) or list((out / "figures").glob("*.png"))
