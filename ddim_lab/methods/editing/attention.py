"""Prompt-to-prompt attention control as a diffusers attention processor (Hertz et al. 2022, §3.2).

Every ``Attention`` module of the UNet gets a :class:`P2PAttnProcessor`: the computation of diffusers'
``AttnProcessor2_0`` (fused scaled-dot-product attention), followed, in the UNet calls where a
:class:`Layout` is set, by the edit of each *target* row's attention with its *source* row's (both rows in
the same call, prompt branch only, as the reference). With M = softmax(Q Kᵀ/√d) the target's map and M* its
source's:

    self-attention (layers with ≤ 32² queries, while the pair's step s < self_replace_steps · n):
        M ← M*
    cross-attention (while s < cross_replace_steps · n), per target token j:
        M[:, j] ← w_j (α_j M*[:, map_j] + (1 − α_j) M[:, j])

(map, α): the token alignment (:mod:`ddim_lab.methods.editing.align`; replace: identity, refine: α = 0 for added
tokens), w: re-weighting (1 = none; the result is not renormalised, as in the reference). The maps are never
materialised for the output: M V is linear in the values, so

    M_edit V = softmax(Q* K*ᵀ/√d) V′ + softmax(Q Kᵀ/√d) V″,   V′_i = Σ_{j: map_j = i} w_j α_j v_j,
                                                           V″_j = w_j (1 − α_j) v_j

— two fused attention calls (one for self-attention: softmax(Q* K*ᵀ/√d) V). With identical prompts and full
replacement the target's output is its source's, bit for bit.

For local blending the processor also records, in cross-attention layers with ≤ 16² queries, the (edited)
maps of each pair's blended-word tokens, averaged over heads (``Layout.maps``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SELF_REPLACE_MAX_QUERIES = 32**2  # PIE-Bench's reference (PnPInversion); the original P2P code uses 16²
BLEND_MAX_QUERIES = 16**2  # maps kept for local blending: the reference's 16×16 layers at 512 px and below


@dataclass
class Layout:
    """Who is who in one UNet call: m controlled target rows (UNet batch positions, prompt branch) and, per
    target, its source's position, whether this step replaces cross/self-attention, and its token edit."""

    target: torch.Tensor  # (m,) long
    source: torch.Tensor  # (m,) long
    cross: torch.Tensor  # (m,) bool: cross-attention edited at this step
    self_attention: torch.Tensor  # (m,) bool: self-attention replaced at this step
    token_map: torch.Tensor  # (m, L) long: target token j reads source token token_map[j]
    aligned: torch.Tensor  # (m, L) float α: 1 where target token j has a source counterpart
    weight: torch.Tensor  # (m, L) float w: re-weighting of target token j
    blend_source: torch.Tensor | None = None  # (m, L) float: the source's blended-word tokens; None: no blend
    blend_target: torch.Tensor | None = None  # (m, L) float: the target's blended-word tokens
    maps: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (queries, (m, 2, Q)) per layer


def _rows(mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask[rows]


class AttentionControl:
    """The state the processors share: the layout of the UNet call in progress (None: no control)."""

    def __init__(self) -> None:
        self.layout: Layout | None = None

    def edit(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_cross: bool,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One layer's attention output (B, heads, Q, d) with the target rows edited; q (B, heads, Q, d),
        k and v (B, heads, K, d) as the layer computed them."""
        lay = self.layout
        if lay is None or not len(lay.target):
            return out
        queries = q.shape[2]
        if is_cross:
            if lay.blend_source is not None and queries <= BLEND_MAX_QUERIES:
                lay.maps.append((queries, blend_maps(q, k, lay)))
            on = lay.cross.nonzero().flatten()
            if len(on):
                out[lay.target[on]] = cross_edit(q, k, v, lay, on, mask).to(out.dtype)
        elif queries <= SELF_REPLACE_MAX_QUERIES:
            on = lay.self_attention.nonzero().flatten()
            if len(on):  # M ← M*: the source's queries and keys, the target's values
                t, s = lay.target[on], lay.source[on]
                out[t] = F.scaled_dot_product_attention(q[s], k[s], v[t], attn_mask=_rows(mask, s))
        return out


def cross_edit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, on: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """M_edit V for the targets ``on`` (n,) of ``lay``: (n, heads, Q, d)."""
    t, s = lay.target[on], lay.source[on]
    w, a = lay.weight[on].to(v.dtype), lay.aligned[on].to(v.dtype)  # (n, L)
    vt = v[t]  # (n, heads, L, d)
    # 1. aligned tokens read the source's map: Σ_j w_j α_j M*[:, map_j] v_j = M* V′ (V′ gathers by map)
    index = lay.token_map[on][:, None, :, None].expand_as(vt)
    v_src = torch.zeros_like(vt).scatter_add_(2, index, vt * (w * a)[:, None, :, None])
    out = F.scaled_dot_product_attention(q[s], k[s], v_src, attn_mask=_rows(mask, s))
    # 2. tokens without a counterpart keep their own map: Σ_j w_j (1 − α_j) M[:, j] v_j
    own = w * (1 - a)
    if bool((own != 0).any()):
        out = out + F.scaled_dot_product_attention(
            q[t], k[t], vt * own[:, None, :, None], attn_mask=_rows(mask, t)
        )
    return out


def blend_maps(q: torch.Tensor, k: torch.Tensor, lay: Layout) -> torch.Tensor:
    """(m, 2, Q): per pair, the source's map of its blended word and the target's (edited where cross-attention
    is edited this step), each summed over the word's tokens and averaged over heads."""
    scale = q.shape[-1] ** -0.5
    t, s = lay.target, lay.source
    m_src = (q[s].float() @ k[s].float().transpose(-1, -2) * scale).softmax(-1)  # (m, heads, Q, L)
    m_tgt = (q[t].float() @ k[t].float().transpose(-1, -2) * scale).softmax(-1)
    index = lay.token_map[:, None, None, :].expand_as(m_src)
    a, w = lay.aligned[:, None, None, :], lay.weight[:, None, None, :]
    edited = w * (a * m_src.gather(-1, index) + (1 - a) * m_tgt)
    m_tgt = torch.where(lay.cross[:, None, None, None], edited, m_tgt)
    src = (m_src * lay.blend_source[:, None, None, :]).sum(-1).mean(1)  # (m, Q)
    tgt = (m_tgt * lay.blend_target[:, None, None, :]).sum(-1).mean(1)
    return torch.stack([src, tgt], dim=1)


class P2PAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with :meth:`AttentionControl.edit` applied to its attention output."""

    def __init__(self, control: AttentionControl) -> None:
        self.control = control

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # 1. queries, keys and values: (B, heads, tokens, d)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # 2. attention, then the prompt-to-prompt edit of the target rows
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = self.control.edit(hidden_states, query, key, value, is_cross, attention_mask)
        # 3. heads back together, output projection, residual
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def controlled(unet: torch.nn.Module, control: AttentionControl):
    """Every attention module of ``unet`` runs :class:`P2PAttnProcessor` inside the block; the original
    processors are restored after it."""
    saved = unet.attn_processors
    unet.set_attn_processor({name: P2PAttnProcessor(control) for name in saved})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)
