"""Train the shipped digits model: a Stable-Diffusion-format latent diffusion model on sklearn's digits.

    python scripts/train_digits.py                       # the recipe in conf/train/digits.yaml
    python scripts/train_digits.py vae.steps=5 unet.steps=5 out_dir=/tmp/m   # smoke run

Steps: 1. build the random-weight pipeline; 2. train the VAE (reconstruction + small KL); 3. set the latent
scaling factor to 1/std of training latents; 4. train UNet + text encoder on the epsilon objective with
prompt dropout, keeping an EMA of the UNet; 5. save with ``save_pretrained`` plus ``train_stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf

from ddim_lab.data import digits
from ddim_lab.models.build import build_pipeline

log = logging.getLogger("train_digits")


def train_vae(vae, images: torch.Tensor, cfg: DictConfig, log_every: int, gen: torch.Generator) -> float:
    """Step 2: fit the autoencoder on images in [-1, 1]; returns the last logged reconstruction MSE."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    vae.train()
    running = float("nan")
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = images[idx]  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = mse.item() if math.isnan(running) else 0.98 * running + 0.02 * mse.item()
        if step % log_every == 0 or step == cfg.steps - 1:
            log.info(
                "vae step %d/%d  mse %.5f  (%.0f s)", step + 1, cfg.steps, running, time.perf_counter() - t0
            )
    vae.eval()
    return running


def train_unet(pipe, latents, captions, cfg: DictConfig, log_every: int, gen: torch.Generator) -> float:
    """Step 4: epsilon-prediction training of UNet + text encoder; returns the last logged loss."""
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=max(cfg.warmup, 1))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps - cfg.warmup, 1))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[max(cfg.warmup, 1)])
    ema = EMAModel(pipe.unet.parameters(), decay=cfg.ema_decay)
    pipe.unet.train()
    pipe.text_encoder.train()
    mean, std = latents  # (N, 4, 8, 8) each, already scaled
    labels = torch.as_tensor(captions)
    prompt_ids = pipe.tokenizer(
        digits.prompt_texts(), padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    running = float("nan")
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        prompt = digits.sample_prompts(labels[idx], cfg.prompt_dropout, gen)  # 0: the empty prompt
        cond = pipe.text_encoder(prompt_ids)[0][prompt]  # (B, 77, D), encoder run once per distinct prompt
        pred = pipe.unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(pipe.unet.parameters())
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == cfg.steps - 1:
            log.info(
                "unet step %d/%d  loss %.5f  lr %.2e  (%.0f s)",
                step + 1,
                cfg.steps,
                running,
                sched.get_last_lr()[0],
                time.perf_counter() - t0,
            )
    ema.copy_to(pipe.unet.parameters())
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return running


@hydra.main(version_base="1.3", config_path="../conf/train", config_name="digits")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # tiny gradients late in training are otherwise denormal and 10-100× slower
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    data = digits.split()
    images, labels = data["train"]
    x = digits.to_rgb(images, cfg.resolution) * 2 - 1  # (N, 3, 32, 32) in [-1, 1]

    # 1. random-weight pipeline
    pipe = build_pipeline(OmegaConf.to_container(cfg.arch, resolve=True), digits.WORDS, seed=cfg.seed)

    # 2. VAE
    vae_mse = train_vae(pipe.vae, x, cfg.vae, cfg.log_every, gen)
    vae_seconds = time.perf_counter() - start

    # 3. latent scaling factor (the convention of the LDM paper, §4.3.2: unit-variance latents)
    with torch.no_grad():
        post = pipe.vae.encode(x).latent_dist
        scale = float(1.0 / post.mean.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    latents = (post.mean * scale, post.std * scale)
    log.info("latent scaling factor %.4f", scale)

    # 4. UNet + text encoder
    pipe.vae.requires_grad_(False)
    unet_loss = train_unet(pipe, latents, labels, cfg.unet, cfg.log_every, gen)

    # 5. save
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    pipe.save_pretrained(out, safe_serialization=True)
    stats = {
        "seed": cfg.seed,
        "train_images": len(images),
        "held_out_images": len(data["held_out"][0]),
        "params": {
            n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")
        },
        "vae_steps": cfg.vae.steps,
        "unet_steps": cfg.unet.steps,
        "vae_final_mse": vae_mse,
        "unet_final_loss": unet_loss,
        "scaling_factor": scale,
        "vae_seconds": round(vae_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "threads": cfg.threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("saved to %s in %.0f s", out, stats["total_seconds"])


if __name__ == "__main__":
    main()
