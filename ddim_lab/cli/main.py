"""``ddim-lab``: the Hydra app. ``ddim-lab task=edit edit_prompt=... -m num_steps=25,50`` and so on.

A job never exits the process: it records a failure in its directory (``error.json``) and returns, so the
other jobs of a sweep run; ``main`` exits non-zero at the end (2 for config, model and data errors).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ddim_lab.config.budget import apply_budget, check_budget_input
from ddim_lab.config.compose import as_list, config_dir, register_resolvers
from ddim_lab.config.validate import check_editor_fits, validate
from ddim_lab.errors import ConfigError
from ddim_lab.study.distributed import broadcast, process_info
from ddim_lab.study.sweep import (
    JOB_JSON,
    OUTCOME,
    RunDirConflict,
    claim,
    config_hash,
    is_done,
    is_usage_error,
    mark_done,
    one_line,
    pinned_device,
    record_failure,
    write_json,
)

log = logging.getLogger("ddim_lab")

register_resolvers()  # also in launcher workers (submitit, joblib), which import this module to run a job


@dataclass
class Prepared:
    """A job that passed every check and has its model loaded; nothing but its claim written yet."""

    run_dir: Path
    digest: str
    model: Any = None  # the LatentModel; None for alpha_plot and for the idle processes of other tasks


def prepare(
    cfg: DictConfig, run_dir: Path, job_num: int | None = None, overrides: list[str] | None = None
) -> Prepared | None:
    """Validate, claim ``run_dir`` and load the model (and ControlNet), checking it fits the config; None when
    ``run_dir`` holds this config finished. Writes only the claim (``job.json``).

    Raises ConfigError / ModelUnavailable / DataError on bad input, RunDirConflict when ``run_dir`` holds
    another config's run.
    """
    digest = config_hash(cfg)
    rank, world, local_rank = process_info()
    run_dir = Path(broadcast(str(run_dir)))  # under accelerate launch: the main process's directory
    if is_done(run_dir, digest):
        log.info("already finished in %s (config %s): skipped", run_dir, digest)
        return None
    validate(cfg)  # before anything heavy
    apply_budget(cfg)  # budget.nfe: the step count it gives this method becomes num_steps
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars; the lab's own loops have theirs
    transformers.utils.logging.disable_progress_bar()

    from ddim_lab.models.controlnet import attach_controlnet
    from ddim_lab.models.loading import load_model

    if cfg.task in ("reconstruct", "edit") and cfg.metrics.lpips == "required":  # tasks that measure LPIPS
        from ddim_lab.metrics.image import LpipsUnavailable, lpips_backbone_path, lpips_missing_message

        if not lpips_backbone_path(cfg.metrics.lpips_net).exists():
            raise LpipsUnavailable(lpips_missing_message(cfg.metrics.lpips_net))
    claimed: tuple[bool, str | None] = (False, None)
    if rank == 0:
        try:
            claimed = (claim(run_dir, digest, list(overrides or [])), None)
        except RunDirConflict as err:
            claimed = (False, str(err))
    resumed, conflict = broadcast(claimed)
    if conflict:
        raise RunDirConflict(conflict)
    if resumed:
        log.info("resuming the unfinished run in %s", run_dir)
    if cfg.task == "alpha_plot" or (rank > 0 and cfg.task not in ("reconstruct", "edit")):
        return Prepared(run_dir, digest)  # no model: the plot reads the scheduler config; idle processes
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    slot = local_rank if world > 1 else job_num  # a GPU per process, or per job of a parallel sweep
    if slot is not None:
        device = pinned_device(str(cfg.runtime.device), slot, gpus)
        if device != cfg.runtime.device:
            log.info(
                "%s pinned to %s (%d GPUs visible)",
                f"process {rank}" if world > 1 else f"job {slot}",
                device,
                gpus,
            )
            cfg.runtime.device = device
    torch.manual_seed(int(as_list(cfg.seed)[0]))  # a seed list: its first
    model = load_model(cfg.model, cfg.runtime, cfg.cache.dir)
    model = attach_controlnet(model, cfg.controlnet, cfg.cache.dir)  # ConfigError when it does not fit
    if cfg.task in ("reconstruct", "edit"):  # what the config could not tell: a model=local directory's family
        check_editor_fits((cfg.get("editor") or {}).get("name", "prompt_swap"), model.name, model.family)
    return Prepared(run_dir, digest, model)


def work(job: Prepared, cfg: DictConfig, group: str | None = None, name: str | None = None) -> str:
    """Run the task of a prepared job: config and provenance first, then the task's results and logs."""
    import torch

    from ddim_lab.models.runtime import resolve_device
    from ddim_lab.study.loggers import open_logger
    from ddim_lab.study.provenance import provenance
    from ddim_lab.study.tasks import alpha_plot, text_to_image

    rank, _, _ = process_info()
    if rank > 0 and cfg.task not in ("reconstruct", "edit"):
        return "done"  # only reconstruct/edit split their images over processes; the main process does the rest
    run_dir = job.run_dir
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        device = str(resolve_device(cfg.runtime.device))
        write_json(run_dir / "provenance.json", provenance(device=device, dtype=cfg.runtime.dtype))
    torch.manual_seed(int(as_list(cfg.seed)[0]))  # a seed list: its first
    if cfg.task == "alpha_plot":
        alpha_plot(cfg, run_dir)
    else:
        logger_cfg = cfg.logger if rank == 0 else {"name": "local"}
        with open_logger(logger_cfg, resolved, run_dir, group, name) as logger:
            if cfg.task == "sample":
                text_to_image(cfg, job.model, run_dir, logger)
            elif cfg.task == "controlnet":
                from ddim_lab.study.controlnet_task import (
                    controlnet_task,  # imported by its task only (cv2 & co.)
                )

                controlnet_task(cfg, job.model, run_dir, logger)
            else:
                from ddim_lab.study.runner import reconstruct_or_edit

                reconstruct_or_edit(cfg, job.model, run_dir, logger)
    if rank == 0:
        mark_done(run_dir, job.digest, task=cfg.task)
        log.info("results in %s", run_dir)
    return "done"


def run(
    cfg: DictConfig,
    run_dir: Path,
    group: str | None = None,
    name: str | None = None,
    overrides: list[str] | None = None,
    job_num: int | None = None,
) -> str:
    """:func:`prepare` then :func:`work`; ``skipped`` when ``run_dir`` holds this config finished."""
    job = prepare(cfg, run_dir, job_num, overrides)
    return "skipped" if job is None else work(job, cfg, group, name)


def wandb_group(sweep_dir: str) -> str:
    """The W&B group of a sweep's jobs: the sweep directory's full path (unique across days and machines'
    runs of one project, unlike its time of day)."""
    return str(Path(sweep_dir).resolve())


def _plain_config(cfg: DictConfig) -> dict | None:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve: keep the raw values
        return OmegaConf.to_container(cfg, resolve=False)


def tune_objective(cfg: DictConfig, run_dir: Path) -> float:
    """The ``tune`` objective of the job in ``run_dir``, from the results table it wrote (config/tune.py)."""
    from ddim_lab.config.tune import TuneError, objective
    from ddim_lab.study.records import read_results

    table = read_results(run_dir)
    if table is None:
        raise TuneError(f"tune: no results table in {run_dir} to read the objective from")
    value = objective(table, OmegaConf.to_container(cfg.tune, resolve=True))
    log.info("tune objective %s = %.6g (from %s)", cfg.tune.metric, value, run_dir)
    return value


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def app(cfg: DictConfig) -> dict[str, Any] | float:
    """One job. Failures are recorded and logged on one line, never raised, so a sweep goes on. With a ``tune``
    block the job returns its objective (a number: what Hydra's Optuna sweeper maximises), not a status."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = wandb_group(hydra_cfg.sweep.dir) if multirun else None
    name = hydra_cfg.job.override_dirname or run_dir.name
    overrides = list(hydra_cfg.overrides.task)
    started = False
    try:
        job = prepare(cfg, run_dir, hydra_cfg.job.num if multirun else None, overrides)
        started = True
        status = "skipped" if job is None else work(job, cfg, group, name)
        if cfg.get("tune") is not None:
            return tune_objective(cfg, run_dir)
    except Exception as err:  # noqa: BLE001 - recorded in error.json with its traceback
        usage = is_usage_error(err)
        if isinstance(err, RunDirConflict):
            pass  # never write into (or remove) another run's directory
        elif not multirun and usage and not started:  # bad input, nothing done: no run directory left behind
            remove_unused_run_dir(run_dir, hydra_cfg)
        else:
            record_failure(run_dir, err, _plain_config(cfg), overrides)
        if usage:
            log.error("%s", one_line(err))
        else:
            log.error("%s: %s (traceback in %s)", type(err).__name__, one_line(err), run_dir / "error.json")
        log.debug("job failed", exc_info=err)
        if not multirun:
            OUTCOME.update(code=2 if usage else 1, failures=[one_line(err)])
        return {"status": "failed", "error": one_line(err), "usage": usage}
    return {"status": status}


def remove_unused_run_dir(run_dir: Path, hydra_cfg: DictConfig) -> None:
    """Remove the directory Hydra made for a run that failed before any work, when it holds nothing but Hydra's
    own files (its log, ``.hydra/``) and the run's claim: a rerun into it, or a resumed run, keeps it."""
    own = {f"{hydra_cfg.job.name}.log", str(hydra_cfg.output_subdir), JOB_JSON}
    if not run_dir.is_dir() or any(entry.name not in own for entry in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


# -- one-line errors for what Hydra rejects while composing (bad key, type, group option) ----------------
def _composition_error_line(err: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        choices = ", ".join(sorted(err.options))
        return f"unknown option {group}={option} ({err.missing_cfg_file}); choose one of: {choices}"
    parts = []
    cause: BaseException | None = err
    while cause is not None and len(parts) < 3:
        lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
        if lines:
            parts.append(lines[0])
        cause = cause.__cause__
    text = " ".join(dict.fromkeys(parts)) or type(err).__name__
    if "not in struct" in text or "not in 'LabConfig'" in text or "Key '" in text and "not" in text:
        text += " (misspelled? `ddim-lab --help` lists the keys)"
    return text


def _variants(overrides: list[str]) -> list[list[str]]:
    """Override lists covering every value of every discrete sweep once (the first values elsewhere)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base: list[str] = []
    sweeps: list[tuple[int, list[str]]] = []
    for override in parsed:
        if not override.is_sweep_override():
            base.append(override.input_line)
            continue
        if not override.is_discrete_sweep():
            continue  # interval(...) for an optimising sweeper: checked by the sweeper
        key = override.get_key_element()
        values = [f"{key}={v}" for v in override.sweep_string_iterator()]
        if values:
            sweeps.append((len(base), values))
            base.append(values[0])
    variants = [base]
    for index, values in sweeps:
        for value in values[1:]:
            variant = list(base)
            variant[index] = value
            variants.append(variant)
    return variants


def precheck(argv: list[str]) -> str | None:
    """Compose the config for every sweep value before Hydra starts; one error line, or None when fine."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    if args.config_path or args.config_name or args.config_dir or args.experimental_rerun:
        return None
    try:
        variants = _variants(list(args.overrides))
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="precheck"):
            configs = [compose(config_name="config", overrides=overrides) for overrides in variants]
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        line = _composition_error_line(err)
        if "num_steps" in line and any(o.startswith("budget.") for o in args.overrides):
            line += " (budget.nfe picks num_steps for each method: leave num_steps out)"
        return line
    try:
        for cfg in configs:
            check_budget_input(cfg)  # e.g. -m num_steps=10,20 beside budget.nfe: every job would fail
    except ConfigError as err:
        return str(err)
    return None


def _stderr_logging() -> None:
    """Hydra's console format, for messages logged before Hydra has configured logging."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
        )


MULTIRUN_FLAGS = ("-m", "--multirun")


def multirun_first(argv: list[str]) -> list[str]:
    """``-m``/``--multirun`` moved in front of the overrides: ``ddim-lab a=1 -m b=1,2`` means a sweep, where
    Hydra's parser (overrides are one positional list) would reject the overrides after the flag."""
    flags = [a for a in argv if a in MULTIRUN_FLAGS]
    return flags[:1] + [a for a in argv if a not in MULTIRUN_FLAGS]


INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def main() -> None:
    """Console entry point: exit code 0, 2 (config, model or data errors), 1 (other failures) or 130 (Ctrl-C:
    one line saying what is saved; the parts written so far stay valid and a rerun resumes)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv[1:] = multirun_first(sys.argv[1:])
    try:
        error = precheck(sys.argv[1:])
        if error is not None:
            _stderr_logging()
            log.error("%s", error)
            sys.exit(2)
        OUTCOME.update(code=0, failures=[])
        app()
    except KeyboardInterrupt as err:  # ddim_lab.study.runner.Interrupted says how many image groups are saved
        _stderr_logging()
        log.error("%s", str(err) or "interrupted; rerun the same command to resume")
        sys.exit(INTERRUPTED)
    if OUTCOME["code"]:
        sys.exit(OUTCOME["code"])


if __name__ == "__main__":
    main()
