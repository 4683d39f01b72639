"""One run of the lab, as numbered steps:

1. load the model and build the DDIM plan (scheduler × inverter × num_steps);
2. for each group of images: encode (posterior mean), VAE round-trip, invert — or take the inversion from
   the cache —, sample every grid point (guidance × start step × target prompt) as one batched set of
   trajectories, decode, measure against the input, record;
3. rewrite the result table after every group (nothing is lost if a later group fails), save labelled
   grids, mirror to the logger.

UNet evaluations are counted by the denoiser and checked against the minimum the grid needs.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from ddim_lab.cache import InversionCache, inversion_key
from ddim_lab.config import as_list
from ddim_lab.data import Item, load_dataset
from ddim_lab.ddim import invert, sample
from ddim_lab.denoiser import Conditioning, UNetDenoiser
from ddim_lab.inversion import make_plan
from ddim_lab.metrics import ImageMetrics, mse
from ddim_lab.models.loading import LatentModel
from ddim_lab.records import save_grid, write_results
from ddim_lab.schedule import Plan

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


def evals_per_step(guidance: float) -> int:
    """UNet rows one trajectory costs per step: guidance 1 (prompt only) or 0 (null only) cost one."""
    return 1 if guidance in (0.0, 1.0) else 2


def minimum_evals(
    plan: Plan, points: list[GridPoint], inversions: int, inversion_guidance: float
) -> dict[str, int]:
    """Fewest UNet evaluations: inversions × M × (1|2) + Σ trajectories × (N - k) × (1|2)."""
    per_image = sum((plan.num_steps - p.start_step) * evals_per_step(p.guidance) for p in points)
    return {
        "inversion": inversions * len(plan.inv_timesteps) * evals_per_step(inversion_guidance),
        "sampling_per_image": per_image,
    }


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


class Runner:
    """Holds what a run shares across image groups: model, plan, denoiser, metrics, cache."""

    def __init__(self, cfg: DictConfig, model: LatentModel) -> None:
        self.cfg = cfg
        self.model = model
        self.scheduler = model.scheduler(**cfg.scheduler.overrides)
        self.plan = make_plan(cfg.inverter.name, self.scheduler, cfg.num_steps)
        self.denoiser: UNetDenoiser = model.denoiser()
        self.metrics = ImageMetrics(cfg.metrics.lpips_net, cfg.metrics.lpips, model.device)
        self.cache = InversionCache(Path(cfg.cache.dir) / "inversions" if cfg.cache.enabled else None)
        self.points = grid_points(cfg)
        self.identity = model_identity(model, cfg)
        self.evals = {"inversion": 0, "sampling": 0, "inversions_computed": 0, "inversions_cached": 0}

    # -- step 2a: inversion, from the cache when possible ------------------------------------------
    def inversion_key(self, item: Item) -> str:
        cfg = self.cfg
        return inversion_key(
            image=item.content_hash,
            **self.identity,
            scheduler=dict(self.scheduler.config),
            inverter=cfg.inverter.name,
            num_steps=cfg.num_steps,
            inversion_guidance=float(cfg.inversion.guidance_scale),
            prompt=item.prompt,
            negative_prompt=cfg.negative_prompt,
            seed=cfg.seed,
        )

    def cond(self, prompts: list[str], guidance: list[float]) -> Conditioning:
        return Conditioning(
            text=self.model.embed(prompts),
            null=self.model.embed([self.cfg.negative_prompt] * len(prompts)),
            guidance=torch.tensor(guidance, dtype=torch.float32),
        )

    def invert_all(self, items: list[Item], x0: torch.Tensor) -> tuple[list[torch.Tensor], list[bool]]:
        """Trajectories (M+1, C, h, w) per item and whether each came from the cache."""
        keys = [self.inversion_key(it) for it in items]
        found = [self.cache.load(k) for k in keys]
        todo = [i for i, t in enumerate(found) if t is None]
        if todo:
            g = float(self.cfg.inversion.guidance_scale)
            before = self.denoiser.unet_evals
            traj = invert(
                self.denoiser,
                x0[todo],
                self.plan,
                self.cond([items[i].prompt for i in todo], [g] * len(todo)),
                batch_size=self.cfg.batch_size,
                progress=self.cfg.runtime.progress,
            )  # (M+1, len(todo), C, h, w)
            self.evals["inversion"] += self.denoiser.unet_evals - before
            for j, i in enumerate(todo):
                found[i] = traj[:, j].cpu()
                self.cache.save(keys[i], found[i], {"image": items[i].name, "prompt": items[i].prompt})
        self.evals["inversions_computed"] += len(todo)
        self.evals["inversions_cached"] += len(items) - len(todo)
        return found, [i not in todo for i in range(len(items))]

    # -- step 2b: every grid point of every image, batched -----------------------------------------
    def sample_grid(self, items: list[Item], trajectories: list[torch.Tensor]) -> torch.Tensor:
        """Final latents (len(items) × len(points), C, h, w), rows ordered image-major."""
        rows = list(itertools.product(range(len(items)), self.points))
        starts = torch.tensor([p.start_step for _, p in rows])
        x = torch.stack([trajectories[i][self.plan.start_index[p.start_step]] for i, p in rows])
        cond = self.cond([p.target or items[i].prompt for i, p in rows], [p.guidance for _, p in rows])
        gens = [torch.Generator().manual_seed(int(self.cfg.seed)) for _ in rows] if self.cfg.eta > 0 else None
        before = self.denoiser.unet_evals
        out = sample(
            self.denoiser,
            x.to(self.model.device),
            self.plan,
            cond,
            start_step=starts,
            eta=float(self.cfg.eta),
            generators=gens,
            batch_size=self.cfg.batch_size,
            progress=self.cfg.runtime.progress,
        )
        self.evals["sampling"] += self.denoiser.unet_evals - before
        return out

    def run_group(self, items: list[Item]) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """Result rows and the images for the grid of one group of items."""
        start = time.perf_counter()
        cfg = self.cfg
        images = torch.stack([it.image for it in items])  # (G, 3, R, R) in [0, 1]
        x0 = self.model.encode(images)  # (G, C, h, w)
        vae_images = self.model.decode(x0)
        vae_scores = self.metrics(vae_images, images)
        trajectories, cached = self.invert_all(items, x0)
        inv_evals = len(self.plan.inv_timesteps) * evals_per_step(float(cfg.inversion.guidance_scale))
        out = self.sample_grid(items, trajectories)
        results = self.model.decode(out)  # (G·P, 3, R, R)
        P = len(self.points)
        scores = self.metrics(results, images.repeat_interleave(P, dim=0))
        latent_err = mse(out.cpu(), x0.cpu().repeat_interleave(P, dim=0))
        seconds = (time.perf_counter() - start) / (len(items) * P)
        rows = []
        for r, (i, p) in enumerate(itertools.product(range(len(items)), self.points)):
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
                    "inversion_guidance_scale": float(cfg.inversion.guidance_scale),
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
                    "unet_evals": (cfg.num_steps - p.start_step) * evals_per_step(p.guidance),
                    "inversion_unet_evals": 0 if cached[i] else inv_evals,
                    "inversion_cached": cached[i],
                    "seconds": seconds,
                }
            )
        columns = {"input": images, "VAE round-trip": vae_images}
        for j, p in enumerate(self.points):
            columns[p.label] = results[j::P]
        return rows, columns


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
        new_rows, columns = runner.run_group(part)
        rows += new_rows
        table = write_results(rows, run_dir)
        grid = save_grid(
            run_dir / f"grid_{n:03d}.png",
            list(columns.items()),
            [f"{it.name}: {it.prompt}" for it in part],
        )
        logger.log_image(grid, f"images {first}–{first + len(part) - 1}")
        log.info("images %d/%d done", first + len(part), len(items))
    minimum = minimum_evals(
        runner.plan, runner.points, runner.evals["inversions_computed"], cfg.inversion.guidance_scale
    )
    summary = {
        **runner.evals,
        "unet_evals": runner.evals["inversion"] + runner.evals["sampling"],
        "minimum_unet_evals": minimum["inversion"] + minimum["sampling_per_image"] * len(items),
        "images": len(items),
        "grid_points": len(runner.points),
    }
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
    log.info("UNet evaluations: %(unet_evals)d (minimum %(minimum_unet_evals)d)", summary)
    logger.log_rows(table)
    return table
