"""UniEdit-Flow's editing loop, transcribed for the parity test (DSL-Lab/UniEdit-Flow,
``UniEdit-Flow_FLUX/src/flux/sampling.py::edit_uniedit``, the ``inverse=False`` branch).

On FLUX's packed tokens img (1, L, 4C) (the reference's batch is 1: its map is normalised over the whole
tensor), over the reference's descending ``timesteps`` (N+1 values), skipping the first N − round(α·N)
steps: both prompts' velocities at img, their difference's mean over the packed channels as a map,
min-max normalised, velocity fusion plus ω times the difference, an Euler step. ``model_trg`` and
``model_src`` are the transformer with the target's and the source's prompt. Nothing here calls ``ddim_lab``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, float], torch.Tensor]  # (packed tokens (1, L, D), t) → velocity (1, L, D)


def edit_uniedit(
    model_trg: Model, model_src: Model, img: torch.Tensor, timesteps: list[float], alpha: float, omega: float
) -> torch.Tensor:
    step_threshold = round(alpha * len(timesteps[:-1]))
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        if i < (len(timesteps[:-1]) - step_threshold):
            continue
        pred_trg = model_trg(img, t_curr)
        pred_src = model_src(img, t_curr)
        cfg_component = pred_trg - pred_src
        save_sub_map = cfg_component.abs().mean(dim=2, keepdim=True)  # (1, L, 1)
        save_sub_map = (save_sub_map - save_sub_map.min()) / (save_sub_map.max() - save_sub_map.min())
        fused_v = save_sub_map * pred_trg + (1 - save_sub_map) * pred_src
        pred = fused_v + (save_sub_map + 1) * omega * cfg_component
        img = img + (t_prev - t_curr) * pred
    return img
