"""One run of the lab, as numbered steps:

1. load the model, build the inverter (``cfg.inverter``) and its plan from one scheduler, which also feeds
   the denoiser (its ᾱ and prediction type);
2. for each group of images: encode (posterior mean), VAE round-trip, take each image's inversion artifact
   from the cache or compute it, sample every grid point (guidance × start step × target prompt) as one
   batched set of trajectories through the inverter's sampler, decode, measure against the input, record;
3. write the result rows after every group (nothing is lost if a later group fails), save labelled grids,
   mirror to the logger.

Network passes are counted by the denoiser and checked against the minimum each inverter states by formula.
"""

from __future__ import annotations

import itertools
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ddim_lab.cache import InversionCache, inversion_key
from ddim_lab.config import as_list
from ddim_lab.control import control_settings, make_control
from ddim_lab.control.base import save_control_images
from ddim_lab.data import Item, load_dataset
from ddim_lab.denoiser import Conditioning, UNetDenoiser
from ddim_lab.inversion import make_inverter
from ddim_lab.inversion.base import Artifact, Cost, InvertContext, SampleRows
from ddim_lab.inversion.ddim import DDIMInversion
from ddim_lab.metrics import ImageMetrics, mse
from ddim_lab.models.loading import LatentModel
from ddim_lab.records import save_grid, write_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridPoint:
    """One sampling configuration applied to every image."""

    guidance: float
    start_step: int
    target: str | None  # edit prompt; None reconstructs with the image's own prompt

    @property
    def label(self) -> str:
        what = "recon" if self.target is None else self.target
        return f"g={self.guidance:g} k={self.start_step} {what}"


def grid_points(cfg: DictConfig) -> list[GridPoint]:
    """The product guidance × start step × target of one job."""
    targets = as_list(cfg.edit_prompt) if cfg.task == "edit" else [None]
    return [
        GridPoint(float(g), int(k), t)
        for t, g, k in itertools.product(targets, as_list(cfg.guidance_scale), as_list(cfg.start_step))
    ]


def model_identity(model: LatentModel, cfg: DictConfig) -> dict[str, Any]:
    """What identifies the weights: name, hub id or path, revision (hub commit or file fingerprint), dtype."""
    spec = cfg.model
    return {
        "model": spec.name,
        "model_ref": spec.get("id") or spec.get("path") or spec.source,
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
        self.scheduler = model.scheduler(**cfg.scheduler.overrides)
        self.inverter = make_inverter(OmegaConf.to_container(cfg.inverter, resolve=True))
        self.plan = self.inverter.plan(self.scheduler, cfg.num_steps)
        self.denoiser: UNetDenoiser = model.denoiser(self.scheduler)
        if bool((self.plan.alpha == 0).any()) and self.denoiser.prediction_type == "epsilon":
            raise ValueError(
                "this schedule reaches ᾱ = 0 (zero terminal SNR), where an ε-predicting model cannot say x₀;"
                " use a v-prediction model or drop rescale_betas_zero_snr"
            )
        self.metrics = ImageMetrics(cfg.metrics.lpips_net, cfg.metrics.lpips, model.device)
        self.cache = InversionCache(Path(cfg.cache.dir) / "inversions" if cfg.cache.enabled else None)
        self.points = grid_points(cfg)
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
        self.started = time.perf_counter()

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
        return Conditioning(
            text=self.model.embed(prompts),
            null=self.model.embed([self.cfg.negative_prompt] * len(prompts)),
            guidance=torch.tensor(guidance, dtype=torch.float32),
            extra=extra,
        )

    def _pivot(self, items: list[Item], x0: torch.Tensor, guidance: float | None, spent: dict[int, Cost]):
        """rows → DDIM trajectories (b, M+1, C, h, w) of those items, through the cache (null-text's pivot).

        What computing a pivot cost is added to ``spent[row]``.
        """
        inversion_guidance = self.inversion_guidance_for(guidance)

        def pivot(rows: torch.Tensor) -> torch.Tensor:
            method = DDIMInversion().key()
            keys = [self.inversion_key(items[int(r)], guidance, method=method) for r in rows]
            found = [self.cache.load(k) for k in keys]
            todo = [j for j, a in enumerate(found) if a is None]
            if todo:
                mine = [items[int(rows[j])] for j in todo]
                cond = self.cond([it.prompt for it in mine], [inversion_guidance] * len(todo), mine)
                ctx = InvertContext(batch_size=self.cfg.batch_size, progress=self.cfg.runtime.progress)
                art = DDIMInversion().invert(self.denoiser, x0[rows[todo]], self.plan, cond, ctx)
                one = DDIMInversion().inversion_cost(self.plan, {}, 1.0, inversion_guidance)
                for n, j in enumerate(todo):
                    found[j] = {k: v[n].cpu() for k, v in art.items()}
                    self.cache.save(keys[j], found[j], {"image": items[int(rows[j])].name, "pivot": True})
                    spent[int(rows[j])] = spent.get(int(rows[j]), Cost()) + one
                    self.minimum += one
                self.evals["pivots_computed"] += len(todo)
            return torch.stack([a["trajectory"] for a in found]).to(x0.device)

        return pivot

    def artifacts(self, items: list[Item], x0: torch.Tensor) -> tuple[dict, dict]:
        """Each image's artifact per guidance it serves ({(i, g): artifact}), and what it cost this run
        ({(i, g): (Cost, cached)}), its pivot included.

        Guidance-independent inverters have one artifact per image, under g = None. A cached artifact cost
        this run nothing.
        """
        guidances = sorted({p.guidance for p in self.points}) if self.per_guidance else [None]
        found: dict[tuple[int, float | None], Artifact] = {}
        costs: dict[tuple[int, float | None], Cost] = {}
        for g in guidances:
            keys = [self.inversion_key(it, g) for it in items]
            for i, k in enumerate(keys):
                cached = self.cache.load(k)
                if cached is not None:
                    found[i, g], costs[i, g] = cached, (Cost(), True)
            todo = [i for i in range(len(items)) if (i, g) not in found]
            self.evals["inversions_cached"] += len(items) - len(todo)
            if not todo:
                continue
            spent: dict[int, Cost] = {}
            ctx = InvertContext(
                guidance=1.0 if g is None else g,
                generators=[torch.Generator().manual_seed(self.image_seed(items[i])) for i in todo],
                batch_size=self.cfg.batch_size,
                progress=self.cfg.runtime.progress,
                pivot=self._pivot([items[i] for i in todo], x0[todo], g, spent),
            )
            inversion_guidance = self.inversion_guidance_for(g)
            cond = self.cond(
                [items[i].prompt for i in todo], [inversion_guidance] * len(todo), [items[i] for i in todo]
            )
            fwd, bwd = self.denoiser.unet_evals, self.denoiser.unet_backwards
            art = self.inverter.invert(self.denoiser, x0[todo], self.plan, cond, ctx)
            self.evals["inversion"] += self.denoiser.unet_evals - fwd
            self.evals["inversion_backwards"] += self.denoiser.unet_backwards - bwd
            self.evals["inversions_computed"] += len(todo)
            for n, i in enumerate(todo):
                found[i, g] = {k: v[n].detach().cpu() for k, v in art.items()}
                cost = self.inverter.inversion_cost(
                    self.plan, found[i, g], 1.0 if g is None else g, inversion_guidance
                )
                self.minimum += cost
                costs[i, g] = (cost + spent.get(n, Cost()), False)
                self.cache.save(keys[n], found[i, g], {"image": items[i].name, "prompt": items[i].prompt})
        return found, costs

    def image_seed(self, item: Item) -> int:
        """The seed a stochastic inverter draws one image's noise from: the run's seed and the image's content,
        so images differ from each other and an image draws the same alone or in any batch."""
        return (int(self.cfg.seed) * 1_000_003 + int(item.content_hash[:12], 16)) % 2**63

    # -- step 2b: every grid point of every image, batched -----------------------------------------
    def sample_seed(self, image_index: int, point_index: int) -> int:
        """The seed of one stochastic trajectory: distinct per (image, grid point), stable across groups."""
        return int(self.cfg.seed) + image_index * len(self.points) + point_index

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
                [p.target or items[i].prompt for i, (_, p) in rows], guidance, [items[i] for i, _ in rows]
            ),
            source=self.cond([items[i].prompt for i, _ in rows], guidance, [items[i] for i, _ in rows]),
            start=torch.tensor([p.start_step for _, (_, p) in rows]),
            edit=torch.tensor([p.target is not None and p.target != items[i].prompt for i, (_, p) in rows]),
            generators=gens,
        )
        before = self.denoiser.unet_evals
        out = self.inverter.sample(
            self.denoiser,
            self.plan,
            batch,
            eta=float(self.cfg.eta),
            batch_size=self.cfg.batch_size,
            progress=self.cfg.runtime.progress,
        )
        self.evals["sampling"] += self.denoiser.unet_evals - before
        for n, (_, (_, p)) in enumerate(rows):
            self.minimum += self.inverter.sampling_cost(
                self.plan, p.start_step, p.guidance, bool(batch.edit[n])
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
        results = self.model.decode(out)  # (G·P, 3, R, R)
        P = len(self.points)
        scores = self.metrics(results, images.repeat_interleave(P, dim=0))
        latent_err = mse(out.cpu(), x0.cpu().repeat_interleave(P, dim=0))
        seconds = (time.perf_counter() - start) / (len(items) * P)
        memory = peak_memory_mb(self.model.device)
        rows = []
        for r, (i, (j, p)) in enumerate(itertools.product(range(len(items)), enumerate(self.points))):
            cost, cached = costs[i, p.guidance if self.per_guidance else None]
            edit = p.target is not None and p.target != items[i].prompt
            rows.append(
                {
                    "image": items[i].name,
                    "prompt": items[i].prompt,
                    "edit_prompt": p.target,
                    "negative_prompt": cfg.negative_prompt,
                    "task": cfg.task,
                    "model": cfg.model.name,
                    "scheduler": cfg.scheduler.name,
                    "inverter": cfg.inverter.name,
                    "num_steps": cfg.num_steps,
                    "inversion_guidance_scale": self.inversion_guidance_for(p.guidance),
                    "guidance_scale": p.guidance,
                    "start_step": p.start_step,
                    "eta": float(cfg.eta),
                    "seed": int(cfg.seed),
                    "dtype": cfg.runtime.dtype,
                    "psnr": float(scores["psnr"][r]),
                    "ssim": float(scores["ssim"][r]),
                    "lpips": float(scores["lpips"][r]),
                    "lpips_net": cfg.metrics.lpips_net,
                    "latent_mse": float(latent_err[r]),
                    "vae_psnr": float(vae_scores["psnr"][i]),
                    "vae_lpips": float(vae_scores["lpips"][i]),
                    "unet_evals": self.inverter.sampling_cost(
                        self.plan, p.start_step, p.guidance, edit
                    ).forwards,
                    "inversion_unet_evals": cost.forwards,
                    "inversion_unet_backwards": cost.backwards,
                    "inversion_cached": cached,
                    "sample_seed": self.sample_seed(first_index + i, j) if cfg.eta > 0 else None,
                    "seconds": seconds,
                    "peak_memory_mb": memory,
                }
            )
        columns = {"input": images, "VAE round-trip": vae_images}
        if self.control is not None:
            columns[f"control: {self.control.name}"] = self.control_images(items)
        for j, p in enumerate(self.points):
            columns[p.label] = results[j::P]
        return rows, columns

    def summary(self, images: int) -> dict[str, Any]:
        """run.json: network passes spent against the inverter's minimum, time and memory."""
        return {
            **self.evals,
            "inverter": self.inverter.name,
            "inverter_knobs": self.inverter.key(),
            "formula": self.inverter.formula,
            "unet_evals": self.evals["inversion"] + self.evals["sampling"],
            "unet_backwards": self.evals["inversion_backwards"],
            "minimum_unet_evals": self.minimum.forwards,
            "minimum_unet_backwards": self.minimum.backwards,
            "images": images,
            "grid_points": len(self.points),
            "seconds": time.perf_counter() - self.started,
            "peak_memory_mb": peak_memory_mb(self.model.device),
        }


def reconstruct_or_edit(cfg: DictConfig, model: LatentModel, run_dir: Path, logger) -> pd.DataFrame:
    """Tasks ``reconstruct`` and ``edit``: invert every image, then sample every grid point."""
    runner = Runner(cfg, model)
    items = load_dataset(cfg.data.path, model.resolution, cfg.prompt)
    log.info(
        "%d images × %d grid points (%s, %s, %d steps)",
        len(items),
        len(runner.points),
        cfg.inverter.name,
        cfg.scheduler.name,
        cfg.num_steps,
    )
    rows: list[dict] = []
    group = max(1, cfg.batch_size // len(runner.points))  # images whose trajectories share UNet calls
    table = pd.DataFrame()
    for n, first in enumerate(range(0, len(items), group)):
        part = items[first : first + group]
        new_rows, columns = runner.run_group(part, first)
        if runner.control is not None:  # control settings in the rows, control images beside the results
            new_rows = [{**r, **control_settings(cfg)} for r in new_rows]
            save_control_images(run_dir / "controls", [it.name for it in part], runner.control_images(part))
        rows += new_rows
        table = write_results(rows, run_dir)
        grid = save_grid(
            run_dir / f"grid_{n:03d}.png",
            list(columns.items()),
            [f"{it.name}: {it.prompt}" for it in part],
        )
        logger.log_image(grid, f"images {first}–{first + len(part) - 1}")
        log.info("images %d/%d done", first + len(part), len(items))
    summary = runner.summary(len(items))
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
    log.info("UNet evaluations: %(unet_evals)d (minimum %(minimum_unet_evals)d)", summary)
    logger.log_rows(table)
    return table
