"""UniEdit-Flow's velocity fusion (Jiao et al., ICLR 2026, "UniEdit-Flow: Unleashing Inversion and Editing in
the Era of Flow Models", arXiv:2504.13109; reference: DSL-Lab/UniEdit-Flow, ``UniEdit-Flow_FLUX/src/flux/
sampling.py::edit_uniedit``, defaults in ``src/edit.py``), paired with its inversion ``inverter=uni_inv``.

At each sampling evaluation of an edit, at its latent x_σ (one trajectory, no source branch), the reference
evaluates the target and the source prompt and fuses the two velocities with a region mask:

    1. v_t = v(x_σ, σ, target), v_s = v(x_σ, σ, source)             (two evaluations, one batched call here)
    2. Δ = v_t − v_s
    3. m = mean|Δ| per 2×2 latent patch (FLUX's packed token), min-max normalised over the image
    4. v = m · v_t + (1 − m) · v_s + (m + 1) · ω · Δ                (velocity fusion, then guidance ω on Δ)

and steps with v (the reference: Euler, as ``inverter=uni_inv`` samples). Its delay α (invert and edit only
the last round(α·N) steps; 0.6 of 15) is the engine's ``start_step`` = N − round(α·N) (6 of 15). The
reference normalises the map over its one image (its batch is 1); the lab per row. Where the prompts agree
(Δ ≡ 0 on a row, the reference's 0/0) the row keeps its own prediction: with identical prompts the edit is
the reconstruction exactly. Each velocity is the denoiser's guided one at the row's guidance (the reference
runs FLUX.1-dev's embedded guidance 1). An edit costs its target and its source evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ddim_lab.engine.ddim import Denoiser, Prediction, predict
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.flow import sigma_of_timestep, to_flow, velocity, velocity_prediction
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing.base import Editor, EditPrompts, WrappingDenoiser
from ddim_lab.methods.editing.injection import flow_transformer, paired_cost
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows

FUSE, SRC = "uni_fuse", "uni_src:"  # cond.extra: (B,) bool rows to fuse; the source conditioning's parts


def region_mask(delta: torch.Tensor) -> torch.Tensor:
    """Step 3: (n, C, H, W) velocity differences → (n, 1, H, W) in [0, 1]: mean |Δ| over each 2×2 patch and
    the channels, min-max normalised per row."""
    token = F.avg_pool2d(delta.abs().mean(dim=1, keepdim=True), 2)  # (n, 1, H/2, W/2)
    low = token.amin(dim=(1, 2, 3), keepdim=True)
    high = token.amax(dim=(1, 2, 3), keepdim=True)
    m = (token - low) / (high - low)
    return m.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (n, 1, H, W)


def fuse(v_t: torch.Tensor, v_s: torch.Tensor, omega: float) -> torch.Tensor:
    """Steps 2–4: the fused velocity (n, C, H, W)."""
    delta = v_t - v_s
    m = region_mask(delta)
    return m * v_t + (1 - m) * v_s + (m + 1) * omega * delta


def tagged(rows: SampleRows) -> SampleRows:
    """``rows`` with the edit flags and the source conditioning in ``cond.extra`` (row-aligned)."""
    src = rows.source
    extra = {FUSE: rows.edit.to(rows.cond.text.device), f"{SRC}text": src.text}
    extra.update({f"{SRC}null": src.null} if src.null is not None else {})
    extra.update({f"{SRC}extra:{k}": v for k, v in src.extra.items()})
    return replace(rows, cond=replace(rows.cond, extra={**rows.cond.extra, **extra}))


def source_of(cond: Conditioning) -> Conditioning:
    """The source conditioning ``tagged`` stored, at the rows' own guidance."""
    extra = {k.removeprefix(f"{SRC}extra:"): v for k, v in cond.extra.items() if k.startswith(f"{SRC}extra:")}
    return Conditioning(cond.extra[f"{SRC}text"], cond.extra.get(f"{SRC}null"), cond.guidance, extra)


def stacked(a: Conditioning, b: Conditioning) -> Conditioning:
    """The rows of ``a`` then of ``b`` (the extras both have)."""
    null = None if a.null is None or b.null is None else torch.cat([a.null, b.null])
    extra = {k: torch.cat([v, b.extra[k]]) for k, v in a.extra.items() if k in b.extra}
    return Conditioning(torch.cat([a.text, b.text]), null, torch.cat([a.guidance, b.guidance]), extra)


class FusingDenoiser(WrappingDenoiser):
    """``base`` whose edit rows predict with the fused velocity (module docstring)."""

    def __init__(self, base: Denoiser, omega: float) -> None:
        self.base = base
        self.omega = omega

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        if FUSE not in cond.extra or not bool(cond.extra[FUSE].any()):
            return predict(self.base, x, t, cond)
        B = len(x)
        e = cond.extra[FUSE].nonzero().flatten().to(x.device)  # (E,) rows to fuse
        both = stacked(cond, source_of(cond)[e.to(cond.text.device)])  # (B + E) rows
        pred = predict(self.base, torch.cat([x, x[e]]), torch.cat([t, t[e.to(t.device)]]), both)  # step 1
        v = velocity(pred)  # (B + E, C, H, W)
        v_t, v_s = v[e], v[B:]  # (E, C, H, W) each
        moved = (v_t != v_s).flatten(1).any(dim=1)  # (E,) rows whose prompts change the velocity
        eps, x0 = pred.eps[:B].clone(), pred.x0[:B].clone()
        if bool(moved.any()):
            f = e[moved]
            sigma = sigma_of_timestep(t[f.to(t.device)]).cpu()
            fused = velocity_prediction(fuse(v_t[moved], v_s[moved], self.omega), to_flow(x[f], sigma), sigma)
            eps[f], x0[f] = fused.eps.to(eps.dtype), fused.x0.to(x0.dtype)
        return Prediction(eps, x0)


@dataclass
class UniEdit(Editor):
    """editor=uni_edit: target and source velocities at the edit's own latent, fused by their difference."""

    omega: float = 5.0  # ω: guidance on v_t − v_s (reference: 5)

    name: ClassVar[str] = "uni_edit"
    flow_only: ClassVar[bool] = True

    def check(self) -> None:
        if isinstance(self.omega, bool) or not isinstance(self.omega, int | float) or self.omega < 0:
            raise ValueError(f"editor=uni_edit: omega={self.omega!r} must be a number >= 0")

    def trajectory_cost(self, inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """An edit evaluates its target and its source prompt at every evaluation."""
        return paired_cost(inverter, plan, start, guidance, edit)

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
        flow_transformer(denoiser, self.name)
        if not bool(rows.edit.any()):
            return inverter.sample(denoiser, plan, rows, eta=eta, batch_size=batch_size, progress=progress)
        wrapped = FusingDenoiser(denoiser, float(self.omega))
        return inverter.sample(wrapped, plan, tagged(rows), eta=eta, batch_size=batch_size, progress=progress)
