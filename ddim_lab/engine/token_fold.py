"""Folding a run of identical context tokens of an SD3 transformer into one token with a log-count bias.

SD3 without T5 (the lab's ``digits-flow``) pads each prompt with 256 zero "T5" tokens, and every joint block
carries them along. Identical context tokens stay identical through the whole ``SD3Transformer2DModel``
(diffusers 0.42, ``transformer_sd3.py`` and ``JointTransformerBlock`` in ``attention.py``):

    1. ``context_embedder`` is a Linear map per token; the text stream gets no positional embedding
       (``pos_embed`` acts on the image tokens only).
    2. In a block, ``norm1_context`` (AdaLayerNormZero, or AdaLayerNormContinuous in the last,
       ``context_pre_only`` block) is a LayerNorm per token modulated by the row's time embedding;
       ``add_q/k/v_proj`` (and ``norm_added_q/k`` with QK-norm) act per token, so equal tokens give equal
       queries, keys and values.
    3. Joint attention: every query attends over the same keys, so equal queries give equal outputs;
       ``to_add_out``, the gated residual, ``norm2_context`` and ``ff_context`` act per token again.
    4. The last block is ``context_pre_only``: its context outputs are dropped, only the image stream goes
       on. SD3.5's second attention (``attn2``) is image-only self-attention and never sees the context.

Attention is the only place where tokens mix. For a query q, keys k_j with values v_j (image tokens and
distinct context tokens) and one key κ with value ν repeated n times (d the head width):

    softmax over the copies = (Σ_j e^{q·k_j/√d} v_j + n e^{q·κ/√d} ν) / (Σ_j e^{q·k_j/√d} + n e^{q·κ/√d})
                            = the same with a single κ whose logit is q·κ/√d + log n,          (Eq. 1)

because n e^{s} = e^{s + log n}. So keeping one copy and adding log n to its attention logit, in every joint
attention, gives every image token and every kept context token exactly the function of the unfolded model;
only the order of the floating-point sums changes (float32: network outputs within 1e-5 on digits-flow).

What folds: the longest run of trailing context tokens that are bitwise identical to their row's last token,
shortened to the shortest run over the batch rows (rows may be different prompts, or CFG's null rows, and
keep one context length). A run shorter than 2 (SD3 with a real T5, whose padding outputs differ by position)
folds nothing and the stock processors run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0


def trailing_run(context: torch.Tensor) -> int:
    """Length of the run of trailing tokens bitwise identical to their row's last token, shortest over rows.

    context (B, L, D) → k in [1, L] (0 for an empty context). Bitwise, so 0.0 and −0.0 never fold together.
    """
    if context.shape[1] == 0:
        return 0
    same_size_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[context.element_size()]
    bits = context.contiguous().view(same_size_int)  # (B, L, D) the float bits
    same = (bits == bits[:, -1:]).all(dim=-1)  # (B, L): token i equals its row's last token
    run = same.flip(1).to(torch.int32).cumprod(dim=1).sum(dim=1)  # (B,) trailing equal tokens per row
    return int(run.min())


def fold_trailing_tokens(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The context with its trailing run of n ≥ 2 identical tokens kept once, and each kept token's log-count.

    context (B, L, D) → (folded (B, L − n + 1, D), log_counts (L − n + 1,) float64: 0 for the tokens before
    the run, log n for the kept copy), or None when nothing repeats (n < 2).
    """
    n = trailing_run(context)
    if n < 2:
        return None
    kept = context.shape[1] - n + 1
    log_counts = torch.zeros(kept, dtype=torch.float64)
    log_counts[-1] = math.log(n)
    return context[:, :kept], log_counts


class FoldedJointAttnProcessor:
    """SD3 joint attention in which context token i stands for exp(log_counts[i]) identical copies (Eq. 1).

    The same projections, QK-norms and output maps as diffusers' ``JointAttnProcessor2_0``; the only change is
    an additive logit bias (1, 1, 1, N_image + S_context): 0 on the image tokens, ``log_counts`` on the
    context keys, passed to ``scaled_dot_product_attention`` as ``attn_mask``. ``log_counts=None`` folds
    nothing (zero bias on any context). An ``attention_mask`` given to the call, an additive logit bias
    (b | 1, 1, 1, N_image + S_context) over [image; context] keys, adds to it (an editor's key bias, such as
    ``kv_edit``'s; the stock processor ignores ``attention_mask``).
    """

    def __init__(self, log_counts: torch.Tensor | None = None) -> None:
        self.log_counts = log_counts  # (S_context,), or None: no fold

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("the folded joint attention takes a context")
        B, N = hidden_states.shape[:2]  # image rows and tokens
        S = encoder_hidden_states.shape[1]  # kept context tokens
        log_counts = torch.zeros(S, dtype=torch.float64) if self.log_counts is None else self.log_counts
        if len(log_counts) != S:
            raise ValueError(f"{S} context tokens but {len(log_counts)} log-counts")

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, h·d) → (B, h, T, d)
            return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        # 1. image and context projections, per token (as JointAttnProcessor2_0)
        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))  # (B, h, N, d)
        cq, ck, cv = (
            heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )  # (B, h, S, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        # 2. softmax(q kᵀ/√d + b) v over [image; context] keys, b = [0…0; log_counts]      (Eq. 1)
        bias = F.pad(log_counts.to(q.device, q.dtype), (N, 0)).view(1, 1, 1, N + S)
        if attention_mask is not None:  # an editor's additive key bias (b | 1, 1, 1, N + S)
            bias = bias + attention_mask.to(q.device, q.dtype)
        out = F.scaled_dot_product_attention(
            torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2), attn_mask=bias
        )  # (B, h, N + S, d)
        out = out.transpose(1, 2).reshape(B, N + S, -1).to(q.dtype)
        # 3. split the streams and project them back
        image, context = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def joint_attentions(transformer: torch.nn.Module) -> list[Attention]:
    """The joint (image + context) attention of every block of an SD3 transformer (not SD3.5's ``attn2``)."""
    return [block.attn for block in getattr(transformer, "transformer_blocks", [])]


def can_fold(transformer: torch.nn.Module) -> bool:
    """Whether every joint attention runs diffusers' stock ``JointAttnProcessor2_0`` or the unfolded
    ``FoldedJointAttnProcessor()`` (the stock one with an editor's key bias, which the folded one honours
    too): another processor (an IP-adapter's) may mix tokens differently, so the fold only replaces these."""

    def plain(p: object) -> bool:
        return type(p) is JointAttnProcessor2_0 or (
            type(p) is FoldedJointAttnProcessor and p.log_counts is None
        )

    attns = joint_attentions(transformer)
    return bool(attns) and all(plain(a.processor) for a in attns)


@contextmanager
def folded_attention(transformer: torch.nn.Module, folded: FoldedJointAttnProcessor) -> Iterator[None]:
    """Run every block's joint attention with ``folded`` inside the ``with``; the previous processors come back
    on exit (also on an error). Reuse one ``folded`` per context length: a compiled transformer guards on the
    processor object."""
    attns = joint_attentions(transformer)
    previous = [a.processor for a in attns]
    try:
        for a in attns:
            a.set_processor(folded)
        yield
    finally:
        for a, p in zip(attns, previous, strict=True):
            a.set_processor(p)
