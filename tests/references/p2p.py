"""Prompt-to-prompt as its references run it, transcribed into torch for the parity tests.

Written from google/prompt-to-prompt (``ptp_utils.py``: ``diffusion_step``, ``register_attention_control``,
``get_word_inds``, ``get_time_words_attention_alpha``; ``seq_aligner.py``: ``global_align``,
``get_refinement_mapper``, ``get_replacement_mapper``; ``prompt-to-prompt_stable.ipynb``: ``LocalBlend``,
``AttentionStore``, ``AttentionControlEdit``, ``AttentionReplace``, ``AttentionRefine``, ``AttentionReweight``)
and the PIE-Bench copy of those classes (cure-lab/PnPInversion, ``models/p2p/attention_control.py``), whose
settings the lab's defaults follow: self-attention replaced in layers with ≤ 32² queries, and a local blend
that starts after ``int(start_blend · N)`` steps (0.2 there and in null-text's notebook; 0 in the original
notebook). Nothing here calls ``ddim_lab``.

One edit = one batch of two prompts [source, target] from one start latent, sampled by diffusers'
``DDIMScheduler.step`` with classifier-free guidance, uncond and cond rows in one UNet call
(``LOW_RESOURCE = False``); the controller sees and edits the cond half of every attention map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as nnf

# -- token bookkeeping (seq_aligner.py, ptp_utils.py) ----------------------------------------------------------


def get_word_inds(text: str, word: str, tokenizer: Any) -> list[int]:
    """Token positions (start-of-text = 0) of ``word`` in ``text``, by decoding each token and counting
    characters against the whitespace words (``ptp_utils.get_word_inds``)."""
    split_text = text.split(" ")
    word_place = [i for i, w in enumerate(split_text) if w == word]
    out = []
    if word_place:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return out


def global_align(x: Sequence[int], y: Sequence[int]) -> list[tuple[int, int]]:
    """Needleman–Wunsch (gap 0, match 1, mismatch −1), traceback ties left, up, diagonal; for each token of y
    its aligned token of x or −1 (``global_align`` + ``get_aligned_sequences``)."""
    gap, match, mismatch = 0, 1, -1
    n, m = len(x), len(y)
    matrix = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        matrix[0][j], trace[0][j] = j * gap, 1
    for i in range(1, n + 1):
        matrix[i][0], trace[i][0] = i * gap, 2
    trace[0][0] = 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = matrix[i][j - 1] + gap
            up = matrix[i - 1][j] + gap
            diag = matrix[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i][j] = max(left, up, diag)
            trace[i][j] = 1 if matrix[i][j] == left else 2 if matrix[i][j] == up else 3
    i, j, mapper = n, m, []
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            mapper.append((j, i))
        elif trace[i][j] == 1:
            j -= 1
            mapper.append((j, -1))
        elif trace[i][j] == 2:
            i -= 1
        else:
            break
    return mapper[::-1]


def get_refinement_mapper(x: str, y: str, tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper (max_len,) long, alphas (max_len,)) of ``seq_aligner.get_mapper``: target token j reads source
    token mapper[j] where alphas[j] = 1; past the target's tokens, the same position."""
    x_seq, y_seq = tokenizer.encode(x), tokenizer.encode(y)
    base = torch.tensor(global_align(x_seq, y_seq), dtype=torch.int64)  # (len(y), 2)
    alphas = torch.ones(max_len)
    alphas[: base.shape[0]] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: base.shape[0]] = base[:, 1]
    mapper[base.shape[0] :] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_replacement_mapper(x: str, y: str, tokenizer: Any, max_len: int) -> torch.Tensor:
    """(max_len, max_len) matrix of ``seq_aligner.get_replacement_mapper_``: source token i → target token j
    (words of equal token count map one to one, others spread by 1/len)."""
    words_x, words_y = x.split(" "), y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError("attention replacement needs prompts with the same number of words")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, words_x[i], tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, words_y[i], tokenizer) for i in inds_replace]
    mapper = torch.zeros(max_len, max_len)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(inds_source) and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1
            else:
                for t in tgt:
                    mapper[src, t] = 1 / len(tgt)
            cur += 1
            i += len(src)
            j += len(tgt)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return mapper


def get_time_words_attention_alpha(
    num_steps: int, cross_replace_steps: float, max_num_words: int
) -> torch.Tensor:
    """(num_steps + 1, 1, 1, max_num_words): 1 on the steps whose cross-attention is replaced, the first
    int(c · (num_steps + 1)) (the table has num_steps + 1 rows)."""
    alpha = torch.zeros(num_steps + 1, 1, 1, max_num_words)
    start, end = int(0.0 * alpha.shape[0]), int(cross_replace_steps * alpha.shape[0])
    alpha[start:end] = 1
    return alpha


def get_equalizer(text: str, words: Sequence[str], values: Sequence[float], tokenizer: Any, length: int):
    """(1, length): the re-weighting of each target token (``get_equalizer``)."""
    equalizer = torch.ones(1, length)
    for word, value in zip(words, values, strict=True):
        equalizer[:, get_word_inds(text, word, tokenizer)] = value
    return equalizer


# -- the controller (AttentionStore + AttentionControlEdit + Refine/Replace + Reweight, LocalBlend) -----------


class Controller:
    """An edit of the pair [source, target] (``batch_size`` = 2): ``forward`` edits the cond half of one
    layer's maps (2·heads, Q, L); ``step_callback`` blends the latents after each step.

    ``mode``: ``refine`` (``AttentionRefine``) or ``replace`` (``AttentionReplace``); ``equalizer`` wraps it
    in ``AttentionReweight``. ``blend``: None or (source word tokens, target word tokens, threshold,
    start_blend fraction, layer queries); ``union``: keep the union of the masks over steps (not in the
    references; the lab's stated variant).
    """

    def __init__(
        self,
        num_steps: int,
        cross_replace_steps: float,
        self_replace_steps: float,
        mode: str,
        mapper: torch.Tensor,
        alphas: torch.Tensor | None = None,
        equalizer: torch.Tensor | None = None,
        blend: tuple[list[int], list[int], float, float, int] | None = None,
        union: bool = False,
        self_max_queries: int = 32**2,
        num_att_layers: int = 0,
    ) -> None:
        self.batch_size = 2
        length = mapper.shape[-1]
        self.cross_replace_alpha = get_time_words_attention_alpha(num_steps, cross_replace_steps, length)
        self.num_self_replace = int(num_steps * 0.0), int(num_steps * self_replace_steps)
        self.mode, self.mapper, self.alphas, self.equalizer = mode, mapper, alphas, equalizer
        self.self_max_queries = self_max_queries
        self.num_att_layers = num_att_layers
        self.cur_step = self.cur_att_layer = 0
        self.step_store: dict[str, list[torch.Tensor]] = self.empty_store()
        self.attention_store: dict[str, list[torch.Tensor]] = {}
        self.blend, self.union = blend, union
        self.counter = 0
        self.mask: torch.Tensor | None = None
        if blend is not None:
            self.alpha_layers = torch.zeros(2, 1, 1, 1, 1, length)
            self.alpha_layers[0, ..., blend[0]] = 1
            self.alpha_layers[1, ..., blend[1]] = 1
            self.start_blend = int(blend[3] * num_steps)

    @staticmethod
    def empty_store() -> dict[str, list[torch.Tensor]]:
        return {f"{p}_{k}": [] for p in ("down", "mid", "up") for k in ("cross", "self")}

    # AttentionControl.__call__ (LOW_RESOURCE = False): the cond half, then count layers and steps
    def __call__(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        h = attn.shape[0]
        attn[h // 2 :] = self.forward(attn[h // 2 :], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        """attn_base (heads, Q, L) the source's maps, att_replace (1, heads, Q, L) the target's."""
        if self.mode == "replace":
            out = torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)
        else:
            base = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)  # (1, heads, Q, L)
            out = base * self.alphas + att_replace * (1 - self.alphas)
        if self.equalizer is not None:  # AttentionReweight around its previous controller
            out = out * self.equalizer[:, None, None, :]
        return out

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= 32**2:  # AttentionStore: the maps, edited below in place
            self.step_store[key].append(attn)
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            h = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step]
                new = self.replace_cross_attention(attn_base, attn_replace) * alpha_words
                attn[1:] = new + (1 - alpha_words) * attn_replace
            elif attn_replace.shape[2] <= self.self_max_queries:
                attn[1:] = attn_base.unsqueeze(0).expand(attn_replace.shape[0], *attn_base.shape)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn

    def between_steps(self) -> None:
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.empty_store()

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        """LocalBlend: the target keeps its latent where either word attends, the source's elsewhere. The
        reference reads its 16×16 layers at 512 px (``down_cross[2:4] + up_cross[:3]``); here the down and up
        cross-attention layers with ``blend[4]`` queries."""
        if self.blend is None:
            return x_t
        self.counter += 1
        if self.counter <= self.start_blend:
            return x_t
        queries, threshold = self.blend[4], self.blend[2]
        res = int(queries**0.5)
        maps = [
            m for key in ("down_cross", "up_cross") for m in self.attention_store[key] if m.shape[1] == queries
        ]
        maps = torch.cat([m.reshape(2, -1, 1, res, res, m.shape[-1]) for m in maps], dim=1)
        maps = (maps * self.alpha_layers).sum(-1).mean(1)  # (2, 1, res, res)
        mask = nnf.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = nnf.interpolate(mask, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(threshold)
        mask = mask[:1] + mask  # PnPInversion: each row's mask or the source's
        if self.union:
            mask = mask if self.mask is None else mask | self.mask
            self.mask = mask
        return x_t[:1] + mask.float() * (x_t - x_t[:1])


class AttnProcessor:
    """``register_attention_control``'s ``forward`` as a diffusers attention processor: the maps
    softmax(q kᵀ · scale) are materialised and handed to the controller before they weight the values."""

    def __init__(self, controller: Controller, place_in_unet: str) -> None:
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if hidden_states.ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        h = attn.heads
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        def heads_to_batch(t: torch.Tensor) -> torch.Tensor:  # (b, s, h·d) → (b·h, s, d)
            b, s, dim = t.shape
            return t.reshape(b, s, h, dim // h).permute(0, 2, 1, 3).reshape(b * h, s, dim // h)

        q, k, v = heads_to_batch(q), heads_to_batch(k), heads_to_batch(v)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
        probs = self.controller(sim.softmax(dim=-1), is_cross, self.place_in_unet)
        out = torch.einsum("b i j, b j d -> b i d", probs, v)
        b = out.shape[0] // h
        out = out.reshape(b, h, out.shape[1], out.shape[2]).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if residual.ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def register_attention_control(unet: torch.nn.Module, controller: Controller) -> dict[str, Any]:
    """Every attention layer of ``unet`` reports to ``controller`` (place: down, mid, up); returns the
    processors it replaced."""
    saved = unet.attn_processors
    unet.set_attn_processor({name: AttnProcessor(controller, name.split("_")[0]) for name in saved})
    controller.num_att_layers = len(saved)
    return saved


@torch.no_grad()
def text2image_from_latent(
    unet: torch.nn.Module,
    scheduler: Any,
    controller: Controller,
    latent: torch.Tensor,
    text: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """``text2image_ldm_stable``'s loop from a given start latent (1, C, H, W): both prompts' rows start
    there; ``diffusion_step`` per timestep. text, uncond: (2, L, D) of [source, target]. Returns the final
    latents (2, C, H, W)."""
    latents = latent.expand(2, *latent.shape[1:])
    context = torch.cat([uncond, text])
    saved = register_attention_control(unet, controller)
    try:
        for t in scheduler.timesteps:
            noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
            noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents)["prev_sample"]
            latents = controller.step_callback(latents)
    finally:
        unet.set_attn_processor(saved)
    return latents
