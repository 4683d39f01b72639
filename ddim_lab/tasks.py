"""The tasks that need no input images: text-to-image sampling and the ᾱ_t plot of the seed notebook."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from ddim_lab.config import as_list
from ddim_lab.ddim import sample
from ddim_lab.denoiser import Conditioning
from ddim_lab.models.loading import LatentModel
from ddim_lab.records import save_grid, write_results
from ddim_lab.schedule import exact_plan

log = logging.getLogger(__name__)


def text_to_image(cfg: DictConfig, model: LatentModel, run_dir: Path, logger) -> pd.DataFrame:
    """``num_images`` samples per prompt from seeded noise; η = 0 is deterministic DDIM, η > 0 stochastic.

    Image j of every prompt starts from the noise of seed ``seed + j`` and, for η > 0, draws its step
    noise from that generator too, so runs that differ only in η start from the same noise.
    """
    start = time.perf_counter()
    prompts = [p for p in as_list(cfg.prompt) for _ in range(cfg.num_images)]
    (guidance,) = as_list(cfg.guidance_scale)
    scheduler = model.scheduler(**cfg.scheduler.overrides)
    plan = exact_plan(scheduler, cfg.num_steps)
    unet = model.pipe.unet.config
    size = model.resolution // model.pipe.vae_scale_factor
    gens = [torch.Generator().manual_seed(int(cfg.seed) + j % cfg.num_images) for j in range(len(prompts))]
    x = torch.stack([torch.randn(unet.in_channels, size, size, generator=g) for g in gens])  # (B, C, h, w)
    cond = Conditioning(
        text=model.embed(prompts),
        null=model.embed([cfg.negative_prompt] * len(prompts)),
        guidance=torch.full((len(prompts),), float(guidance)),
    )
    denoiser = model.denoiser(scheduler)
    out = sample(
        denoiser,
        x.to(model.device),
        plan,
        cond,
        eta=float(cfg.eta),
        generators=gens if cfg.eta > 0 else None,
        batch_size=cfg.batch_size,
        progress=cfg.runtime.progress,
    )
    images = model.decode(out)
    seconds = (time.perf_counter() - start) / len(prompts)
    rows = [
        {
            "image": f"sample_{j:03d}",
            "prompt": p,
            "task": "sample",
            "model": cfg.model.name,
            "scheduler": cfg.scheduler.name,
            "inverter": None,
            "num_steps": cfg.num_steps,
            "guidance_scale": float(guidance),
            "start_step": 0,
            "eta": float(cfg.eta),
            "seed": int(cfg.seed) + j % cfg.num_images,
            "dtype": cfg.runtime.dtype,
            "unet_evals": cfg.num_steps * (1 if guidance in (0, 1) else 2),
            "seconds": seconds,
        }
        for j, p in enumerate(prompts)
    ]
    table = write_results(rows, run_dir)
    columns = [(f"seed {int(cfg.seed) + j}", images[j :: cfg.num_images]) for j in range(cfg.num_images)]
    grid = save_grid(run_dir / "samples.png", columns, as_list(cfg.prompt))
    for j, image in enumerate(images):
        save_grid(run_dir / f"sample_{j:03d}.png", [("", image[None])], [""], min_cell=model.resolution)
    logger.log_image(grid, f"eta={cfg.eta} guidance={guidance}")
    logger.log_rows(table)
    log.info("%d samples written to %s", len(prompts), run_dir)
    return table


def alpha_plot(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    """ᾱ_t against t over the whole schedule, with the DDIM timesteps of ``num_steps`` marked.

    Needs only the model's scheduler config (for a hub model that one file), never its weights.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from omegaconf import OmegaConf

    from ddim_lab.inversion import make_inverter
    from ddim_lab.models.loading import load_scheduler_config
    from ddim_lab.schedule import ddim_scheduler

    scheduler = ddim_scheduler(load_scheduler_config(cfg.model, cfg.cache.dir), **cfg.scheduler.overrides)
    plan = make_inverter(OmegaConf.to_container(cfg.inverter, resolve=True)).plan(scheduler, cfg.num_steps)
    ac = scheduler.alphas_cumprod
    table = pd.DataFrame({"timestep": plan.timesteps.numpy(), "alpha_cumprod": plan.alpha.numpy()})
    table.to_csv(run_dir / "alphas.csv", index=False)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(range(len(ac)), ac.numpy(), color="0.7", label="ᾱ_t, all timesteps")
    ax.plot(
        table.timestep,
        table.alpha_cumprod,
        "o",
        ms=3,
        label=f"{cfg.num_steps} DDIM steps ({cfg.scheduler.name})",
    )
    ax.set(xlabel="timestep t", ylabel="ᾱ_t (alphas_cumprod)", title=f"noise schedule of {cfg.model.name}")
    ax.legend()
    fig.savefig(run_dir / "alpha_t.png", dpi=120, bbox_inches="tight")
    log.info("wrote %s", run_dir / "alpha_t.png")
    return table
