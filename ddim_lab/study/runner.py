"""One run of the lab, as stages with one job each; this module reads the config once and calls them:

1. plan the grid (``plan``): guidance × start step × target prompt, each row's prompt, edit flag and seeds,
   the job's image groups;
2. get each image's inversion artifacts (``artifacts``): from the cache, else inverted (null-text's DDIM pivot
   memoised per group), the inverter and its plan built from one scheduler, which also feeds the denoiser;
3. sample every grid point of an image group as one batch of trajectories (``sampling``);
4. decode and score (``scoring``): the inputs' VAE round trip, the results against the inputs, the data set's
   scorers;
5. record (``recording``): the result rows and a labelled grid after every group (nothing is lost if a later
   group fails or Ctrl-C stops the run), mirrored to the logger; at the end the rows merged, the groups' grids
   stacked into one contact sheet (``grids=groups`` also keeps each group's grid as ``grid_NNN.png``) and the
   summary (``run.json``).

Network passes are counted by the denoiser and checked against the minimum each inverter states by formula
(``accounting``).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ddim_lab import schema
from ddim_lab.config.budget import apply_budget, chosen_steps, explicit_num_steps, grid_rows
from ddim_lab.config.compose import as_list
from ddim_lab.config.schema import CacheSchema, DataSchema, InversionSchema, MetricsSchema, RuntimeSchema
from ddim_lab.data.folders import Item, load_dataset, with_prompt
from ddim_lab.data.pie import is_pie_dir, load_pie
from ddim_lab.data.scoring import ScoringContext, make_scorers
from ddim_lab.engine.denoiser import UNetDenoiser
from ddim_lab.methods.control import control_settings, make_control
from ddim_lab.methods.control.base import ControlSignal, save_control_images
from ddim_lab.methods.editing import Editor, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import Cost
from ddim_lab.metrics.image import ImageMetrics
from ddim_lab.models.latent import LatentModel
from ddim_lab.study import accounting
from ddim_lab.study.accounting import Tally, peak_memory_mb
from ddim_lab.study.artifacts import Artifacts, InversionSettings, control_identity, model_identity
from ddim_lab.study.cache import InversionCache
from ddim_lab.study.conditioning import Conditioner
from ddim_lab.study.plan import Grid, GridPoint, GridSpec, image_groups, plan_points
from ddim_lab.study.protocol import Protocol
from ddim_lab.study.provenance import provenance
from ddim_lab.study.recording import (
    GroupResult,
    GroupsFailed,
    Interrupted,
    Recorder,
    contact_sheet,
    existing_grid,
    group_grid_path,
    groups_failed,
    merge_summaries,
    protocol_for,
    record_group_failure,
)
from ddim_lab.study.records import save_grid, tile_captions, write_results
from ddim_lab.study.sampling import Sampler, SamplingSettings
from ddim_lab.study.scoring import NonFiniteResult, decode_and_score, round_trip

__all__ = ["GridPoint", "GroupsFailed", "Interrupted", "NonFiniteResult", "Runner", "grid_points"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def section(kind: type[T], node: Any) -> T:
    """A config section as its schema dataclass (``kind``), interpolations resolved."""
    value = OmegaConf.to_object(node)
    return value if isinstance(value, kind) else kind(**value)


def grid_spec(cfg: DictConfig) -> GridSpec:
    """The grid settings of a reconstruct/edit config."""
    return GridSpec(
        task=cfg.task,
        edit_prompts=tuple(as_list(cfg.edit_prompt)),
        guidances=tuple(as_list(cfg.guidance_scale)),
        start_steps=tuple(as_list(cfg.start_step)),
        seed=first_seed(cfg),
        seeds=replicate_seeds(cfg),
    )


def replicate_seeds(cfg: DictConfig) -> tuple[int, ...]:
    """The replicate seeds of ``seed=[a, b, ...]`` (a grid dimension of stochastic methods); () for one seed."""
    seeds = as_list(cfg.seed)
    return tuple(int(s) for s in seeds) if len(seeds) > 1 else ()


def first_seed(cfg: DictConfig) -> int:
    """The run's seed: ``seed``, or the first of a seed list."""
    return int(as_list(cfg.seed)[0])


def grid_points(cfg: DictConfig, item_targets: bool = False) -> list[GridPoint]:
    """The grid points of a config (``plan.plan_points``)."""
    return plan_points(grid_spec(cfg), item_targets)


class Runner:
    """What a run shares across image groups — model, inverter, plan, denoiser, metrics, cache, the run's
    tally — and the stages built from the config once; ``run_group`` runs them on one image group."""

    def __init__(self, cfg: DictConfig, model: LatentModel) -> None:
        self.cfg = cfg
        self.model = model
        budgeted = OmegaConf.select(cfg, "budget.nfe") is not None
        if budgeted and not explicit_num_steps(cfg):  # the CLI applies it after validation; a bare config here
            apply_budget(cfg)
        self.scheduler = model.scheduler(**cfg.scheduler.overrides)
        self.inverter = make_inverter(OmegaConf.to_container(cfg.inverter, resolve=True))
        self.plan = self.inverter.plan(self.scheduler, cfg.num_steps)
        # every knob, sampling knobs too (the cache key leaves those out): rows of other values are never pooled
        self.knobs_json = json.dumps(asdict(self.inverter), sort_keys=True)
        self.denoiser: UNetDenoiser = model.denoiser(self.scheduler)
        if bool((self.plan.alpha == 0).any()) and self.denoiser.prediction_type == "epsilon":
            raise ValueError(
                "this schedule reaches ᾱ = 0 (zero terminal SNR), where an ε-predicting model cannot say x₀;"
                " use a v-prediction model or drop rescale_betas_zero_snr"
            )
        self.metric_settings = section(MetricsSchema, cfg.metrics)
        runtime = section(RuntimeSchema, cfg.runtime)
        self.metrics = ImageMetrics(self.metric_settings.lpips_net, self.metric_settings.lpips, model.device)
        cache = section(CacheSchema, cfg.cache)
        self.cache = InversionCache(Path(cache.dir) / "inversions" if cache.enabled else None)
        self.data = section(DataSchema, cfg.data)
        points = plan_points(grid_spec(cfg), item_targets=is_pie_dir(self.data.path))
        self.protocol: Protocol | None = None
        self.scorers = make_scorers(as_list(self.data.scorers), ScoringContext.of(cfg, model.device))
        identity = model_identity(model, OmegaConf.to_container(cfg.model, resolve=True), runtime)
        # ControlNet conditioning: each image's control image rides in Conditioning.extra["control"]
        control = (
            make_control(OmegaConf.to_container(cfg.control, resolve=True))
            if model.controlnet is not None
            else None
        )
        if control is not None:  # part of every cache key; unconditioned keys stay as they were
            identity.update(control_identity(control, cfg.controlnet.name, model))
        self.cond = Conditioner(model, cfg.negative_prompt, control)
        # "match": invert each image at every sampling guidance of the grid (what exact inverters need)
        inversion = section(InversionSchema, cfg.inversion).guidance_scale
        settings = InversionSettings(
            num_steps=cfg.num_steps,
            guidance=None if inversion == "match" else float(inversion),
            negative_prompt=cfg.negative_prompt,
            seed=first_seed(cfg),
            batch_size=cfg.batch_size,
            progress=runtime.progress,
        )
        # one artifact per (image, g) for guidance-dependent inverters and "match"
        per_guidance = self.inverter.guidance_dependent or settings.match
        per_seed = self.inverter.stochastic and bool(replicate_seeds(cfg))  # one artifact per replicate
        self.grid = Grid(tuple(points), first_seed(cfg), per_guidance, per_seed)
        self.tally = Tally()  # what the work done so far spent, and must cost by the inverter's formulas
        scheduler = self.scheduler.config
        self.artifact_stage = Artifacts(
            self.inverter, self.plan, scheduler, identity, settings, self.cache, self.cond, self.tally
        )
        sampling = SamplingSettings(float(cfg.eta), cfg.batch_size, runtime.progress)
        self.sampler = Sampler(self.grid, self.inverter, self.plan, model, self.cond, sampling, self.tally)
        shared = schema.config_values(cfg)  # the run-wide config columns of every row
        stochastic = cfg.eta > 0 or self.editor.stochastic  # rows name their trajectory's seed
        self.recorder = Recorder(
            self.grid, self.inverter, self.plan, settings, shared, self.knobs_json, stochastic
        )
        if budgeted:
            self.check_budget()

    @property
    def points(self) -> list[GridPoint]:
        return list(self.grid.points)

    @property
    def per_guidance(self) -> bool:
        return self.grid.per_guidance

    @property
    def evals(self) -> dict[str, int]:
        return self.tally.evals

    @property
    def minimum(self) -> Cost:
        return self.tally.minimum

    @property
    def control(self) -> ControlSignal | None:
        return self.cond.control

    @property
    def controls(self) -> dict[str, torch.Tensor]:
        return self.cond.controls

    def control_images(self, items: list[Item]) -> torch.Tensor:
        """Control images (B, 3, R, R) of ``items`` (``Conditioner.control_images``)."""
        return self.cond.control_images(items)

    @functools.cached_property
    def editor(self) -> Editor:
        """How edit trajectories are sampled (``cfg.editor``: prompt_swap, p2p)."""
        spec = OmegaConf.to_container(self.cfg.editor, resolve=True) if "editor" in self.cfg else None
        return make_editor(spec)

    def check_budget(self) -> None:
        """``budget.nfe``: the step count chosen from the config (``ddim_lab.config.budget``) must be the one
        this model's own scheduler and guidance mode give; raise ValueError otherwise."""
        scheduler = self.model.scheduler(**self.cfg.scheduler.overrides)  # not self.scheduler: plans set steps
        budget = int(self.cfg.budget.nfe)
        steps = chosen_steps(
            budget,
            self.inverter,
            self.editor,
            lambda n: self.inverter.plan(scheduler, n),
            grid_rows(self.cfg),
            float(self.cfg.eta),
            self.cost_guidance,
        )
        if steps != self.cfg.num_steps:
            raise ValueError(
                f"budget.nfe={budget}: this model gives inverter={self.inverter.name} num_steps={steps}, the"
                f" config gave num_steps={self.cfg.num_steps} (does model.family / model.guidance say what the"
                " model is? is num_steps set beside the budget?)"
            )

    def cost_guidance(self, guidance: float) -> float:
        """The guidance the cost formulas see on this run's denoiser (``accounting.cost_guidance``)."""
        return accounting.cost_guidance(self.denoiser, guidance)

    def inversion_key(
        self, item: Item, guidance: float | None = None, method: dict | None = None, seed: int | None = None
    ) -> str:
        """The cache key of ``item``'s artifact serving sampling guidance ``guidance`` (``seed``: a replicate's)
        (``Artifacts.key``)."""
        return self.artifact_stage.key(item, guidance, method, seed)

    # -- the stages on one image group --------------------------------------------------------------------
    def artifacts(self, items: list[Item], x0: torch.Tensor) -> tuple[dict, dict]:
        """Stage 2: each image's artifact per guidance it serves ({(i, g): artifact}) and what it costs
        ({(i, g): (Cost, cached)}); g = None where one artifact serves every guidance."""
        return self.artifact_stage(items, x0, self.grid.slots(), self.denoiser, self.cost_guidance)

    def sample_grid(self, items: list[Item], artifacts: dict, first_index: int = 0) -> torch.Tensor:
        """Stage 3: final latents (len(items) × len(points), C, h, w), rows ordered image-major."""
        return self.sampler(items, artifacts, first_index, self.denoiser, self.editor, self.cost_guidance)

    def run_group(self, items: list[Item], first_index: int = 0) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """Result rows and the images for the grid of one group of items (``first_index``: the first one's
        position in the data set, for per-trajectory seeds)."""
        start = time.perf_counter()
        inputs = round_trip(self.model, self.metrics, items)
        artifacts, costs = self.artifacts(items, inputs.x0)
        out = self.sample_grid(items, artifacts, first_index)
        scores = decode_and_score(self.model, self.metrics, self.scorers, self.grid, items, inputs, out)
        seconds = (time.perf_counter() - start) / (len(items) * len(self.grid.points))
        memory = peak_memory_mb(self.model.device)
        group = GroupResult(items, first_index, inputs, artifacts, costs, scores, seconds, memory)
        rows = self.recorder.rows(group, self.editor, self.cost_guidance, self.protocol)
        control = self.control
        controls = None if control is None else (f"control: {control.name}", self.control_images(items))
        return rows, self.recorder.columns(group, controls)

    def set_protocol(self, items: list[Item]) -> None:
        """The evaluation protocol of a run on annotated (PIE-Bench-format) data: what makes its numbers
        comparable; other data leaves it as it is."""
        benchmark = Path(str(self.data.path)).name
        mask_use = "input" if self.editor.uses_data_mask else "score-only"  # e.g. kv_edit's PIE masks
        protocol = protocol_for(
            items, benchmark, self.model.resolution, self.metric_settings.lpips_net, mask_use
        )
        if protocol is not None:
            self.protocol = protocol

    def summary(self, images: int) -> dict[str, Any]:
        """run.json: network passes spent against the inverter's minimum, time and memory."""
        device = self.model.device
        return self.recorder.summary(self.tally, self.editor, self.protocol, self.scorers, images, device)


def load_items(cfg: DictConfig, resolution: int) -> list[Item]:
    """The run's images: a PIE-Bench-format folder (``mapping_file.json``) gives items with their edit
    annotation (target prompt, mask, blended words); anything else goes through ``data.load_dataset``.
    ``data.captions=false``: every image's source prompt is ``prompt`` instead of its caption."""
    if is_pie_dir(cfg.data.path):
        items = load_pie(cfg.data.path, resolution, cfg.data.get("categories"))
        return items if cfg.data.captions else with_prompt(items, cfg.prompt, cfg.data.path)
    return load_dataset(cfg.data.path, resolution, cfg.prompt, captions=cfg.data.captions)


def reconstruct_or_edit(cfg: DictConfig, model: LatentModel, run_dir: Path, logger) -> pd.DataFrame:
    """Tasks ``reconstruct`` and ``edit``: invert every image, then sample every grid point.

    Each image group's rows are written once, atomically, as a part (``parts/g<N>-<images>.parquet``, after
    its grid image); a rerun of the same config skips the groups whose part exists. Under ``accelerate
    launch`` process r of W takes groups r, r + W, …; the main process merges the parts of every group into
    ``results.parquet``/``results.csv`` at the end, the table one process would write.
    """
    from ddim_lab.study.distributed import barrier, gather, my_share, process_info
    from ddim_lab.study.records import part_names, read_parts, write_part

    runner = Runner(cfg, model)
    items = load_items(cfg, model.resolution)
    runner.set_protocol(items)
    log.info(
        "%d images × %d grid points (%s, %s, %d steps)",
        len(items),
        len(runner.points),
        cfg.inverter.name,
        cfg.scheduler.name,
        cfg.num_steps,
    )
    rank, world, _ = process_info()
    groups = image_groups(items, cfg.batch_size, len(runner.points))  # images whose trajectories share calls
    names = [g.name for g in groups]
    finished = part_names(run_dir)
    mine = my_share(len(groups), rank, world)
    todo = [n for n in mine if names[n] not in finished]
    if len(todo) < len(mine):
        log.info("%d of %d image groups already done: skipped", len(mine) - len(todo), len(mine))
    computed = 0
    grids = [group_grid_path(run_dir, g.index, g.name, cfg.get("grids", "sheet")) for g in groups]
    try:
        for n in todo:
            first, part = groups[n].first, groups[n].items
            try:
                new_rows, columns = runner.run_group(part, first)
            except (RuntimeError, ValueError, NonFiniteResult) as err:  # out of memory, NaN, a bad image
                record_group_failure(run_dir, n, part, err)  # this group only
                continue
            if runner.control is not None:  # control settings in the rows, control images beside the results
                new_rows = [{**r, **control_settings(cfg)} for r in new_rows]
                save_control_images(run_dir / "controls", [it.name for it in part], runner.control_images(part))
            grid = save_grid(
                grids[n],
                list(columns.items()),
                [f"{it.name}: {it.prompt}" for it in part],
                captions=tile_captions(list(columns), new_rows, len(part)),  # each tile's PSNR under it
            )
            write_part(new_rows, run_dir, names[n])  # the group is done once its part exists
            if cfg.get("grids", "sheet") == "groups":
                logger.log_image(grid, f"images {first}–{first + len(part) - 1}")
            computed += len(part)
            log.info("images %d/%d done", first + len(part), len(items))
    except KeyboardInterrupt:  # Ctrl-C: every finished group's part is saved; say how many
        raise Interrupted(len(part_names(run_dir) & set(names)), len(names)) from None
    summaries = gather({**runner.summary(computed), "groups_skipped": len(mine) - len(todo)})
    barrier()
    done = part_names(run_dir)
    missing = [name for name in names if name not in done]
    merged = read_parts(run_dir, [name for name in names if name in done])
    if rank > 0:
        if missing:
            raise groups_failed(run_dir, len(missing))
        return merged
    table = write_results(merged.to_dict("records"), run_dir)  # results.parquet/.csv: the parts merged
    if not missing:
        contact_sheet(run_dir, [existing_grid(run_dir, n, name) for n, name in enumerate(names)], logger)
    summary = merge_summaries(summaries)  # counts add up over the processes
    summary["processes"] = world
    summary["failed_groups"] = len(missing)
    summary["provenance"] = provenance(device=str(model.device), dtype=cfg.runtime.dtype)
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
    log.info("model evaluations: %(unet_evals)d (minimum %(minimum_unet_evals)d)", summary)
    logger.log_rows(table)
    if missing:  # the finished groups are saved; a rerun computes only the failed ones
        raise groups_failed(run_dir, len(missing), len(names), len(merged))
    return table
