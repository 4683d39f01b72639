"""The editor contract: how the engine samples one batch of trajectories, some of them edits.

The engine (``Runner.sample_grid``) builds one :class:`~ddim_lab.methods.inversion.base.SampleRows` for every
trajectory of an image group and hands it, with each row's prompts, to the editor; the editor runs the
inverter's sampler (as it is, or on rows and a denoiser of its own) and returns one final latent per row.
An editor is a dataclass whose fields are its knobs (``conf/editor/NAME.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, Prediction
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows


@dataclass
class EditPrompts:
    """The prompts of B trajectories (row-aligned with ``SampleRows``) and the tokenizer that split them."""

    source: list[str]
    target: list[str]  # the source prompt again for reconstructions
    blended: list[tuple[str, str] | None]  # (source word, target word) where the data names them
    tokenizer: Any = None
    masks: list[torch.Tensor | None] | None = None  # the data's edit masks (1, R, R), 1 = edit region (PIE)


class Editor:
    """Base class; ``sample`` and ``trajectory_cost`` say what an edit runs and costs."""

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False  # draws noise per row: rows carry their seed; a seed list replicates
    needs_inversion: ClassVar[bool] = True  # False: samples from the clean latent (``inverter=none`` only)
    flow_only: ClassVar[bool] = False  # runs on flow models only

    def check(self) -> None:
        """Raise ValueError (one line) for knobs that cannot run; needs no model."""

    @property
    def uses_data_mask(self) -> bool:
        """Whether the data's edit masks are an input of this editor, not only of the metrics: its rows then
        carry ``mask_use="input"`` in their protocol, and are never pooled with mask-free rows."""
        return False

    def knobs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def row_fields(self) -> dict[str, str]:
        """The result-row columns naming this editor, so the report never pools editors or their knobs."""
        return {"editor": self.name, "editor_knobs": json.dumps(self.knobs(), sort_keys=True)}

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
        """Final latents (B, C, H, W) of the B trajectories of ``rows``."""
        raise NotImplementedError

    def trajectory_cost(self, inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """Network passes that sampling one trajectory costs with this editor."""
        return inverter.sampling_cost(plan, start, guidance, edit)

    def for_costing(self, cost_guidance: Callable[[float], float]) -> Editor:
        """This editor with the guidance scales among its knobs as the cost formulas see them (a model with
        embedded guidance spends one pass per row at any scale); editors without such knobs are themselves."""
        return self

    def charged(
        self,
        inverter: Inverter,
        plan: Plan,
        start: int,
        guidance: float,
        edit: bool,
        cost_guidance: Callable[[float], float] = float,
    ) -> Cost:
        """``trajectory_cost`` on the model at hand: every guidance (the row's, the editor's own) mapped by
        ``cost_guidance`` (``ddim_lab.study.accounting.cost_guidance`` of the denoiser)."""
        costed = self.for_costing(cost_guidance)
        return costed.trajectory_cost(inverter, plan, start, cost_guidance(guidance), edit)


class WrappingDenoiser:
    """A denoiser around ``self.base`` (an editor's control around the model's calls): its attributes
    (counters, family, guidance) are the base's, and a call is the ε̂ of :meth:`predict`."""

    base: Denoiser

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not set yet (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C, H, W), t (B,) → ε̂ (B, C, H, W)."""
        return self.predict(x, t, cond).eps

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        raise NotImplementedError
