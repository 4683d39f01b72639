"""KV-Edit, transcribed for the parity test (Xilluill/KV-Edit, commit 77129a2: ``models/kv_edit.py::
Flux_kv_edit.inverse / denoise``, ``flux/sampling.py::denoise_kv``, ``flux/modules/layers.py::
DoubleStreamBlock_kv / SingleStreamBlock_kv``, ``flux/math.py::attention``, ``flux/model.py::Flux_kv``).

The reference's storing pass (``info['inverse']``) keeps, per block and level, the image tokens' keys (after
QK-norm, before RoPE) and values, and the latent entering each step. Its editing pass runs the foreground
tokens only (``mask_indices``: tokens any of whose packed pixels are in the mask): before each Euler step the
latent becomes ``stored · (1 − mask) + latent · mask`` on those tokens; in each block the keys and values
are the stored ones with the foreground's own written in at ``mask_indices``, the queries (text and
foreground) get RoPE at their own positions (``pe_mask``), and ``attention_scale`` (``attn_scale`` on the
background image keys) is the additive ``attn_mask``. The result is the stored clean latent with
``z0 · (1 − mask) + x · mask`` on the foreground tokens.

Adaptations: the processors are diffusers' FLUX attention with the store/load inserted where the reference
inserts it (double-stream: image Q/K/V from ``to_*``, text from ``add_*_proj``; single-stream: one stream,
text first); the storing pass is a sampling pass with the source prompt keyed by its own level (the reference
stores during inversion, keyed one level off; the lab's batched editor takes features from the source's
reconstruction, as ``tests/references/rf_edit.py`` does), so its final latent stands for ``z0``. The
transformer is called with the foreground tokens as ``hidden_states`` and every token's ``img_ids``, as
``Flux_kv`` takes the full ``img_ids``. One image per call (the reference's batch is 1). Nothing here calls
``ddim_lab``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

Model = Callable[[torch.Tensor, float], torch.Tensor]  # (packed tokens (1, L', D), t) → velocity (1, L', D)


def prepare_mask(mask: torch.Tensor, h: int, w: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Flux_kv_edit.denoise``'s mask: (1, 1, R, R) → packed (1, L, 4C) {0, 1} and ``mask_indices`` (M,)."""
    mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    mask[mask > 0] = 1
    mask = mask.repeat(1, channels, 1, 1)  # einops ``repeat(mask, "b c h w -> b (repeat c) h w")``
    b, c = mask.shape[:2]  # ``rearrange(mask, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)``:
    mask = mask.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * w // 2, c * 4)
    bool_mask = mask.sum(dim=2) > 0.5
    return mask, torch.nonzero(bool_mask)[:, 1]


def attention_scale(txt_len: int, seq_len: int, mask_indices: torch.Tensor, scale: float) -> torch.Tensor:
    """``create_attention_scale``: (1, 1, 1, txt + L) with ``scale`` on the background image keys."""
    out = torch.zeros(1, txt_len + seq_len)
    background = torch.tensor(
        [i for i in range(seq_len) if i not in set(mask_indices.tolist())], dtype=torch.long
    )
    out[0, background + txt_len] = scale
    return out[:, None, None, :]


class KVStore:
    """``DoubleStreamBlock_kv`` / ``SingleStreamBlock_kv``'s attention as a diffusers FLUX processor."""

    def __init__(self, kind: str, block_id: int, info: dict) -> None:
        self.kind, self.block_id, self.info = kind, block_id, info

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        info, S = self.info, self.info["txt_len"]

        def qkv(x, fs, norms):
            q, k, v = (f(x).unflatten(-1, (attn.heads, -1)) for f in fs)  # (1, T, H, D)
            return norms[0](q), norms[1](k), v

        if encoder_hidden_states is not None:  # DoubleStreamBlock_kv
            img_q, img_k, img_v = qkv(
                hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
            )
            txt_q, txt_k, txt_v = qkv(
                encoder_hidden_states,
                (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k),
            )
        else:  # SingleStreamBlock_kv: text then image in one stream
            q, k, v = qkv(hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
            txt_q, txt_k, txt_v, img_q, img_k, img_v = (
                q[:, :S],
                k[:, :S],
                v[:, :S],
                q[:, S:],
                k[:, S:],
                v[:, S:],
            )
        name = f"{info['t']}_{self.block_id}_{self.kind}"
        pe_q, mask = image_rotary_emb, None
        if info["inverse"]:
            info["feature"][f"{name}_K"], info["feature"][f"{name}_V"] = img_k.clone(), img_v.clone()
        else:
            idx = info["mask_indices"]
            source_k, source_v = info["feature"][f"{name}_K"].clone(), info["feature"][f"{name}_V"].clone()
            source_k[:, idx], source_v[:, idx] = img_k, img_v
            img_k, img_v = source_k, source_v
            keep = torch.cat([torch.arange(S), idx + S])  # ``pe_mask``: text and foreground positions
            pe_q = tuple(f[keep] for f in image_rotary_emb)
            mask = info["attention_scale"]
        q, k, v = (torch.cat(p, dim=1) for p in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        q = apply_rotary_emb(q, pe_q, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        txt, img = out[:, :S], out[:, S:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


def denoise_kv(model: Model, img: torch.Tensor, timesteps: list[float], info: dict) -> torch.Tensor:
    """``denoise_kv``: Euler down ``timesteps``; the storing pass keeps each step's latent, the editing pass
    (foreground tokens only) blends with it before the call."""
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        info["t"] = t_curr
        if info["inverse"]:
            info["feature"][f"{t_curr}_img"] = img.clone()
        else:
            idx, m = info["mask_indices"], info["mask"][:, info["mask_indices"]]
            img = info["feature"][f"{t_curr}_img"][:, idx] * (1 - m) + img * m
        pred = model(img, t_curr)
        img = img + (t_prev - t_curr) * pred
    return img


def kv_edit(
    model_source: Model,
    model_target: Model,
    img: torch.Tensor,
    mask: torch.Tensor,
    timesteps: list[float],
    info: dict,
) -> torch.Tensor:
    """The storing pass, then ``Flux_kv_edit.denoise`` (``re_init`` off): its final packed latent (1, L, D)."""
    info["feature"], info["inverse"] = {}, True
    z0 = denoise_kv(model_source, img, timesteps, info)
    idx = info["mask_indices"]
    info["inverse"] = False
    x = denoise_kv(model_target, img[:, idx], timesteps, info)
    z0 = z0.clone()
    z0[:, idx] = z0[:, idx] * (1 - mask[:, idx]) + x * mask[:, idx]
    return z0
