"""The tasks that need no input images: text-to-image sampling and the ᾱ_t plot of the seed notebook; and the
scores of generated images (``sample`` and ``controlnet`` rows): the data set's scorers (``data.scorers``; on
the digits models, the digit judge's agreement with the prompt) and a ControlNet's control adherence."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from omegaconf import DictConfig

from ddim_lab import schema
from ddim_lab.config.compose import as_list
from ddim_lab.data.scoring import ScoreBatch, ScoringContext, make_scorers, score_rows
from ddim_lab.engine.ddim import sample
from ddim_lab.methods.inversion import make_plan
from ddim_lab.models.latent import LatentModel
from ddim_lab.study.records import save_grid, write_results

if TYPE_CHECKING:
    from ddim_lab.methods.control.base import ControlSignal

log = logging.getLogger(__name__)


def generation_scores(
    cfg: DictConfig,
    images: torch.Tensor,
    prompts: Sequence[str],
    controls: torch.Tensor | None = None,
    signal: ControlSignal | None = None,
) -> dict[str, list[float]]:
    """Per-row scores of generated ``images`` (B, 3, R, R) in [0, 1], the columns a generation row has:

    - the columns of the data set's scorers (``data.scorers``, ``ddim_lab.data.scoring``): on the digits data
      sets ``judge_agreement`` (digits models, rows whose prompt names one digit): 1.0 when
      ``ddim_lab.data.judge`` reads that digit, 0.0 when not, NaN for a prompt naming none;
    - ``control_ssim`` (``controls`` (B, 3, R, R) and the ``signal`` that made them from the inputs): SSIM of
      each control image to the same signal of the result; edge-SSIM for Canny. Left out for ``control=image``,
      whose control does not come from an image.
    """
    scorers = make_scorers(as_list(cfg.data.get("scorers")), ScoringContext.of(cfg, images.device))
    out = score_rows(scorers, ScoreBatch(results=images, prompts=list(prompts)))
    if controls is not None and signal is not None and signal.name != "image":
        from ddim_lab.metrics.image import ssim

        out["control_ssim"] = ssim(signal(images), controls).tolist()
    for name, values in out.items():
        judged = [v for v in values if not math.isnan(v)]
        log.info(
            "%s: mean %.3f over %d of %d images", name, sum(judged) / len(judged), len(judged), len(values)
        )
    return out


def sample_label(seed: int, eta: float, guidance: float, steps: int) -> str:
    """The header of a sample grid's column: its seed and the settings that made it."""
    return f"seed {seed}, eta={eta:g}, guidance={guidance:g}, {steps} steps"


def text_to_image(cfg: DictConfig, model: LatentModel, run_dir: Path, logger) -> pd.DataFrame:
    """``num_images`` samples per prompt from seeded noise; η = 0 is deterministic DDIM, η > 0 stochastic.

    Image j of every prompt starts from the noise of seed ``seed + j`` and, for η > 0, draws its step
    noise from that generator too, so runs that differ only in η start from the same noise.
    """
    start = time.perf_counter()
    prompts = [p for p in as_list(cfg.prompt) for _ in range(cfg.num_images)]
    (guidance,) = as_list(cfg.guidance_scale)
    scheduler = model.scheduler(**cfg.scheduler.overrides)
    plan = make_plan("ddim", scheduler, cfg.num_steps)  # the model's own sampling steps (DDIM or flow)
    gens = [torch.Generator().manual_seed(int(cfg.seed) + j % cfg.num_images) for j in range(len(prompts))]
    x = torch.stack([torch.randn(model.latent_shape, generator=g) for g in gens])  # (B, C, h, w)
    cond = model.conditioning(prompts, [float(guidance)] * len(prompts), cfg.negative_prompt)
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
    shared = schema.generation_values(cfg) | {
        "guidance_scale": float(guidance),
        "unet_evals": cfg.num_steps * (1 if guidance in (0, 1) else 2),
        "seconds": seconds,
    }
    scores = generation_scores(cfg, images, prompts)
    rows = [
        schema.row(
            **shared
            | {"image": f"sample_{j:03d}", "prompt": p, "seed": int(cfg.seed) + j % cfg.num_images}
            | {k: v[j] for k, v in scores.items()}
        )
        for j, p in enumerate(prompts)
    ]
    table = write_results(rows, run_dir)
    columns = [
        (
            sample_label(int(cfg.seed) + j, float(cfg.eta), float(guidance), cfg.num_steps),
            images[j :: cfg.num_images],
        )
        for j in range(cfg.num_images)
    ]
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

    from ddim_lab.engine.flow import flow_alpha, is_flow_scheduler
    from ddim_lab.methods.inversion import make_inverter
    from ddim_lab.models.configs import config_scheduler

    scheduler = config_scheduler(cfg.model, cfg.scheduler.overrides, cfg.cache.dir)
    plan = make_inverter(OmegaConf.to_container(cfg.inverter, resolve=True)).plan(scheduler, cfg.num_steps)
    if is_flow_scheduler(scheduler):  # a flow model: ᾱ(σ) of ddim_lab.engine.flow at t = σ · 1000
        t_all = torch.linspace(0, 1000, 1001, dtype=torch.float64)
        ac = flow_alpha(t_all / 1000)
    else:
        ac = scheduler.alphas_cumprod
        t_all = torch.arange(len(ac))
    table = pd.DataFrame({"timestep": plan.timesteps.numpy(), "alpha_cumprod": plan.alpha.numpy()})
    table.to_csv(run_dir / "alphas.csv", index=False)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(t_all.numpy(), ac.numpy(), color="0.7", label="ᾱ_t, all timesteps")
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
