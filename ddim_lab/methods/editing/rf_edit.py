"""RF-Solver-Edit's self-attention value sharing (Wang et al., ICML 2025, "Taming Rectified Flow for Inversion
and Editing", arXiv:2411.04746; reference: wangjiangshan0725/RF-Solver-Edit, ``FLUX_Image_Edit/src/flux/
sampling.py`` and ``modules/layers.py``).

The reference, on FLUX: while inverting the source it stores the attention values V of the single-stream
blocks with id > 19 (20 … 37 of 38; over all tokens, text and image) at both evaluations of each RF-Solver
step (``info['second_order']`` False/True), for the first ``inject_step`` = 20 of 25 steps; while sampling
the target it replaces those blocks' V by the stored ones at the same step and evaluation (``inject_list``
counts sampling steps from the first). Its editing guidance is 5, the inversion's 1.

The lab (``ddim_lab.methods.editing.injection``): each edit samples its source's reconstruction beside it in
the same transformer calls, and the target's V in the shared blocks is its source's, evaluation by
evaluation:

    V_target ← V_source   in blocks i ≥ round(share_from · n), while the pair's step s < int(inject · n_steps)

n: FLUX's single-stream blocks (38 in FLUX.1: blocks 20 … 37 at the default, the reference's), or SD3's
joint blocks (image and context values both, as the reference's single stream holds both). n_steps = N − k
for a pair sampled from step k; the default 0.8 is the reference's 20 of 25. The values come from the
source's reconstruction at the same step instead of the stored inversion: the same values where the
inversion is exact (a flow solver's round trip), and one batched call instead of a stored pass. It combines
with any flow inverter (``inverter=fireflow editor=rf_edit`` is FireFlow's editing). With identical prompts
the target is its source's reconstruction exactly. An edit costs its target and its source trajectory.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing.base import Editor, EditPrompts
from ddim_lab.methods.editing.injection import (
    Injection,
    Layout,
    flow_transformer,
    hooked,
    late_blocks,
    paired_cost,
    sample_paired,
)
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows


def injected_window(fraction: float, steps: torch.Tensor) -> torch.Tensor:
    """How many of its first sampled steps a pair of ``steps`` (m,) steps shares values: int(fraction · n),
    Python's float product as the reference's integer count (0.8 · 25 = 20)."""
    return torch.tensor([int(fraction * int(n)) for n in steps.tolist()], dtype=torch.long)


def value_modules(transformer: torch.nn.Module, share_from: float) -> list[torch.nn.Module]:
    """The value projections RF-Edit shares: FLUX's late single-stream ``to_v`` (text and image tokens in one
    stream), or SD3's late joint blocks' ``to_v`` (image) and ``add_v_proj`` (context)."""
    single = getattr(transformer, "single_transformer_blocks", None)
    if single is not None:
        return [block.attn.to_v for block in late_blocks(single, share_from)]
    blocks = late_blocks(getattr(transformer, "transformer_blocks", []), share_from)
    return [m for block in blocks for m in (block.attn.to_v, block.attn.add_v_proj)]


@dataclass
class RFEdit(Editor):
    """editor=rf_edit: the target's attention values in the late blocks are its source's, on its first steps."""

    inject: float = 0.8  # share V on the pair's first int(inject · n) steps (reference: 20 of 25)
    share_from: float = 0.5263  # blocks i ≥ round(share_from · n); FLUX's 38 single blocks: 20 … 37 (reference)

    name: ClassVar[str] = "rf_edit"
    flow_only: ClassVar[bool] = True

    def check(self) -> None:
        for key in ("inject", "share_from"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"editor=rf_edit: {key}={value!r} must be a fraction in [0, 1]")

    def trajectory_cost(self, inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """An edit costs its target and its source trajectory."""
        return paired_cost(inverter, plan, start, guidance, edit)

    def select(self, lay: Layout, output: torch.Tensor) -> torch.Tensor:
        """(m, T) bool: every token of the targets inside their window."""
        on = lay.step < injected_window(float(self.inject), lay.steps)  # (m,)
        return on[:, None].expand(len(on), output.shape[1])

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
        modules = value_modules(flow_transformer(denoiser, self.name), float(self.share_from))
        if not bool(rows.edit.any()):
            return inverter.sample(denoiser, plan, rows, eta=eta, batch_size=batch_size, progress=progress)

        def attach(control: Injection) -> AbstractContextManager:
            return hooked(modules, control, self.select)

        out, _, take = sample_paired(inverter, denoiser, plan, rows, attach, eta, batch_size, progress)
        return out[take.to(out.device)]
