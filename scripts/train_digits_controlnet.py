"""Train the shipped digits ControlNet: ``ControlNetModel.from_unet`` on the digits UNet, Canny-conditioned.

    python scripts/train_digits_controlnet.py                # recipe: conf/train/digits_controlnet.yaml
    python scripts/train_digits_controlnet.py steps=5 out_dir=/tmp/cn   # smoke run

Steps: 1. load the shipped digits model (frozen: VAE, text encoder, UNet); 2. the training split only
(``ddim_lab.data.digits``): 16 px images, their Canny edge maps (``ddim_lab.methods.control``, the same code as
``control=canny``), VAE posterior latents and caption embeddings; 3. copy the UNet's encoder into a ControlNet
and train it on the ε objective of the frozen UNet with the ControlNet residuals, prompt dropout 0.5, an EMA
of its weights; 4. save with ``save_pretrained`` (safetensors) plus ``train_stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf

from ddim_lab.data import digits
from ddim_lab.methods.control import make_control
from ddim_lab.models.loading import load_model

log = logging.getLogger("train_digits_controlnet")


def training_data(model, cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Step 2: the training split as latents (mean, std), control maps, labels and prompt embeddings."""
    images, labels = digits.split()["train"]
    x = digits.to_rgb(images, cfg.resolution)  # (N, 3, R, R) in [0, 1]
    control = make_control(OmegaConf.to_container(cfg.control, resolve=True))(x)
    with torch.no_grad():
        post = model.pipe.vae.encode(x * 2 - 1).latent_dist
    texts = [""] + [digits.caption(k, j) for k in range(10) for j in range(len(digits.TEMPLATES))]
    return {
        "mean": post.mean * model.scaling_factor,
        "std": post.std * model.scaling_factor,
        "control": control,
        "labels": torch.as_tensor(labels),
        "embeds": model.embed(texts),  # (1 + 10·T, 77, D); 0 is the empty prompt
    }


def train(unet, controlnet, data: dict[str, torch.Tensor], scheduler, cfg: DictConfig, gen) -> dict:
    """Step 3: ε-training of the ControlNet through the frozen UNet; returns what happened."""
    opt = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=max(cfg.warmup, 1))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps - cfg.warmup, 1))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[max(cfg.warmup, 1)])
    ema = EMAModel(controlnet.parameters(), decay=cfg.ema_decay)
    controlnet.train()
    n_templates = len(digits.TEMPLATES)
    running, step, t0 = float("nan"), 0, time.perf_counter()
    for step in range(cfg.steps):  # noqa: B007 - the last step is reported
        idx = torch.randint(len(data["mean"]), (cfg.batch_size,), generator=gen)
        z0 = data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        template = torch.randint(n_templates, (len(idx),), generator=gen)
        prompt = 1 + data["labels"][idx] * n_templates + template
        prompt[torch.rand(len(idx), generator=gen) < cfg.prompt_dropout] = 0
        embeds = data["embeds"][prompt]
        down, mid = controlnet(
            zt, t, encoder_hidden_states=embeds, controlnet_cond=data["control"][idx], return_dict=False
        )
        pred = unet(
            zt,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(controlnet.parameters())
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.info(
                "step %d/%d  loss %.5f  lr %.2e  (%.0f s)",
                step + 1,
                cfg.steps,
                running,
                sched.get_last_lr()[0],
                elapsed,
            )
        if elapsed > cfg.max_minutes * 60:
            log.warning("stopping at step %d: max_minutes=%s reached", step + 1, cfg.max_minutes)
            break
    ema.copy_to(controlnet.parameters())
    controlnet.eval()
    return {"steps_done": step + 1, "final_loss": running, "train_seconds": round(time.perf_counter() - t0, 1)}


@hydra.main(version_base="1.3", config_path="../conf/train", config_name="digits_controlnet")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    # 1. the shipped model, frozen
    model = load_model({"name": "digits", "source": "digits", "resolution": cfg.resolution}, {"device": "cpu"})
    unet = model.pipe.unet.eval()
    # 2. data
    data = training_data(model, cfg)
    # 3. ControlNet: the UNet's encoder copied, zero convolutions at zero
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_channels)
    )
    scheduler = DDPMScheduler.from_config(model.pipe.scheduler.config)
    stats = train(unet, controlnet, data, scheduler, cfg, gen)
    # 4. save
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    controlnet.save_pretrained(out, safe_serialization=True)
    stats.update(
        {
            "seed": cfg.seed,
            "train_images": len(data["mean"]),
            "params": sum(p.numel() for p in controlnet.parameters()),
            "steps": cfg.steps,
            "control": OmegaConf.to_container(cfg.control, resolve=True),
            "total_seconds": round(time.perf_counter() - start, 1),
            "threads": cfg.threads,
            "torch": torch.__version__,
        }
    )
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("saved to %s in %.0f s", out, stats["total_seconds"])


if __name__ == "__main__":
    main()
