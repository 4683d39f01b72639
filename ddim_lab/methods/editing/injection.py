"""Feature injection on flow transformers (SD3's joint blocks, FLUX's double- and single-stream blocks): the
editor contract of attention-injection editors (``rf_edit``, ``kv_edit``), source and target in one call.

1. **Pairs.** As prompt-to-prompt on the UNet (``p2p``): each edit trajectory becomes an adjacent (source,
   target) pair of rows of one ``SampleRows``, the source sampling the source prompt on the inverter's
   reconstruction path (``edit`` False), the target the target prompt, from the same latent; rows are tagged
   in ``cond.extra`` (role, pair id, start step), so the tags survive ``cond[rows]`` and chunking. Chunks
   are rounded down to an even size, so a pair never leaves its chunk.
2. **Layout.** Around each transformer call the wrapping denoiser finds, for each target row, the network
   batch positions of its rows and of its source's rows in the same guidance branch (prompt branch, null
   branch: ``FlowDenoiser`` stacks them as [prompt rows; null rows], or one pass per row under embedded
   guidance), and the pair's step s = i − k (i the plan step whose interval [σ_{i+1}, σ_i] holds the
   evaluation, midpoints included; k the pair's start step).
3. **Injection.** Forward hooks on the projections an editor names (``to_v``, ``to_k``, ``add_v_proj`` of
   chosen blocks) overwrite the target rows' projected features with their source's, where the layout
   says so (all tokens, or a token mask). A projection acts per row and per token, and QK-norm and RoPE
   act per token after it, so overwriting the projection's output is overwriting the attention's keys or
   values. The attention processors stay diffusers' own, so the SD3 context fold
   (``ddim_lab.engine.token_fold``) still applies: its folded processor calls the same projections.

With identical source and target prompts the target's features equal its source's at every layer, so
overwriting changes nothing and the target computes its reconstruction exactly (rows of one batch are
computed by the same kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ddim_lab.engine.ddim import Denoiser, Prediction, predict
from ddim_lab.engine.denoiser import Conditioning, cfg_branches
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing import pairs
from ddim_lab.methods.editing.base import WrappingDenoiser
from ddim_lab.methods.editing.pairs import SOURCE, TARGET
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows

ROLE, PAIR, START = "inject_role", "inject_pair", "inject_start"  # cond.extra keys: (B,) long each


@dataclass
class Layout:
    """One transformer call: m injected target positions of the network batch and their sources'."""

    target: torch.Tensor  # (m,) long network batch positions
    source: torch.Tensor  # (m,) long
    step: torch.Tensor  # (m,) long: the pair's step s = i − k
    steps: torch.Tensor  # (m,) long: n = N − k, the steps the pair samples
    cond_rows: torch.Tensor  # (m,) long: the target's row of ``cond`` (for per-row data such as masks)


class Injection:
    """The state the hooks share: the layout of the transformer call in progress (None: no injection)."""

    def __init__(self) -> None:
        self.layout: Layout | None = None


# a hook's selector: (layout, the projection's output (b, T, D)) → (m, T) bool tokens to overwrite, or None
Select = Callable[[Layout, torch.Tensor], torch.Tensor | None]


def overwrite(control: Injection, select: Select) -> Callable[..., torch.Tensor | None]:
    """A forward hook that copies the selected tokens of each target row's projection from its source row."""

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        lay = control.layout
        if lay is None:
            return None
        tokens = select(lay, output)  # (m, T) bool
        if tokens is None or not bool(tokens.any()):
            return None
        t, s = lay.target.to(output.device), lay.source.to(output.device)
        out = output.clone()
        out[t] = torch.where(tokens.to(output.device)[..., None], output[s], output[t])  # (m, T, D)
        return out

    return hook


@contextmanager
def hooked(modules: list[torch.nn.Module], control: Injection, select: Select) -> Iterator[None]:
    """``overwrite`` hooks on ``modules`` inside the ``with``; removed on exit (also on an error)."""
    handles = [m.register_forward_hook(overwrite(control, select)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def flow_transformer(denoiser: Denoiser, editor: str) -> torch.nn.Module:
    """The SD3/FLUX transformer of a flow denoiser; one clear line for anything else (a UNet model)."""
    transformer = getattr(denoiser, "transformer", None)
    if transformer is None or getattr(denoiser, "family", None) not in ("sd3", "flux"):
        kind = type(getattr(denoiser, "unet", denoiser)).__name__
        raise ValueError(
            f"editor={editor} runs on flow transformers (SD3, FLUX); this model runs {kind}: use editor=p2p on"
            " a UNet"
        )
    return transformer


def late_blocks(blocks: Any, share_from: float) -> list[torch.nn.Module]:
    """Blocks i ≥ round(share_from · n) of n (all at 0, none at 1)."""
    blocks = list(blocks or [])
    return blocks[round(share_from * len(blocks)) :]


# -- 1. pairs --------------------------------------------------------------------------------------------------
def pair_rows(rows: SampleRows) -> tuple[SampleRows, torch.Tensor]:
    """(rows with each edit as an adjacent (source, target) pair, pairs first, unedited rows after; for each
    original row, the position of its result among them): :func:`~ddim_lab.methods.editing.pairs.pair_rows`."""
    paired, take, _, _ = pairs.pair_rows(rows, (ROLE, PAIR, START))
    return paired, take


# -- 2. the layout of each transformer call --------------------------------------------------------------------
def network_rows(denoiser: Any, cond: Conditioning) -> list[torch.Tensor]:
    """Per guidance branch, the ``cond`` row at each network batch position, in ``FlowDenoiser``'s order:
    [prompt rows; null rows] under cfg, every row once under embedded guidance."""
    if getattr(denoiser, "guidance", "cfg") == "embedded":
        return [torch.arange(len(cond))]
    use_text, use_null = cfg_branches(cond, cond.guidance)
    return [use_text.cpu(), use_null.cpu()]


def step_index(plan: Plan, t: torch.Tensor) -> torch.Tensor:
    """(B,) the plan step i whose interval [σ_{i+1}, σ_i] holds each evaluation time t (B,) = σ · 1000:
    i = #{j : t_j ≥ t} − 1, with a tolerance for σ · 1000 rounding (midpoints lie far from the levels)."""
    levels = plan.timesteps.double().cpu()  # (N,) descending
    count = (levels[None, :] >= t.double().cpu()[:, None] - 1e-6 * 1000).sum(dim=1)
    return (count - 1).clamp(min=0)


class InjectingDenoiser(WrappingDenoiser):
    """``base`` with the injection layout set around each call from the rows' tags (module docstring, 2.)."""

    def __init__(self, base: Denoiser, control: Injection, plan: Plan) -> None:
        self.base = base
        self.control = control
        self.plan = plan

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        self.control.layout = self.layout(t, cond)
        try:
            return predict(self.base, x, t, cond)
        finally:
            self.control.layout = None

    def layout(self, t: torch.Tensor, cond: Conditioning) -> Layout | None:
        """Where each target row and its source sit in the network batch (every branch), or None."""
        if ROLE not in cond.extra:
            return None
        role, pair, start = (cond.extra[k].cpu() for k in (ROLE, PAIR, START))
        step = step_index(self.plan, t) - start  # (B,) s = i − k
        targets, sources, rows, offset = [], [], [], 0
        for branch in network_rows(self.base, cond):
            where = {int(pair[r]): n for n, r in enumerate(branch.tolist()) if role[r] == SOURCE}
            for n, r in enumerate(branch.tolist()):
                if role[r] != TARGET:
                    continue
                if int(pair[r]) not in where:
                    raise RuntimeError(
                        "an injection editor's source row is not in the same network call (the sampler split"
                        " a pair); the inverter must sample source and target rows in one march"
                    )
                targets.append(offset + n)
                sources.append(offset + where[int(pair[r])])
                rows.append(r)
            offset += len(branch)
        if not targets:
            return None
        rows_t = torch.tensor(rows, dtype=torch.long)
        return Layout(
            target=torch.tensor(targets, dtype=torch.long),
            source=torch.tensor(sources, dtype=torch.long),
            step=step[rows_t],
            steps=self.plan.num_steps - start[rows_t],
            cond_rows=rows_t,
        )


# -- 3. the editors' shared sampling ---------------------------------------------------------------------------
def sample_paired(
    inverter: Inverter,
    denoiser: Denoiser,
    plan: Plan,
    rows: SampleRows,
    attach: Callable[[Injection], Any],
    eta: float = 0.0,
    batch_size: int | None = None,
    progress: bool = False,
    wrap: Callable[[Denoiser, Injection], Denoiser] | None = None,
) -> tuple[torch.Tensor, SampleRows, torch.Tensor]:
    """Final latents of every paired row (sources included) with the hooks ``attach(control)`` installs (a
    context manager), the paired rows, and each original row's position among them. ``wrap(denoiser,
    control)``: an editor's own denoiser inside the layout (it sees ``control.layout`` of each call)."""
    paired, take = pair_rows(rows)
    control = Injection()
    wrapped = InjectingDenoiser(denoiser if wrap is None else wrap(denoiser, control), control, plan)
    chunk = None if not batch_size else max(2, batch_size - batch_size % 2)  # pairs stay in one chunk
    with attach(control):
        out = inverter.sample(wrapped, plan, paired, eta=eta, batch_size=chunk, progress=progress)
    return out, paired, take


def paired_cost(inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
    """An edit costs its target and its source trajectory; a reconstruction its own."""
    cost = inverter.sampling_cost(plan, start, guidance, edit)
    return cost + inverter.sampling_cost(plan, start, guidance, False) if edit else cost
