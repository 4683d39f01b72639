"""RF-Solver-Edit's value sharing, transcribed for the parity test (wangjiangshan0725/RF-Solver-Edit,
``FLUX_Image_Edit/src/flux/sampling.py::denoise`` and ``modules/layers.py::SingleStreamBlock.forward``).

The reference's ``denoise`` loop (RF-Solver's second-order step) sets ``info['t']``, ``info['second_order']``
and ``info['inject']`` (the first ``inject_step`` sampling steps) before each model call; each
single-stream block with ``info['id'] > 19`` then stores its attention values V under the name
``f"{t}_{second_order}_{id}_single_V"`` on the storing pass and loads them, replacing its own V, on the
editing pass. Here the storing pass is a sampling pass with the source prompt (the reference stores during
inversion; the lab's batched editor takes V from the source's reconstruction), selected by
``info['store']`` where the reference reads ``info['inverse']``; ``info['first_block']`` replaces the
literal 20 (the tiny test model has one single-stream block). The processor is the single-stream attention
of diffusers' FLUX transformer with the store/load inserted after QK-norm, as the reference inserts it.
Nothing here calls ``ddim_lab``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

Model = Callable[[torch.Tensor, float], torch.Tensor]  # (packed tokens (B, L, D), t) → velocity (B, L, D)


class SingleStreamValueStore:
    """``SingleStreamBlock.forward``'s attention with the reference's feature store/load, as a processor."""

    def __init__(self, block_id: int, info: dict) -> None:
        self.block_id = block_id
        self.info = info

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        info = self.info
        q, k, v = (f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)  # (B, L, H, D)
        if info["inject"] and self.block_id >= info["first_block"]:
            name = f"{info['t']}_{info['second_order']}_{self.block_id}_single_V"
            if info["store"]:
                info["feature"][name] = v.clone()
            else:
                v = info["feature"][name]
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def denoise(model: Model, img: torch.Tensor, timesteps: list[float], info: dict) -> torch.Tensor:
    """``sampling.py::denoise`` with ``inverse=False``: RF-Solver steps down ``timesteps`` (descending)."""
    inject_list = [True] * info["inject_step"] + [False] * (len(timesteps[:-1]) - info["inject_step"])
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        info["t"] = t_curr
        info["second_order"] = False
        info["inject"] = inject_list[i]
        pred = model(img, t_curr)
        img_mid = img + (t_prev - t_curr) / 2 * pred
        info["second_order"] = True
        pred_mid = model(img_mid, t_curr + (t_prev - t_curr) / 2)
        first_order = (pred_mid - pred) / ((t_prev - t_curr) / 2)
        img = img + (t_prev - t_curr) * pred + 0.5 * (t_prev - t_curr) ** 2 * first_order
    return img


def rf_edit(
    model_source: Model, model_target: Model, img: torch.Tensor, timesteps: list[float], info: dict
) -> torch.Tensor:
    """The source pass storing V, then the target pass loading it; the target's final tokens."""
    info["feature"] = {}
    info["store"] = True
    denoise(model_source, img, timesteps, info)
    info["store"] = False
    return denoise(model_target, img, timesteps, info)
