"""Train the shipped digits flow model: a Stable-Diffusion-3-format rectified-flow model on sklearn's digits.

    python scripts/train_digits_flow.py                          # the recipe in conf/train/digits_flow.yaml
    python scripts/train_digits_flow.py train.steps=5 out_dir=/tmp/f state_path=/tmp/f.pt   # smoke run
    python scripts/train_digits_flow.py resume=true              # continue from the last checkpoint

Steps: 1. build a ``StableDiffusion3Pipeline`` around the UNet digits model's frozen VAE and tokenizer: two
``CLIPTextModelWithProjection`` towers initialised from its text encoder, a random ``SD3Transformer2DModel``
and a ``FlowMatchEulerDiscreteScheduler``; 2. encode the training split to VAE posterior latents; 3. train the
transformer and both text towers on the rectified-flow objective (x_σ = (1−σ) x₀ + σ ε, target v = ε − x₀)
with prompt dropout and an EMA of the weights, until ``train.steps`` or ``max_minutes``; 4. save the EMA
weights with ``save_pretrained`` plus ``train_stats.json``.

Without T5 the pipeline pads the prompt with ``max_sequence_length`` (256) zero tokens. Those tokens are
identical in every layer (same input, no positional embedding in the text stream), so training keeps one of
them and adds log 256 to its attention logit (``ddim_lab.engine.token_fold``): the same function as the
pipeline's, at a fraction of the cost. ``check_collapsed_context`` verifies that on the trained weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import hydra
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from ddim_lab.data import digits
from ddim_lab.engine.token_fold import FoldedJointAttnProcessor

log = logging.getLogger("train_digits_flow")
TRAINED = ("transformer", "text_encoder", "text_encoder_2")


def text_tower(base: Path, projection_dim: int, seed: int) -> CLIPTextModelWithProjection:
    """A CLIP text tower with projection, initialised from the digits-ldm text encoder (projection random)."""
    config = CLIPTextConfig.from_pretrained(base / "text_encoder")
    config.projection_dim = projection_dim
    config.architectures = ["CLIPTextModelWithProjection"]
    torch.manual_seed(seed)
    tower = CLIPTextModelWithProjection(config)
    source = transformers.CLIPTextModel.from_pretrained(base / "text_encoder").state_dict()
    tower.text_model.load_state_dict(source)  # strict: every weight but the projection
    return tower


def build_pipeline(cfg: DictConfig, base: Path) -> StableDiffusion3Pipeline:
    """Step 1: the untrained flow pipeline over digits-ldm's VAE (shift 0, its scaling factor)."""
    vae = AutoencoderKL.from_pretrained(base / "vae")
    vae.register_to_config(shift_factor=0.0)
    vae.requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", model_max_length=cfg.text_length)
    towers = [text_tower(base, cfg.arch.text_encoder.projection_dim, cfg.seed + i) for i in range(2)]
    hidden = sum(t.config.hidden_size for t in towers)
    arch = OmegaConf.to_container(cfg.arch.transformer, resolve=True)
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    torch.manual_seed(cfg.seed)
    transformer = SD3Transformer2DModel(
        **arch,
        joint_attention_dim=hidden,  # the two towers' hidden states side by side
        caption_projection_dim=inner,
        pooled_projection_dim=sum(t.config.projection_dim for t in towers),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.scheduler.shift),
        vae=vae,
        text_encoder=towers[0],
        tokenizer=tokenizer,
        text_encoder_2=towers[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def encode_collapsed(pipe: StableDiffusion3Pipeline, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's prompt encoding of token ids (P, L) with the T5 zero block collapsed to one token:
    ``(context (P, L + 1, D), pooled (P, D_pooled))``; see ``ddim_lab.engine.token_fold``."""
    hidden, pooled = [], []
    for tower in (pipe.text_encoder, pipe.text_encoder_2):
        out = tower(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    context = torch.cat(hidden, dim=-1)
    context = F.pad(context, (0, pipe.transformer.config.joint_attention_dim - context.shape[-1]))
    context = torch.cat([context, context.new_zeros(len(context), 1, context.shape[-1])], dim=1)
    return context, torch.cat(pooled, dim=-1)


def log_counts(text_length: int, t5_length: int) -> torch.Tensor:
    """Log-multiplicities of the collapsed context: the CLIP tokens once each, the zero token ``t5_length``."""
    return torch.tensor([0.0] * text_length + [math.log(t5_length)])


def check_collapsed_context(pipe: StableDiffusion3Pipeline, cfg: DictConfig, gen: torch.Generator) -> float:
    """Max |difference| of the transformer's velocity, collapsed context vs the pipeline's own encoding."""
    prompts = ["a handwritten digit three", ""]
    x = torch.randn(len(prompts), 4, 8, 8, generator=gen)
    t = torch.tensor([700.0, 150.0])
    with torch.no_grad():
        full, pooled = pipe.encode_prompt(
            prompts, prompts, None, do_classifier_free_guidance=False, max_sequence_length=cfg.t5_length
        )[::2]
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        context, pooled_c = encode_collapsed(pipe, ids)
        ref = pipe.transformer(x, full, pooled, t).sample
        processors = pipe.transformer.attn_processors
        pipe.transformer.set_attn_processor(
            FoldedJointAttnProcessor(log_counts(cfg.text_length, cfg.t5_length))
        )
        out = pipe.transformer(x, context, pooled_c, t).sample
        pipe.transformer.set_attn_processor(processors)
    return float((out - ref).abs().max())


def training_latents(pipe: StableDiffusion3Pipeline, resolution: int) -> dict[str, torch.Tensor]:
    """Step 2: the training split as scaled VAE posterior latents (mean, std) and labels."""
    images, labels = digits.split()["train"]
    x = digits.to_rgb(images, resolution) * 2 - 1
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        post = pipe.vae.encode(x).latent_dist
    return {"mean": post.mean * scale, "std": post.std * scale, "labels": torch.as_tensor(labels)}


def sample_sigmas(n: int, cfg: DictConfig, gen: torch.Generator) -> torch.Tensor:
    """σ for a batch: uniform on (0, 1) or logit-normal (Esser et al. 2024, §3.1)."""
    if cfg.sigma_sampling == "uniform":
        return torch.rand(n, generator=gen)
    if cfg.sigma_sampling == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen))
    raise ValueError(f"unknown sigma_sampling {cfg.sigma_sampling!r}")


def learning_rate(cfg: DictConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over ``progress`` ∈ [0, 1] (steps or minutes, whichever is ahead)."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))


class StopFlag:
    """Set by SIGTERM/SIGINT, so a stopped run still saves."""

    def __init__(self) -> None:
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("signal %d: stopping after this step", signum)
        self.set = True


def save_state(path: Path, state: dict) -> None:
    """Write a checkpoint atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass
class Run:
    """A resumable training run's counters: the step reached, the seconds spent before this process, the
    logged history."""

    step: int = 0
    elapsed_before: float = 0.0
    history: list = field(default_factory=list)


def resume(cfg: DictConfig, state_path: Path, gen: torch.Generator, load: Callable[[dict], None]) -> Run:
    """The run saved at ``state_path`` when ``cfg.resume`` (``load`` restores the models and optimiser from
    the state), else a fresh one."""
    if not (cfg.resume and state_path.exists()):
        return Run()
    state = torch.load(state_path, weights_only=False)
    load(state)
    gen.set_state(state["gen"])
    log.info("resumed at step %d (%.0f s)", state["step"], state["seconds"])
    return Run(state["step"], state["seconds"], state["history"])


def run_steps(
    run: Run,
    cfg: DictConfig,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[], torch.Tensor],
    after_step: Callable[[], None],
    saved: Callable[[], dict],
    state_path: Path,
    gen: torch.Generator,
    smoothing: float = 0.98,
) -> dict:
    """The training loop both digits scripts share: until ``train.steps`` or ``max_minutes`` (whichever is
    ahead), one optimiser step on ``loss_fn()`` with the scheduled learning rate and gradient clipping, then
    ``after_step()`` (an EMA update); logs, checkpoints ``saved()`` with the run's counters every
    ``checkpoint_every`` steps and at the end (also after SIGTERM/SIGINT). Returns what happened."""
    tc = cfg.train
    stop, running, t0, first_step = StopFlag(), float("nan"), time.perf_counter(), run.step

    def checkpoint() -> None:
        seconds = run.elapsed_before + time.perf_counter() - t0
        counters = {"step": run.step, "seconds": seconds, "history": run.history, "gen": gen.get_state()}
        save_state(state_path, {**counters, **saved()})

    while True:
        elapsed = run.elapsed_before + time.perf_counter() - t0
        progress = max(run.step / tc.steps, elapsed / (cfg.max_minutes * 60))
        if progress >= 1 or stop.set:
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, run.step, progress)
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        after_step()
        run.step += 1
        value = loss.item()
        running = value if math.isnan(running) else smoothing * running + (1 - smoothing) * value
        if run.step % cfg.log_every == 0 or run.step == 1:
            run.history.append({"step": run.step, "loss": round(running, 6), "seconds": round(elapsed, 1)})
            log.info(
                "step %d/%d  loss %.6f  lr %.2e  progress %.3f  (%.0f s, %.3f s/step, load %.1f)",
                run.step,
                tc.steps,
                running,
                opt.param_groups[0]["lr"],
                progress,
                elapsed,
                (time.perf_counter() - t0) / (run.step - first_step),
                os.getloadavg()[0],
            )
        if run.step % tc.checkpoint_every == 0:
            checkpoint()
    checkpoint()
    seconds = run.elapsed_before + time.perf_counter() - t0
    return {
        "steps_done": run.step,
        "final_loss": running,
        "train_seconds": round(seconds, 1),
        "history": run.history,
    }


def flow_loss(
    pipe: StableDiffusion3Pipeline,
    data: dict[str, torch.Tensor],
    ids: torch.Tensor,
    tc: DictConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """One batch of the rectified-flow loss: x_σ = (1−σ) x₀ + σ ε, MSE to v = ε − x₀; ``ids`` the prompt
    table's tokens; the transformer runs the folded joint attention (``FoldedJointAttnProcessor``)."""
    idx = torch.randint(len(data["mean"]), (tc.batch_size,), generator=gen)
    x0 = data["mean"][idx]
    if tc.posterior_sample:
        x0 = x0 + data["std"][idx] * torch.randn(x0.shape, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = sample_sigmas(len(idx), tc, gen)
    s = sigma.view(-1, 1, 1, 1)
    prompt = digits.sample_prompts(data["labels"][idx], tc.prompt_dropout, gen)
    context, pooled = encode_collapsed(pipe, ids)  # each distinct prompt once
    pred = pipe.transformer(
        (1 - s) * x0 + s * noise,
        context[prompt],
        pooled[prompt],
        sigma * pipe.scheduler.config.num_train_timesteps,
    ).sample
    return F.mse_loss(pred, noise - x0)


def train(
    pipe: StableDiffusion3Pipeline, data: dict, cfg: DictConfig, gen: torch.Generator, state_path: Path
) -> dict:
    """Step 3: rectified-flow training of the transformer and both text towers; returns what happened."""
    tc = cfg.train
    models = {name: getattr(pipe, name) for name in TRAINED}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMAModel(params, decay=tc.ema_decay)
    ids = pipe.tokenizer(digits.prompt_texts(), padding="max_length", truncation=True, return_tensors="pt")
    default_processors = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor(FoldedJointAttnProcessor(log_counts(cfg.text_length, cfg.t5_length)))

    def load(state: dict) -> None:
        for name, model in models.items():
            model.load_state_dict(state["models"][name])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])

    run = resume(cfg, state_path, gen, load)
    for model in models.values():
        model.train()
    stats = run_steps(
        run,
        cfg,
        opt,
        params,
        lambda: flow_loss(pipe, data, ids.input_ids, tc, gen),
        lambda: ema.step(params),
        lambda: {
            "models": {name: model.state_dict() for name, model in models.items()},
            "opt": opt.state_dict(),
            "ema": ema.state_dict(),
        },
        state_path,
        gen,
    )
    ema.copy_to(params)
    for model in models.values():
        model.eval()
    pipe.transformer.set_attn_processor(default_processors)
    return stats


def disk_bytes(root: Path) -> dict[str, int]:
    """Safetensors bytes per component directory."""
    return {w.parent.name: w.stat().st_size for w in sorted(root.rglob("*.safetensors"))}


@hydra.main(version_base="1.3", config_path="../conf/train", config_name="digits_flow")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # tiny gradients late in training are otherwise denormal and slow
    gen = torch.Generator().manual_seed(cfg.seed)
    start, load_start = time.perf_counter(), os.getloadavg()
    base = Path(hydra.utils.to_absolute_path(cfg.base_dir))
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    pipe = build_pipeline(cfg, base)
    data = training_latents(pipe, cfg.resolution)
    log.info("training latents %s, std %.3f", tuple(data["mean"].shape), float(data["mean"].std()))
    stats = train(pipe, data, cfg, gen, Path(hydra.utils.to_absolute_path(cfg.state_path)))
    diff = check_collapsed_context(pipe, cfg, gen)
    log.info("collapsed vs full context: max |Δv| %.2e", diff)
    if diff > 1e-3:
        raise RuntimeError(f"collapsed training context differs from the pipeline's by {diff:.2e}")
    pipe.save_pretrained(out, safe_serialization=True)
    stats |= {
        "seed": cfg.seed,
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "train_images": len(data["mean"]),
        "params": {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in (*TRAINED, "vae")},
        "bytes_on_disk": disk_bytes(out),
        "scaling_factor": pipe.vae.config.scaling_factor,
        "shift_factor": pipe.vae.config.shift_factor,
        "collapsed_context_max_abs_diff": diff,
        "total_seconds": round(time.perf_counter() - start, 1),
        "threads": cfg.threads,
        "cpu_count": os.cpu_count(),
        "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
    }
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("saved to %s in %.0f s (%d steps)", out, stats["total_seconds"], stats["steps_done"])


if __name__ == "__main__":
    main()
