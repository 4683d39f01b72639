"""Prompt-to-prompt editing (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
Control"): the target is sampled beside its source, in the same UNet calls, and takes the source's attention.

1. **Pairs.** Each edit trajectory becomes two rows of one ``SampleRows``: its *source* (the source prompt,
   ``edit`` False: the inverter's own reconstruction path — null-text's per-step null embeddings, Direct
   inversion's pull onto the pivot) and its *target* (the target prompt, ``edit`` True), with the same
   artifact row, start step and noise. Rows are tagged in ``cond.extra`` (role, pair id, start step, token
   tables; row-aligned, so they survive ``cond[rows]`` and chunking). Pairs come first and adjacent, and
   chunks are rounded down to an even size (at least 2), so a pair never leaves its chunk. Rows that are not
   edits (reconstructions in the grid) ride along unpaired.
2. **Control.** Around each UNet call the denoiser sets the call's ``attention.Layout`` (the batch positions
   of each target and its source on the prompt branch, which of the pair's steps this is); the attention
   processors (``unet.set_attn_processor``) then edit the targets' cross- and self-attention (``attention``):
   replace or refine (token alignment, ``align``), re-weighting, during the pair's first steps (windows below).
3. **Local blend** on the blended words (``blend``), where the data names them
   (PIE-Bench's ``blended_word``) or ``blend_words`` does.
4. The target rows' results are returned in the rows' order; an edit costs its target and its source
   trajectory.

**Windows** (as the reference, google/prompt-to-prompt, counts them). Its controller is built for the number
of steps n its sampler runs and counts the steps it has run (``cur_step``). Cross-attention is replaced on
steps s < int(c · (n + 1)), c = ``cross_replace_steps``: ``ptp_utils.get_time_words_attention_alpha`` builds
an α table of n + 1 rows and ``update_alpha_time_word`` sets rows [0, int(c · (n + 1))) to 1 (not ⌊c · n⌋:
the two differ when c · n and c · (n + 1) straddle an integer, e.g. n = 12, c = 0.4: 5 steps, not 4).
Self-attention is replaced on steps s < int(n · τ), τ = ``self_replace_steps`` (``AttentionControlEdit``'s
``num_self_replace``). The reference always samples all N steps (n = N). A pair sampled from start step k
runs n = N − k steps, and the lab gives it the controller the reference builds for a run of that many steps:
the windows above with n = N − k, counted from the pair's first sampled step (s = i − k at plan step i). So a
fraction keeps its meaning (the share of the edit's own steps) at every start step, and k = 0 is the
reference exactly.

With identical source and target prompts and full replacement (``cross_replace_steps`` =
``self_replace_steps`` = 1, any mode, weights 1) the target computes exactly what its source computes: the
reconstruction. Defaults are PIE-Bench's reference settings for P2P (cure-lab/PnPInversion,
``run_editing_p2p.py``): refine, cross 0.4, self 0.6, the target word re-weighted by 2, local blend at 0.3.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import UNet2DConditionModel

from ddim_lab.engine.ddim import Denoiser, Prediction, predict
from ddim_lab.engine.denoiser import Conditioning, cfg_branches
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing.align import refine_map, replace_map, token_ids, word_tokens
from ddim_lab.methods.editing.attention import AttentionControl, Layout, controlled
from ddim_lab.methods.editing.base import Editor, EditPrompts, WrappingDenoiser
from ddim_lab.methods.editing.blend import LocalBlend
from ddim_lab.methods.editing.pairs import SINGLE, SOURCE, TARGET, pair_rows
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows

log = logging.getLogger(__name__)

MODES = ("refine", "replace")
ROLE, PAIR, START = "p2p_role", "p2p_pair", "p2p_start"  # cond.extra keys: (B,) long each
TOKEN_MAP, ALIGNED, WEIGHT, BLEND = "p2p_token_map", "p2p_aligned", "p2p_weight", "p2p_blend"  # (B, L) each


@dataclass
class TokenTable:
    """One row's token edit: which source token each of its tokens reads (α = 1) or not, its re-weighting,
    and the tokens of its own blended word (all (L,))."""

    token_map: torch.Tensor
    aligned: torch.Tensor
    weight: torch.Tensor
    blend: torch.Tensor

    @staticmethod
    def plain(length: int) -> TokenTable:
        return TokenTable(torch.arange(length), torch.ones(length), torch.ones(length), torch.zeros(length))


@dataclass
class PromptToPrompt(Editor):
    """editor=p2p: attention control between each edit and its source, batched as pairs."""

    mode: str = "refine"  # refine: word alignment, any prompts | replace: token for token, same token count
    cross_replace_steps: float = 0.4  # c: the source's cross-attention on int(c·(n+1)) of the n sampled steps
    self_replace_steps: float = 0.6  # τ: the source's self-attention (≤ 32² queries) on int(n·τ) steps
    reweight: dict[str, float] = field(default_factory=dict)  # target word → scale of its cross-attention
    target_word_weight: float = 2.0  # scale of the target's blended word (PIE-Bench reference: 2; 1 = off)
    local_blend: bool = True  # keep the edit where the blended words attend
    blend_threshold: float = 0.3  # threshold on the normalised maps (reference: 0.3)
    blend_words: str | None = None  # "source target" for rows whose data names none

    name: ClassVar[str] = "p2p"

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"editor=p2p: mode={self.mode!r} must be one of {', '.join(MODES)}")
        for key in ("cross_replace_steps", "self_replace_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"editor=p2p: {key}={value!r} must be a fraction in [0, 1]")
        weights = {"target_word_weight": self.target_word_weight, **dict(self.reweight or {})}
        for word, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"editor=p2p: the weight of {word!r} ({value!r}) must be a number >= 0")
        if not 0 <= self.blend_threshold < 1:
            raise ValueError(f"editor=p2p: blend_threshold={self.blend_threshold!r} must be in [0, 1)")
        if self.blend_words is not None and len(str(self.blend_words).split()) != 2:
            raise ValueError(f"editor=p2p: blend_words={self.blend_words!r} must be 'source_word target_word'")

    def knobs(self) -> dict[str, Any]:
        return {**super().knobs(), "reweight": dict(self.reweight or {})}

    def trajectory_cost(self, inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """An edit costs its target and its source trajectory."""
        cost = inverter.sampling_cost(plan, start, guidance, edit)
        return cost + inverter.sampling_cost(plan, start, guidance, False) if edit else cost

    def sample(
        self,
        inverter: Inverter,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        prompts: EditPrompts,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        if not bool(rows.edit.any()):
            return inverter.sample(denoiser, plan, rows, eta=eta, batch_size=batch_size, progress=progress)
        paired, take = self.pair(rows, prompts)
        out, _ = self.sample_pairs(inverter, denoiser, plan, paired, eta, batch_size, progress)
        return out[take.to(out.device)]

    def sample_pairs(
        self,
        inverter: Inverter,
        denoiser: Denoiser,
        plan: Plan,
        paired: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, LocalBlend | None]:
        """Final latents of every row of ``paired`` (sources included) under control, and the local blend's
        state (its masks), for rows from :meth:`pair`."""
        unet = attention_network(denoiser)
        control = AttentionControl()
        blend = LocalBlend(self.blend_threshold) if self.local_blend else None
        steps = (float(self.cross_replace_steps), float(self.self_replace_steps))
        wrapped = PairedDenoiser(denoiser, control, plan, steps, blend)
        chunk = None if not batch_size else max(2, batch_size - batch_size % 2)  # pairs stay in one chunk
        with controlled(unet, control):
            out = inverter.sample(wrapped, plan, paired, eta=eta, batch_size=chunk, progress=progress)
        return out, blend

    # -- 1. pairs ------------------------------------------------------------------------------------------
    def pair(self, rows: SampleRows, prompts: EditPrompts) -> tuple[SampleRows, torch.Tensor]:
        """(rows with each edit as an adjacent (source, target) pair, pairs first; for each original row, the
        position of its result among them)."""
        paired, take, pick, role = pair_rows(rows, (ROLE, PAIR, START))
        length = rows.cond.text.shape[1]
        tables = self.token_tables(prompts, pick.tolist(), role.tolist(), length)
        device = rows.cond.text.device
        extra = {
            TOKEN_MAP: torch.stack([t.token_map for t in tables]),
            ALIGNED: torch.stack([t.aligned for t in tables]),
            WEIGHT: torch.stack([t.weight for t in tables]),
            BLEND: torch.stack([t.blend for t in tables]),
        }
        paired.cond.extra.update({k: v.to(device) for k, v in extra.items()})
        return paired, take

    def token_tables(
        self, prompts: EditPrompts, pick: list[int], role: list[int], length: int
    ) -> list[TokenTable]:
        """One :class:`TokenTable` per new row (sources: identity and their own blended word)."""
        if prompts.tokenizer is None:
            raise ValueError("editor=p2p needs the model's tokenizer to align the prompts' tokens")
        tok = prompts.tokenizer
        memo: dict[tuple[int, int], TokenTable] = {}
        out = []
        for b, r in zip(pick, role, strict=True):
            if r == SINGLE:
                out.append(TokenTable.plain(length))
                continue
            if (b, r) not in memo:
                words = self.words(prompts, b)
                memo[b, r] = self.table(prompts.source[b], prompts.target[b], words, r, tok, length)
            out.append(memo[b, r])
        return out

    def words(self, prompts: EditPrompts, b: int) -> tuple[str, str] | None:
        """Row b's blended words: the data's, else ``blend_words``."""
        if prompts.blended[b] is not None:
            return prompts.blended[b]
        if self.blend_words is not None:
            source, target = str(self.blend_words).split()
            return source, target
        return None

    def table(
        self, source: str, target: str, words: tuple[str, str] | None, role: int, tok: Any, length: int
    ) -> TokenTable:
        """The token table of a source (role SOURCE) or target row of the pair (source, target)."""
        table = TokenTable.plain(length)
        if role == SOURCE:
            if words is not None and self.local_blend:
                table.blend[word_tokens(source, words[0], tok, length)] = 1.0
            return table
        ids_source, ids_target = token_ids(source, tok, length), token_ids(target, tok, length)
        align = replace_map if self.mode == "replace" else refine_map
        table.token_map, table.aligned = align(ids_source, ids_target, length)
        weights: Mapping[str, float] = dict(self.reweight or {})
        if words is not None:
            weights = {words[1]: float(self.target_word_weight), **weights}
            if self.local_blend:
                table.blend[word_tokens(target, words[1], tok, length)] = 1.0
        for word, value in weights.items():
            positions = word_tokens(target, word, tok, length)
            if not positions:
                log.warning("editor=p2p: %r is not a word of the target %r; not re-weighted", word, target)
            table.weight[positions] = float(value)
        return table


def attention_network(denoiser: Denoiser) -> torch.nn.Module:
    """The SD-format UNet whose attention p2p controls; a clear error for anything else."""
    unet = getattr(denoiser, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        kind = type(unet).__name__ if unet is not None else type(denoiser).__name__
        raise ValueError(
            f"editor=p2p controls the self- and cross-attention of an SD-format UNet; this model runs {kind}"
            " (flow models' joint attention is not supported): use editor=prompt_swap"
        )
    return unet


# -- 2–3. control around each UNet call, local blend after it -------------------------------------------------
def replace_windows(cross: float, self_replace: float, steps: int) -> tuple[int, int]:
    """(cross, self): on how many of its first sampled steps a pair that samples ``steps`` steps takes its
    source's cross- and self-attention, as the reference's controller built for ``steps`` steps does:
    int(c · (steps + 1)) (its α table has steps + 1 rows), c = ``cross``, and int(steps · τ), τ =
    ``self_replace``; Python's float products and ``int``, as the reference computes them. A window ≥
    ``steps`` covers every step."""
    return int(cross * (steps + 1)), int(steps * self_replace)


class PairedDenoiser(WrappingDenoiser):
    """``base`` with prompt-to-prompt control: before each UNet call the layout of its pairs is set from the
    rows' tags, after it the targets' predictions are blended with their sources' outside the mask."""

    def __init__(
        self,
        base: Denoiser,
        control: AttentionControl,
        plan: Plan,
        steps: tuple[float, float],
        blend: LocalBlend | None,
    ) -> None:
        self.base = base
        self.control = control
        self.step_of = {int(t): i for i, t in enumerate(plan.timesteps.tolist())}
        self.num_steps = plan.num_steps
        self.cross_steps, self.self_steps = steps
        self.blend = blend

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        found = self.layout(t, cond, x.device)
        if found is None:
            return predict(self.base, x, t, cond)
        layout, rows_t, rows_s, pairs = found
        self.control.layout = layout
        try:
            pred = predict(self.base, x, t, cond)
        finally:
            self.control.layout = None
        if self.blend is not None and layout.maps:
            pred = self.blended(pred, layout, rows_t, rows_s, pairs, (x.shape[-2], x.shape[-1]))
        return pred

    def layout(
        self, t: torch.Tensor, cond: Conditioning, device: torch.device
    ) -> tuple[Layout, torch.Tensor, torch.Tensor, list[int]] | None:
        """The call's layout, the cond rows of its targets and sources, and their pair ids (None: no pair)."""
        extra = cond.extra
        if ROLE not in extra:
            return None
        use_text, _ = cfg_branches(cond, cond.guidance)  # positions 0 … len(use_text)−1 of the UNet batch
        use_text = use_text.cpu()
        role, pair = extra[ROLE].cpu()[use_text], extra[PAIR].cpu()[use_text]
        targets = (role == TARGET).nonzero().flatten()
        if not len(targets):
            return None
        tags = zip(role.tolist(), pair.tolist(), strict=True)
        where = {p: n for n, (r, p) in enumerate(tags) if r == SOURCE}  # pair id → its source's position
        pairs = [int(pair[n]) for n in targets]
        if any(p not in where for p in pairs):
            raise RuntimeError(
                "editor=p2p: an edit's source row is not in the same UNet call (the sampler split a pair);"
                " the inverter must sample source and target rows in one march"
            )
        sources = torch.tensor([where[p] for p in pairs], dtype=torch.long)
        rows_t, rows_s = use_text[targets], use_text[sources]  # rows of cond
        # the pair's step s = i − k of its n = N − k sampled steps, and the reference's windows for n steps
        step = torch.tensor([self.step_of[int(v)] for v in t.cpu()[rows_t].tolist()])
        start = extra[START].cpu()[rows_t]
        done = step - start  # (m,)
        windows = [
            replace_windows(self.cross_steps, self.self_steps, self.num_steps - k) for k in start.tolist()
        ]
        cross_window, self_window = torch.tensor(windows, dtype=torch.long).view(-1, 2).unbind(1)  # (m,) each
        blend = self.blend is not None and bool(extra[BLEND][rows_t].any() and extra[BLEND][rows_s].any())
        dev_t, dev_s = rows_t.to(extra[ROLE].device), rows_s.to(extra[ROLE].device)
        layout = Layout(
            target=targets.to(device),
            source=sources.to(device),
            cross=(done < cross_window).to(device),
            self_attention=(done < self_window).to(device),
            token_map=extra[TOKEN_MAP][dev_t].to(device),
            aligned=extra[ALIGNED][dev_t].to(device),
            weight=extra[WEIGHT][dev_t].to(device),
            blend_source=extra[BLEND][dev_s].to(device) if blend else None,
            blend_target=extra[BLEND][dev_t].to(device) if blend else None,
        )
        return layout, rows_t, rows_s, pairs

    def blended(
        self,
        pred: Prediction,
        layout: Layout,
        rows_t: torch.Tensor,
        rows_s: torch.Tensor,
        pairs: list[int],
        size: tuple[int, int],
    ) -> Prediction:
        """Targets' ε̂ and x̂₀ replaced by their sources' outside each pair's mask."""
        has = (layout.blend_source.any(-1) & layout.blend_target.any(-1)).cpu()
        sel = has.nonzero().flatten()
        if not len(sel):
            return pred
        maps = [(q, m[sel.to(m.device)]) for q, m in layout.maps]
        mask = self.blend.update([pairs[int(n)] for n in sel], maps, size).to(pred.eps.device)  # (n, 1, H, W)
        bt, bs = rows_t[sel].to(pred.eps.device), rows_s[sel].to(pred.eps.device)

        def mix(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None:
                return None
            v = v.clone()
            v[bt] = torch.where(mask, v[bt], v[bs])
            return v

        return Prediction(mix(pred.eps), mix(pred.x0))
