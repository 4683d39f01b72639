"""``task=controlnet``: text-to-image with a ControlNet, as the course chapter runs it.

Steps: 1. load the inputs (``data.path``) and turn each into a control image with ``control=`` (Canny
edges, OpenPose skeletons, or a ready image); 2. build diffusers' ``StableDiffusionControlNetPipeline`` from
the loaded model's components, the ControlNet and the sampler ``sampler=ddim|unipc|dpmpp``; 3. for each
control image × prompt × seed, one seeded CPU generator per image (image j of a prompt uses seed
``seed + j``), negative prompts, ``controlnet.scale`` and guidance start/end; 4. decode, score each result
(control adherence: SSIM of its control image to the same signal of the result; on the digits model the digit
judge's agreement with the prompt: the data set's scorers, via ``tasks.generation_scores``), save the
images, the control images and a labelled grid (input | control | one column per prompt and seed), write
the rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    UniPCMultistepScheduler,
)
from omegaconf import DictConfig, OmegaConf

from ddim_lab import schema
from ddim_lab.config.compose import as_list
from ddim_lab.data.folders import Item, load_dataset
from ddim_lab.errors import ConfigError
from ddim_lab.methods.control import control_settings, make_control
from ddim_lab.methods.control.base import ControlSignal, save_control_images
from ddim_lab.models.latent import LatentModel
from ddim_lab.study.records import save_grid, write_results
from ddim_lab.study.tasks import generation_scores

log = logging.getLogger(__name__)

SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler, "dpmpp": DPMSolverMultistepScheduler}


def make_sampler(name: str, model: LatentModel, overrides: Mapping[str, Any] | None = None):
    """The sampler ``name`` from the model's scheduler config: ``ddim`` is the lab's DDIM (with the run's
    ``scheduler.overrides``); ``unipc``/``dpmpp`` are diffusers' multistep solvers ``from_config``, as in the
    chapter (``UniPCMultistepScheduler.from_config(pipe.scheduler.config)``)."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is not one of {', '.join(SAMPLERS)}")
    if name == "ddim":
        return model.scheduler(**dict(overrides or {}))
    return SAMPLERS[name].from_config(model.pipe.scheduler.config)


def control_pipeline(
    model: LatentModel, scheduler, runtime: Mapping[str, Any]
) -> StableDiffusionControlNetPipeline:
    """diffusers' ControlNet pipeline over the loaded model's own modules (no copy), with the runtime knobs:
    xformers attention for the ControlNet too, and model CPU offload over all components."""
    if model.family != "sd":
        raise ConfigError(f"task=controlnet runs UNet models; {model.name} is a {model.family} flow model")
    if model.controlnet is None:
        raise ConfigError(
            "task=controlnet needs a ControlNet: controlnet=sd15-canny|sd15-openpose|local|digits-canny"
        )
    p = model.pipe
    pipe = StableDiffusionControlNetPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        controlnet=model.controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if runtime.get("attention", "sdpa") == "xformers":
        model.controlnet.enable_xformers_memory_efficient_attention()
    if runtime.get("cpu_offload", False):
        pipe.enable_model_cpu_offload(device=model.device)
    return pipe


def generate(
    pipe: StableDiffusionControlNetPipeline,
    control: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    *,
    negative_prompt: str = "",
    num_steps: int = 30,
    guidance: float = 7.5,
    scale: float = 1.0,
    guidance_start: float = 0.0,
    guidance_end: float = 1.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Final latents (B, C, h, w) of ``pipe`` for row-aligned control images (B, 3, R, R) in [0, 1], prompts
    and seeds; one CPU generator per row, ``batch_size`` rows per pipeline call."""
    out = []
    resolution = control.shape[-1]
    for lo in range(0, len(prompts), batch_size):
        hi = min(lo + batch_size, len(prompts))
        latents = pipe(
            prompts[lo:hi],
            image=control[lo:hi],
            height=resolution,
            width=resolution,
            negative_prompt=[negative_prompt] * (hi - lo),
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[lo:hi]],
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            controlnet_conditioning_scale=scale,
            control_guidance_start=guidance_start,
            control_guidance_end=guidance_end,
            output_type="latent",
        ).images
        out.append(latents.float().cpu())
    return torch.cat(out)


def own_captions(cfg: DictConfig) -> bool:
    """``prompt=""`` (a single empty string, the default): each control image is sampled with its caption."""
    return as_list(cfg.prompt) in ([], [""])


def prompts_for(cfg: DictConfig, item: Item) -> list[str]:
    """The prompts of one control image: the ``prompt`` string or list as given, or its own caption."""
    return [item.prompt] if own_captions(cfg) else [str(p) for p in as_list(cfg.prompt)]


def controlnet_task(cfg: DictConfig, model: LatentModel, run_dir: Path, logger) -> pd.DataFrame:
    """Controlled text-to-image over every input's control image × prompt × guidance × ``num_images`` seeds."""
    start = time.perf_counter()
    signal: ControlSignal | None = make_control(OmegaConf.to_container(cfg.control, resolve=True))
    if signal is None:
        raise ConfigError("task=controlnet needs a control signal: control=canny|openpose|image")
    items = load_dataset(cfg.data.path, model.resolution, "")
    images = torch.stack([it.image for it in items])
    controls = signal(images, [it.name for it in items])  # (n, 3, R, R)
    save_control_images(run_dir / "controls", [it.name for it in items], controls)
    # one row per (control image, prompt, guidance, seed), image-major
    jobs = [
        (i, p, float(g), int(cfg.seed) + j)
        for i, it in enumerate(items)
        for p in prompts_for(cfg, it)
        for g in as_list(cfg.guidance_scale)
        for j in range(cfg.num_images)
    ]
    sampler = make_sampler(cfg.sampler, model, cfg.scheduler.overrides)
    pipe = control_pipeline(model, sampler, cfg.runtime)
    settings = control_settings(cfg)
    latents = torch.zeros(len(jobs), *model.latent_shape)  # (B, C, h, w)
    for guidance in as_list(cfg.guidance_scale):  # one pipeline call (in batches) per guidance scale
        rows = [r for r, job in enumerate(jobs) if job[2] == float(guidance)]
        latents[rows] = generate(
            pipe,
            controls[[jobs[r][0] for r in rows]],
            [jobs[r][1] for r in rows],
            [jobs[r][3] for r in rows],
            negative_prompt=cfg.negative_prompt,
            num_steps=cfg.num_steps,
            guidance=float(guidance),
            scale=settings["controlnet_scale"],
            guidance_start=settings["control_guidance_start"],
            guidance_end=settings["control_guidance_end"],
            batch_size=cfg.batch_size,
        )
    results = model.decode(latents)
    torch.save(latents, run_dir / "latents.pt")
    row_controls = controls[[i for i, *_ in jobs]]  # (B, 3, R, R): each row's control image
    scores = generation_scores(cfg, results, [p for _, p, *_ in jobs], row_controls, signal)
    seconds = (time.perf_counter() - start) / len(jobs)
    shared = schema.generation_values(cfg) | {
        "scheduler": cfg.sampler,  # the pipeline's sampler, not the lab's DDIM scheduler config
        "eta": 0.0,
        "seconds": seconds,
    }
    rows = []
    for r, (i, p, g, s) in enumerate(jobs):
        name = f"controlnet_{r:03d}"
        save_grid(run_dir / f"{name}.png", [("", results[r : r + 1])], [""], min_cell=model.resolution)
        rows.append(
            schema.row(
                **shared
                | settings
                | {"image": items[i].name, "prompt": p, "guidance_scale": g, "seed": s, "output": f"{name}.png"}
                | {k: v[r] for k, v in scores.items()}
                | {"unet_evals": cfg.num_steps * (2 if g > 1 else 1)}  # the pipeline guides only above 1
            )
        )
    table = write_results(rows, run_dir)
    per_item = len(jobs) // len(items)
    columns = [("input", images), (f"control: {settings['control']}", controls)]
    for c in range(per_item):
        _, p, g, s = jobs[c]
        header = f"g={g:g} seed {s}" if own_captions(cfg) else f"{p or '(empty prompt)'} g={g:g} seed {s}"
        columns.append((header, results[c::per_item]))
    grid = save_grid(run_dir / "controlnet.png", columns, [f"{it.name}: {it.prompt}" for it in items])
    logger.log_image(grid, f"controlnet {settings['controlnet']} scale={settings['controlnet_scale']}")
    logger.log_rows(table)
    log.info(
        "%d controlled samples (%s, %s) written to %s", len(jobs), settings["controlnet"], cfg.sampler, run_dir
    )
    return table
