"""One run of the lab, as numbered steps:

1. load the model, build the inverter (``cfg.inverter``) and its plan from one scheduler, which also feeds
   the denoiser (its ᾱ and prediction type);
2. for each group of images: encode (posterior mean), VAE round-trip, take each image's inversion artifact
   from the cache or compute it, sample every grid point (guidance × start step × target prompt) as one
   batched set of trajectories through the inverter's sampler, decode, measure against the input, record;
3. write the result rows and a labelled grid after every group (nothing is lost if a later group fails or
   Ctrl-C stops the run), mirror to the logger; at the end, merge the rows and stack the groups' grids into
   one contact sheet (``grids=groups`` also keeps each group's grid as ``grid_NNN.png``).

Network passes are counted by the denoiser and checked against the minimum each inverter states by formula.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ddim_lab import schema
from ddim_lab.config.budget import RowPoint, apply_budget, chosen_steps, explicit_num_steps, grid_rows, row_cost
from ddim_lab.config.core import as_list
from ddim_lab.data.folders import Item, load_dataset, with_prompt
from ddim_lab.data.pie import PieItem, is_pie_dir, load_pie
from ddim_lab.data.scoring import ScoreBatch, ScoringContext, make_scorers, score_rows, scorer_summary
from ddim_lab.engine.denoiser import Conditioning, UNetDenoiser
from ddim_lab.methods.control import control_settings, make_control
from ddim_lab.methods.control.base import save_control_images
from ddim_lab.methods.editing import Editor, EditPrompts, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import Artifact, Cost, InvertContext, SampleRows
from ddim_lab.methods.inversion.ddim import DDIMInversion
from ddim_lab.metrics.image import ImageMetrics, mse
from ddim_lab.models.loading import LatentModel
from ddim_lab.study.cache import InversionCache, inversion_key
from ddim_lab.study.protocol import Protocol
from ddim_lab.study.provenance import provenance
from ddim_lab.study.records import VAE_COLUMN, save_grid, tile_captions, write_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridPoint:
    """One sampling configuration applied to every image."""

    guidance: float
    start_step: int
    target: str | None  # edit prompt; None reconstructs with the image's own prompt
    from_item: bool = False  # edit to each image's own target prompt (PIE-Bench data)

    @property
    def label(self) -> str:
        what = "target" if self.from_item else "recon" if self.target is None else self.target
        return f"g={self.guidance:g} k={self.start_step} {what}"


def grid_points(cfg: DictConfig, item_targets: bool = False) -> list[GridPoint]:
    """The product guidance × start step × target of one job; ``item_targets``: an edit without
    ``edit_prompt`` on annotated data edits each image to its own target prompt."""
    targets = as_list(cfg.edit_prompt) if cfg.task == "edit" else [None]
    own = item_targets and cfg.task == "edit" and not targets
    return [
        GridPoint(float(g), int(k), t, from_item=own)
        for t, g, k in itertools.product(
            targets or [None], as_list(cfg.guidance_scale), as_list(cfg.start_step)
        )
    ]


# model options that only label a model: what it computes never depends on them
DESCRIPTIVE_MODEL_KEYS = frozenset({"name"})


def model_identity(model: LatentModel, cfg: DictConfig) -> dict[str, Any]:
    """What determines the model's outputs: every option of the resolved model config except the descriptive
    ones (so a new option enters the cache key by itself: ``t5``, ``guidance``, ``resolution``, a built model's
    recipe, ...), the weights' revision (hub commit or file fingerprint), the runtime dtype and ``vae_fp32``."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    return {
        "model": {k: v for k, v in spec.items() if k not in DESCRIPTIVE_MODEL_KEYS},
        "revision": model.revision,
        "dtype": cfg.runtime.dtype,
        "vae_fp32": cfg.runtime.vae_fp32,
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _stack(artifacts: list[Artifact]) -> Artifact:
    """Per-image artifacts (no batch dim) → one batched artifact (B, ...)."""
    return {k: torch.stack([a[k] for a in artifacts]) for k in artifacts[0]}


class Runner:
    """Holds what a run shares across image groups: model, inverter, plan, denoiser, metrics, cache."""

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
        self.metrics = ImageMetrics(cfg.metrics.lpips_net, cfg.metrics.lpips, model.device)
        self.cache = InversionCache(Path(cfg.cache.dir) / "inversions" if cfg.cache.enabled else None)
        self.points = grid_points(cfg, item_targets=is_pie_dir(cfg.data.path))
        self.protocol: Protocol | None = None
        self.scorers = make_scorers(as_list(cfg.data.get("scorers")), ScoringContext.of(cfg, model.device))
        self.identity = model_identity(model, cfg)
        # ControlNet conditioning: each image's control image rides in Conditioning.extra["control"]
        self.control = (
            make_control(OmegaConf.to_container(cfg.control, resolve=True))
            if model.controlnet is not None
            else None
        )
        self.controls: dict[str, torch.Tensor] = {}  # item name → control image (3, R, R)
        if self.control is not None:  # part of every cache key; unconditioned keys stay as they were
            self.identity.update(
                control=self.control.key(),
                controlnet=cfg.controlnet.name,
                controlnet_revision=model.controlnet_revision,
                controlnet_scale=model.controlnet_scale,
            )
        # "match": invert each image at every sampling guidance of the grid (what exact inverters need)
        self.match = cfg.inversion.guidance_scale == "match"
        self.inversion_guidance = None if self.match else float(cfg.inversion.guidance_scale)
        self.per_guidance = self.inverter.guidance_dependent or self.match  # one artifact per (image, g)
        self.evals = {
            "inversion": 0,
            "inversion_backwards": 0,
            "sampling": 0,
            "inversions_computed": 0,
            "inversions_cached": 0,
            "pivots_computed": 0,
        }
        self.minimum = Cost()  # what the work done so far must cost, by the inverter's formulas
        self._pivots: dict[str, Artifact] = {}  # the group's DDIM pivots by cache key (``artifacts``)
        self.started = time.perf_counter()
        if budgeted:
            self.check_budget()

    def check_budget(self) -> None:
        """``budget.nfe``: the step count chosen from the config (``ddim_lab.config.budget``) must be the one this
        model's own scheduler and guidance mode give; raise ValueError otherwise."""
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
        """The guidance the cost formulas see: a model with embedded guidance (FLUX.1-dev) takes the scale as an
        input and spends one pass per row at any guidance, as classifier-free guidance does at 1."""
        return 1.0 if getattr(self.denoiser, "guidance", "cfg") == "embedded" else float(guidance)

    # -- step 2a: inversion artifacts, from the cache when possible --------------------------------
    def inversion_guidance_for(self, guidance: float | None) -> float:
        """The guidance an artifact serving sampling guidance ``guidance`` is inverted at."""
        return float(guidance) if self.match else self.inversion_guidance

    def inversion_key(self, item: Item, guidance: float | None = None, method: dict | None = None) -> str:
        """The cache key of ``item``'s artifact (or, with ``method``, of its DDIM pivot) serving sampling
        guidance ``guidance``: everything that determines it and nothing else."""
        inverter = self.inverter if method is None else DDIMInversion()
        fields: dict[str, Any] = {
            "image": item.content_hash,
            **self.identity,
            "scheduler": dict(self.scheduler.config),
            "inverter": method or inverter.key(),
            "num_steps": self.cfg.num_steps,
            "inversion_guidance": self.inversion_guidance_for(guidance),
            "prompt": item.prompt,
            "negative_prompt": self.cfg.negative_prompt,
        }
        if inverter.stochastic:
            fields["seed"] = int(self.cfg.seed)
        if inverter.guidance_dependent and method is None:
            fields["guidance"] = float(guidance)
        return inversion_key(**fields)

    def control_images(self, items: list[Item]) -> torch.Tensor:
        """Control images (B, 3, R, R) of ``items``, computed once per image from its preprocessed pixels."""
        todo = list({it.name: it for it in items if it.name not in self.controls}.values())
        if todo:
            made = self.control(torch.stack([it.image for it in todo]), [it.name for it in todo])
            self.controls.update({it.name: c for it, c in zip(todo, made, strict=True)})
        return torch.stack([self.controls[it.name] for it in items])

    def cond(self, prompts: list[str], guidance: list[float], items: list[Item] | None = None) -> Conditioning:
        """Row-aligned conditioning; with a ControlNet, ``items`` (each row's image) give the control rows."""
        extra = {}
        if self.control is not None:
            if items is None:
                raise ValueError("a ControlNet run needs each row's image for its control image")
            extra["control"] = self.control_images(items).to(self.model.device)
        return self.model.conditioning(prompts, guidance, self.cfg.negative_prompt, extra)

    def _through_cache(
        self, keys: list[str], meta: Callable[[int], dict], compute: Callable[[list[int]], Artifact]
    ) -> tuple[list[Artifact], list[int]]:
        """The artifacts named by ``keys``: loaded from the cache, the missing ones computed in one batch by
        ``compute(todo)`` (a batched artifact, one row per index in ``todo``) and saved with ``meta(j)``.

        Returns the artifacts (rows without batch dim) and ``todo``, the indices that were computed.
        """
        found = [self.cache.load(k) for k in keys]
        todo = [j for j, a in enumerate(found) if a is None]
        if todo:
            art = compute(todo)
            for n, j in enumerate(todo):
                found[j] = {k: v[n].detach().cpu() for k, v in art.items()}
                self.cache.save(keys[j], found[j], meta(j))
        return found, todo

    def _pivot(self, items: list[Item], x0: torch.Tensor, guidance: float | None, spent: dict[int, Cost]):
        """rows → DDIM trajectories (b, M+1, C, h, w) of those items (null-text's pivot): from the group's memo
        (``self._pivots``), else through the cache, else computed.

        The pivot depends on the image and the inversion guidance only, so each is computed at most once per
        group, cache or not, however many sampling guidances ask for it; the minimum counts it once by formula.
        What computing a pivot cost is added to ``spent[row]`` (the artifact that first needed it).
        """
        inversion_guidance = self.inversion_guidance_for(guidance)
        method = DDIMInversion()

        def pivot(rows: torch.Tensor) -> torch.Tensor:
            keys = [self.inversion_key(items[int(r)], guidance, method=method.key()) for r in rows]
            new = [j for j, key in enumerate(keys) if key not in self._pivots]  # not yet met in this group
            new_rows = rows[new]  # (n,)
            new_items = [items[int(r)] for r in new_rows]

            def compute(todo: list[int]) -> Artifact:
                todo_items = [new_items[j] for j in todo]
                cond = self.cond([it.prompt for it in todo_items], [inversion_guidance] * len(todo), todo_items)
                ctx = InvertContext(batch_size=self.cfg.batch_size, progress=self.cfg.runtime.progress)
                return method.invert(self.denoiser, x0[new_rows[todo]], self.plan, cond, ctx)

            found, todo = self._through_cache(
                [keys[j] for j in new], lambda j: {"image": new_items[j].name, "pivot": True}, compute
            )
            self._pivots.update({keys[j]: art for j, art in zip(new, found, strict=True)})
            one = method.inversion_cost(self.plan, {}, 1.0, self.cost_guidance(inversion_guidance))
            for j in todo:  # one per image and inversion guidance: the memo never lets a key come back here
                row = int(new_rows[j])
                spent[row] = spent.get(row, Cost()) + one
                self.minimum += one
            self.evals["pivots_computed"] += len(todo)
            return torch.stack([self._pivots[key]["trajectory"] for key in keys]).to(x0.device)

        return pivot

    def _invert(self, items: list[Item], x0: torch.Tensor, g: float | None, spent: dict[int, Cost]) -> Artifact:
        """The inverter's artifacts of ``items`` (x0 their latents) for sampling guidance ``g``, batched."""
        ctx = InvertContext(
            guidance=1.0 if g is None else g,
            generators=[torch.Generator().manual_seed(self.image_seed(it)) for it in items],
            batch_size=self.cfg.batch_size,
            progress=self.cfg.runtime.progress,
            pivot=self._pivot(items, x0, g, spent),
        )
        cond = self.cond([it.prompt for it in items], [self.inversion_guidance_for(g)] * len(items), items)
        fwd, bwd = self.denoiser.unet_evals, self.denoiser.unet_backwards
        art = self.inverter.invert(self.denoiser, x0, self.plan, cond, ctx)
        self.evals["inversion"] += self.denoiser.unet_evals - fwd
        self.evals["inversion_backwards"] += self.denoiser.unet_backwards - bwd
        self.evals["inversions_computed"] += len(items)
        return art

    def artifacts(self, items: list[Item], x0: torch.Tensor) -> tuple[dict, dict]:
        """Each image's artifact per guidance it serves ({(i, g): artifact}), and what it costs
        ({(i, g): (Cost, cached)}), the pivot this run computed for it included.

        Guidance-independent inverters have one artifact per image, under g = None. A cached artifact is
        reported at its formula cost (what computing it costs), flagged cached; it adds nothing to the run's
        minimum.
        """
        guidances = sorted({p.guidance for p in self.points}) if self.per_guidance else [None]
        self._pivots = {}  # pivots are shared by the guidances of this group only
        found: dict[tuple[int, float | None], Artifact] = {}
        costs: dict[tuple[int, float | None], Cost] = {}
        for g in guidances:
            spent: dict[int, Cost] = {}  # pivot costs, by position in ``todo``
            arts, todo = self._through_cache(
                [self.inversion_key(it, g) for it in items],
                lambda i: {"image": items[i].name, "prompt": items[i].prompt},
                lambda todo, g=g, spent=spent: self._invert([items[i] for i in todo], x0[todo], g, spent),
            )
            self.evals["inversions_cached"] += len(items) - len(todo)
            inverted_at = self.cost_guidance(self.inversion_guidance_for(g))
            for i, art in enumerate(arts):  # every artifact at its formula cost; computed ones unflag below
                cost = self.inverter.inversion_cost(self.plan, art, 1.0 if g is None else g, inverted_at)
                found[i, g], costs[i, g] = art, (cost, True)
            for n, i in enumerate(todo):
                cost = costs[i, g][0]
                self.minimum += cost
                costs[i, g] = (cost + spent.get(n, Cost()), False)
        return found, costs

    def image_seed(self, item: Item) -> int:
        """The seed a stochastic inverter draws one image's noise from: the run's seed and the image's content,
        so images differ from each other and an image draws the same alone or in any batch."""
        return (int(self.cfg.seed) * 1_000_003 + int(item.content_hash[:12], 16)) % 2**63

    # -- step 2b: every grid point of every image, batched -----------------------------------------
    def target(self, item: Item, point: GridPoint) -> str | None:
        """The prompt a trajectory samples with when it is an edit (None: reconstruction)."""
        if point.from_item:
            return item.target_prompt if isinstance(item, PieItem) else None
        return point.target

    def is_edit(self, item: Item, point: GridPoint) -> bool:
        target = self.target(item, point)
        return target is not None and target != item.prompt

    def sample_seed(self, image_index: int, point_index: int) -> int:
        """The seed of one stochastic trajectory: distinct per (image, grid point), stable across groups."""
        return int(self.cfg.seed) + image_index * len(self.points) + point_index

    @functools.cached_property
    def editor(self) -> Editor:
        """How edit trajectories are sampled (``cfg.editor``: prompt_swap, p2p)."""
        spec = OmegaConf.to_container(self.cfg.editor, resolve=True) if "editor" in self.cfg else None
        return make_editor(spec)

    def sample_grid(self, items: list[Item], artifacts: dict, first_index: int = 0) -> torch.Tensor:
        """Final latents (len(items) × len(points), C, h, w), rows ordered image-major."""
        rows = list(itertools.product(range(len(items)), enumerate(self.points)))
        artifact = _stack([artifacts[i, p.guidance if self.per_guidance else None] for i, (_, p) in rows])
        guidance = [p.guidance for _, (_, p) in rows]
        stochastic = self.cfg.eta > 0
        gens = (
            [torch.Generator().manual_seed(self.sample_seed(first_index + i, j)) for i, (j, _) in rows]
            if stochastic
            else None
        )
        batch = SampleRows(
            artifact={k: v.to(self.model.device) for k, v in artifact.items()},
            cond=self.cond(
                [self.target(items[i], p) or items[i].prompt for i, (_, p) in rows],
                guidance,
                [items[i] for i, _ in rows],
            ),
            source=self.cond([items[i].prompt for i, _ in rows], guidance, [items[i] for i, _ in rows]),
            start=torch.tensor([p.start_step for _, (_, p) in rows]),
            edit=torch.tensor([self.is_edit(items[i], p) for i, (_, p) in rows]),
            generators=gens,
        )
        prompts = EditPrompts(
            source=[items[i].prompt for i, _ in rows],
            target=[self.target(items[i], p) or items[i].prompt for i, (_, p) in rows],
            blended=[getattr(items[i], "blended_words", None) for i, _ in rows],
            tokenizer=getattr(self.model.pipe, "tokenizer", None),
        )
        before = self.denoiser.unet_evals
        out = self.editor.sample(
            self.inverter,
            self.denoiser,
            self.plan,
            batch,
            prompts,
            eta=float(self.cfg.eta),
            batch_size=self.cfg.batch_size,
            progress=self.cfg.runtime.progress,
        )
        self.evals["sampling"] += self.denoiser.unet_evals - before
        for n, (_, (_, p)) in enumerate(rows):
            self.minimum += self.editor.trajectory_cost(
                self.inverter, self.plan, p.start_step, self.cost_guidance(p.guidance), bool(batch.edit[n])
            )
        return out

    def run_group(self, items: list[Item], first_index: int = 0) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """Result rows and the images for the grid of one group of items (``first_index``: the first one's
        position in the data set, for per-trajectory seeds)."""
        start = time.perf_counter()
        cfg = self.cfg
        images = torch.stack([it.image for it in items])  # (G, 3, R, R) in [0, 1]
        x0 = self.model.encode(images)  # (G, C, h, w)
        vae_images = self.model.decode(x0)
        vae_scores = self.metrics(vae_images, images)
        artifacts, costs = self.artifacts(items, x0)
        out = self.sample_grid(items, artifacts, first_index)
        if not bool(torch.isfinite(out).all()):
            bad = sorted(
                {
                    items[r // len(self.points)].name
                    for r in (~torch.isfinite(out)).flatten(1).any(1).nonzero().flatten().tolist()
                }
            )
            raise NonFiniteResult(f"sampling gave NaN/inf latents for {', '.join(bad)}")
        results = self.model.decode(out)  # (G·P, 3, R, R)
        P = len(self.points)
        scores = self.metrics(results, images.repeat_interleave(P, dim=0))
        latent_err = mse(out.cpu(), x0.cpu().repeat_interleave(P, dim=0))
        edit_scores = self.edit_scores(items, images, results)
        seconds = (time.perf_counter() - start) / (len(items) * P)
        memory = peak_memory_mb(self.model.device)
        shared = schema.config_values(cfg)
        rows = []
        for r, (i, (j, p)) in enumerate(itertools.product(range(len(items)), enumerate(self.points))):
            cost, cached = costs[i, p.guidance if self.per_guidance else None]
            edit = self.is_edit(items[i], p)
            rows.append(
                schema.row(
                    **shared,
                    image=items[i].name,
                    prompt=items[i].prompt,
                    edit_prompt=self.target(items[i], p) or "",  # empty = reconstruction, as the README says
                    inverter_knobs=self.knobs_json,
                    inversion_guidance_scale=self.inversion_guidance_for(p.guidance),
                    guidance_scale=p.guidance,
                    start_step=p.start_step,
                    psnr=float(scores["psnr"][r]),
                    ssim=float(scores["ssim"][r]),
                    lpips=float(scores["lpips"][r]),
                    latent_mse=float(latent_err[r]),
                    vae_psnr=float(vae_scores["psnr"][i]),
                    vae_lpips=float(vae_scores["lpips"][i]),
                    unet_evals=self.editor.trajectory_cost(
                        self.inverter, self.plan, p.start_step, self.cost_guidance(p.guidance), edit
                    ).forwards,
                    **self.editor.row_fields(),
                    inversion_unet_evals=cost.forwards,
                    inversion_unet_backwards=cost.backwards,
                    inversion_cached=cached,
                    nfe=row_cost(
                        self.inverter,
                        self.editor,
                        self.plan,
                        artifacts[i, p.guidance if self.per_guidance else None],
                        RowPoint(p.guidance, self.inversion_guidance_for(p.guidance), p.start_step, edit),
                        self.cost_guidance,
                    ).forwards,
                    sample_seed=self.sample_seed(first_index + i, j) if cfg.eta > 0 else None,
                    seconds=seconds,
                    peak_memory_mb=memory,
                    protocol=None if self.protocol is None else self.protocol.id(),
                    **{k: v[r] for k, v in edit_scores.items()},
                )
            )
        columns = {"input": images, VAE_COLUMN: vae_images}
        if self.control is not None:
            columns[f"control: {self.control.name}"] = self.control_images(items)
        for j, p in enumerate(self.points):
            columns[p.label] = results[j::P]
        return rows, columns

    # -- step 2c: the protocol of annotated (PIE-Bench-format) data, the data set's scores -------------
    def set_protocol(self, items: list[Item]) -> None:
        """The evaluation protocol of a run on annotated data: what makes its numbers comparable."""
        if not items or not all(isinstance(it, PieItem) for it in items):
            return
        self.protocol = Protocol.for_images(
            [it.name for it in items],
            benchmark=Path(str(self.cfg.data.path)).name,
            resolution=self.model.resolution,
            lpips_net=self.cfg.metrics.lpips_net,
        )

    def edit_scores(self, items: list[Item], images: torch.Tensor, results: torch.Tensor) -> dict[str, list]:
        """Per-row columns of the data set's scorers (``data.scorers``, ``ddim_lab.data.scoring``), image-major like
        the results: each row's result, input, item, target prompt and whether it is an edit."""
        pairs = list(itertools.product(items, self.points))
        batch = ScoreBatch(
            results=results,
            prompts=[self.target(it, p) or it.prompt for it, p in pairs],
            sources=images.repeat_interleave(len(self.points), dim=0),
            items=[it for it, _ in pairs],
            edits=[self.is_edit(it, p) for it, p in pairs],
        )
        return score_rows(self.scorers, batch)

    def summary(self, images: int) -> dict[str, Any]:
        """run.json: network passes spent against the inverter's minimum, time and memory."""
        extra = {}
        if self.protocol is not None:  # annotated data: its protocol and the scorers' counts (empty regions)
            extra = {"protocol": self.protocol.fields(), **scorer_summary(self.scorers)}
        return {
            **extra,
            **self.evals,
            "inverter": self.inverter.name,
            "inverter_knobs": asdict(self.inverter),
            "formula": self.inverter.formula,
            "editor": {"name": self.editor.name, **self.editor.knobs()},
            "unet_evals": self.evals["inversion"] + self.evals["sampling"],
            "unet_backwards": self.evals["inversion_backwards"],
            "minimum_unet_evals": self.minimum.forwards,
            "minimum_unet_backwards": self.minimum.backwards,
            "images": images,
            "grid_points": len(self.points),
            "seconds": time.perf_counter() - self.started,
            "peak_memory_mb": peak_memory_mb(self.model.device),
        }


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
    from ddim_lab.study.records import part_name, part_names, read_parts, write_part

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
    group = max(1, cfg.batch_size // len(runner.points))  # images whose trajectories share UNet calls
    firsts = list(range(0, len(items), group))
    keys = [f"{it.name}\t{getattr(it, 'content_hash', '')}\t{it.prompt}" for it in items]  # what a group holds
    names = [part_name(n, keys[first : first + group]) for n, first in enumerate(firsts)]
    finished = part_names(run_dir)
    mine = my_share(len(firsts), rank, world)
    todo = [n for n in mine if names[n] not in finished]
    if len(todo) < len(mine):
        log.info("%d of %d image groups already done: skipped", len(mine) - len(todo), len(mine))
    computed = 0
    grids = [group_grid_path(run_dir, n, names[n], cfg.get("grids", "sheet")) for n in range(len(names))]
    try:
        for n in todo:
            first = firsts[n]
            part = items[first : first + group]
            try:
                new_rows, columns = runner.run_group(part, first)
            except (
                RuntimeError,
                ValueError,
                NonFiniteResult,
            ) as err:  # out of memory, NaN, a bad image: this group only
                record_group_failure(run_dir, n, part, err)
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
            raise GroupsFailed(f"{len(missing)} image group(s) failed; see {run_dir / GROUP_ERRORS}")
        return merged
    table = write_results(merged.to_dict("records"), run_dir)  # results.parquet/.csv: the parts merged
    if not missing:
        contact_sheet(run_dir, [existing_grid(run_dir, n, name) for n, name in enumerate(names)], logger)
    summary = summaries[0]
    if world > 1:  # counts add up over the processes
        for other in summaries[1:]:
            for key, value in other.items():
                if isinstance(value, int) and not isinstance(value, bool) and key != "grid_points":
                    summary[key] = summary.get(key, 0) + value
    summary["processes"] = world
    summary["failed_groups"] = len(missing)
    summary["provenance"] = provenance(device=str(model.device), dtype=cfg.runtime.dtype)
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
    log.info("model evaluations: %(unet_evals)d (minimum %(minimum_unet_evals)d)", summary)
    logger.log_rows(table)
    if missing:  # the finished groups are saved; a rerun computes only the failed ones
        raise GroupsFailed(
            f"{len(missing)} of {len(names)} image group(s) failed ({len(merged)} rows saved); see"
            f" {run_dir / GROUP_ERRORS}; rerun the same command to retry them"
        )
    return table


GROUP_ERRORS = "group_errors.jsonl"
SHEET = "grid_sheet.png"  # a job's contact sheet: every image group's grid rows under one header


def group_grid_path(run_dir: Path, n: int, part: str, grids: str) -> Path:
    """Where image group ``n`` (part ``part``) saves its grid: ``grid_NNN.png`` with ``grids=groups``, else
    beside its rows in ``parts/`` (what the contact sheet is made of)."""
    from ddim_lab.study.records import parts_dir

    return run_dir / f"grid_{n:03d}.png" if grids == "groups" else parts_dir(run_dir) / f"{part}.png"


def existing_grid(run_dir: Path, n: int, part: str) -> Path | None:
    """Image group ``n``'s saved grid, wherever an attempt with either ``grids`` setting put it."""
    paths = [group_grid_path(run_dir, n, part, grids) for grids in ("groups", "sheet")]
    return next((p for p in paths if p.exists()), None)


def contact_sheet(run_dir: Path, grids: list[Path | None], logger) -> None:
    """``grid_sheet.png``: the groups' grids under one header (as many as a viewable picture holds), mirrored
    to the logger; kept as it is when some group's grid is missing."""
    from ddim_lab.study.records import stack_grids

    if not grids or any(g is None for g in grids):
        log.warning("no contact sheet: %d of %d image groups have no saved grid", grids.count(None), len(grids))
        return
    made = stack_grids(grids, run_dir / SHEET)
    if made is None:
        return
    path, shown, total = made
    if shown < total:
        log.info("%s shows the first %d of %d images; each group's grid: %s, …", SHEET, shown, total, grids[0])
    logger.log_image(path, f"contact sheet: {shown} of {total} images")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job's image groups: how many groups have their rows saved (a rerun does the rest)."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} image groups; rerun the same command to resume")
        self.done, self.total = done, total


class NonFiniteResult(RuntimeError):
    """Sampling produced NaN or infinite latents for an image group."""


class GroupsFailed(RuntimeError):
    """Some image groups of a job failed; the others' rows are saved."""


def record_group_failure(run_dir: Path, n: int, part: list[Item], err: BaseException) -> None:
    """Log one failed image group and append it to ``run_dir/group_errors.jsonl``; free GPU memory."""
    entry = {"group": n, "images": [it.name for it in part], "type": type(err).__name__, "message": str(err)}
    log.error("image group %d (%s) failed: %s: %s", n, ", ".join(entry["images"][:3]), entry["type"], err)
    with (run_dir / GROUP_ERRORS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
