"""Distil the shipped digits model to 1–4 steps: latent consistency distillation (LCM, Luo et al. 2023).

    python scripts/train_digits_lcm.py                       # the recipe in conf/train/digits_lcm.yaml
    python scripts/train_digits_lcm.py train.steps=3 out_dir=/tmp/l state_path=/tmp/l.pt   # smoke run
    python scripts/train_digits_lcm.py resume=true           # continue from the last checkpoint

The teacher is digits-ldm with classifier-free guidance at a fixed scale ω (LCM §4.2, "one-stage guided
distillation"; ω is fixed, so the student needs no ω-embedding and keeps digits-ldm's UNet architecture). The
student starts from the teacher's UNet; its consistency function is (LCM Eq. 9, boundary conditions of
diffusers' ``LCMScheduler``)

    f_θ(x, t) = c_skip(t) x + c_out(t) x̂₀(x, t),   x̂₀ = (x − √(1−ᾱ_t) ε_θ(x, t)) / √ᾱ_t,

with c_skip(0) = 1 and c_skip(t) < 1e-5 for t ≥ 24: at every timestep the lab samples at, f_θ is the student's
own x̂₀, so deterministic DDIM with the student's ε *is* LCM multistep sampling without fresh noise, and every
DDIM-family inverter runs on it unchanged.

Steps per batch (LCM Algorithm 1, skipping step k):
  1. z₀ from the training latents, n uniform on the grid t_n ∈ {k−1, 2k−1, …, 999}, x_{t_n} ~ q(x_t | z₀);
  2. student f_θ(x_{t_n}, t_n);
  3. the guided teacher's DDIM step t_n → t_n − k: ε̂ = ε_u + ω (ε_c − ε_u), x̂₀ likewise (LCM Eq. 11);
  4. target f_θ⁻(x̂_{t_n−k}, t_n − k) with θ⁻ the EMA of θ (no gradient);
  5. loss d(f_θ, f_θ⁻) (L2 or pseudo-Huber), AdamW on θ, θ⁻ ← μ θ⁻ + (1−μ) θ.
The shipped UNet is θ⁻; the VAE, tokenizer and text encoder are the teacher's, unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import diffusers
import hydra
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from omegaconf import DictConfig, OmegaConf

# sibling script (run as `python scripts/...`, its directory is on sys.path): the shared training pieces
from train_digits_flow import disk_bytes, resume, run_steps, training_latents

from ddim_lab.data import digits

log = logging.getLogger("train_digits_lcm")
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def boundary_scalings(t: torch.Tensor, sigma_data: float, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of the consistency function, each (B, 1, 1, 1); c_skip(0) = 1, c_out(0) = 0."""
    st = scaling * t.double()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂₀ = (x − √(1−ᾱ) ε) / √ᾱ (DDIM Eq. 9); ``alpha_bar`` (B, 1, 1, 1)."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


class DDIMSolver:
    """The teacher's ODE solver on the skipping-step grid t_n = (n+1)k − 1, n = 0 … T/k − 1 (LCM §4.3)."""

    def __init__(self, alphas_cumprod: torch.Tensor, skip: int) -> None:
        steps = len(alphas_cumprod) // skip
        self.timesteps = torch.arange(1, steps + 1) * skip - 1  # (T/k,)
        self.alpha = alphas_cumprod[self.timesteps]
        # ᾱ of t_n − k (ᾱ₀ below the first grid point, as the reference solver does)
        self.alpha_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])
        self.skip = skip

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """η = 0 DDIM from t_n to t_n − k: √ᾱ_prev x̂₀ + √(1−ᾱ_prev) ε̂ (DDIM Eq. 12)."""
        a_prev = self.alpha_prev[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def consistency(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, alpha_bar: torch.Tensor, lc
) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x̂₀(x, t), x̂₀ from the network's ε; x (B, 4, 8, 8), t (B,)."""
    c_skip, c_out = boundary_scalings(t, lc.sigma_data, lc.timestep_scaling)
    eps = unet(x, t, encoder_hidden_states=cond).sample
    return c_skip * x + c_out * x0_from_eps(x, eps, alpha_bar)


def distance(a: torch.Tensor, b: torch.Tensor, lc) -> torch.Tensor:
    """d(·, ·) of the consistency loss: mean squared error or pseudo-Huber."""
    if lc.loss == "l2":
        return F.mse_loss(a, b)
    if lc.loss == "huber":
        return ((a - b) ** 2 + lc.huber_c**2).sqrt().sub(lc.huber_c).mean()
    raise ValueError(f"unknown lcd.loss {lc.loss!r} (l2, huber)")


def lcd_loss(
    models: dict, data: dict, embeds: torch.Tensor, solver: DDIMSolver, cfg: DictConfig, gen
) -> torch.Tensor:
    """One batch of the latent consistency distillation loss (steps 1–4 of the module docstring)."""
    tc, lc = cfg.train, cfg.lcd
    # 1. data, grid index n, x_{t_n}
    idx = torch.randint(len(data["mean"]), (tc.batch_size,), generator=gen)
    z0 = data["mean"][idx]  # (B, 4, 8, 8)
    if tc.posterior_sample:
        z0 = z0 + data["std"][idx] * torch.randn(z0.shape, generator=gen)
    n = torch.randint(len(solver.timesteps), (len(idx),), generator=gen)
    t_start = solver.timesteps[n]
    t_prev = (t_start - solver.skip).clamp(min=0)
    a_start = solver.alpha[n].view(-1, 1, 1, 1)
    noise = torch.randn(z0.shape, generator=gen)
    x = a_start.sqrt() * z0 + (1 - a_start).sqrt() * noise
    prompt = digits.sample_prompts(data["labels"][idx], tc.prompt_dropout, gen)  # 0: the empty prompt
    cond = embeds[prompt]  # (B, 77, D)
    # 2. student
    student = consistency(models["student"], x, t_start, cond, a_start, lc)
    with torch.no_grad():
        # 3. guided teacher, one DDIM step of k timesteps (conditional and unconditional rows in one call)
        both = models["teacher"](
            torch.cat([x, x]),
            torch.cat([t_start, t_start]),
            encoder_hidden_states=torch.cat([cond, embeds[:1].expand_as(cond)]),
        ).sample
        eps_c, eps_u = both.chunk(2)
        eps = eps_u + lc.guidance_scale * (eps_c - eps_u)  # ω = guidance_scale; LCM's w = ω − 1
        x_prev = solver.step(x0_from_eps(x, eps, a_start), eps, n)
        # 4. target network at t_n − k
        target = consistency(models["target"], x_prev, t_prev, cond, solver.alpha_prev[n].view(-1, 1, 1, 1), lc)
    return distance(student, target, lc)


def train(
    models: dict, data: dict, embeds: torch.Tensor, solver: DDIMSolver, cfg: DictConfig, gen, state_path: Path
) -> dict:
    """Step 5 in a loop until ``train.steps`` or ``max_minutes``; returns what happened."""
    tc = cfg.train
    student, target = models["student"], models["target"]
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)

    def load(state: dict) -> None:
        student.load_state_dict(state["student"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])

    def ema() -> None:
        with torch.no_grad():  # θ⁻ ← μ θ⁻ + (1 − μ) θ
            for p_target, p in zip(target.parameters(), params, strict=True):
                p_target.lerp_(p, 1 - cfg.lcd.target_ema)

    run = resume(cfg, state_path, gen, load)
    student.train()
    stats = run_steps(
        run,
        cfg,
        opt,
        params,
        lambda: lcd_loss(models, data, embeds, solver, cfg, gen),
        ema,
        lambda: {"student": student.state_dict(), "target": target.state_dict(), "opt": opt.state_dict()},
        state_path,
        gen,
        smoothing=0.95,
    )
    student.eval()
    return stats


@hydra.main(version_base="1.3", config_path="../conf/train", config_name="digits_lcm")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # tiny gradients late in training are otherwise denormal and slow
    gen = torch.Generator().manual_seed(cfg.seed)
    start, load_start = time.perf_counter(), os.getloadavg()
    teacher_dir = Path(hydra.utils.to_absolute_path(cfg.teacher_dir))
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    pipe = StableDiffusionPipeline.from_pretrained(
        teacher_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    data = training_latents(pipe, cfg.resolution)
    ids = pipe.tokenizer(digits.prompt_texts(), padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        embeds = pipe.text_encoder(ids.input_ids)[0]  # (P, 77, D); row 0 is the empty prompt
    student = copy.deepcopy(pipe.unet).requires_grad_(True)
    target = copy.deepcopy(pipe.unet)
    models = {"teacher": pipe.unet, "student": student, "target": target}
    solver = DDIMSolver(DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod, cfg.lcd.skip)
    log.info("training latents %s; solver grid %d points", tuple(data["mean"].shape), len(solver.timesteps))
    stats = train(models, data, embeds, solver, cfg, gen, Path(hydra.utils.to_absolute_path(cfg.state_path)))

    # save: the target network θ⁻ as the UNet, the teacher's other parts, DDIM with trailing spacing
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    shipped = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=target.to(SAVE_DTYPES[cfg.save_dtype]),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    shipped.save_pretrained(out, safe_serialization=True)
    stats |= {
        "seed": cfg.seed,
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "train_images": len(data["mean"]),
        "params": {"unet": sum(p.numel() for p in target.parameters())},
        "bytes_on_disk": disk_bytes(out),
        "total_seconds": round(time.perf_counter() - start, 1),
        "threads": cfg.threads,
        "cpu_count": os.cpu_count(),
        "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
    }
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("saved to %s in %.0f s (%d steps)", out, stats["total_seconds"], stats["steps_done"])


if __name__ == "__main__":
    main()
