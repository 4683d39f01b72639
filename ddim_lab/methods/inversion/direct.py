"""Direct inversion (Ju et al. 2024, "PnP Inversion"): the source branch is pulled back onto the inversion
trajectory at every sampling step; the target branch is left free.

Guided sampling from the DDIM pivot drifts off it (more so at large guidance). Direct inversion adds, after
each step of the source branch, the difference between the pivot latent at that level and where the step
landed — the per-step correction. The corrected source branch therefore walks the pivot exactly and ends on
the input; an editor that shares attention between branches (prompt-to-prompt) reads its features there,
while the target branch samples freely. The corrections are computed in flight: the source branch sits on
the pivot at every step, so its correction is fixed by the pivot and the guidance, and costs no extra
evaluation. The artifact is the DDIM trajectory (shared with ``inverter=ddim``). With a prompt-swap edit
the target branch is plain DDIM sampling with the target prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, ddim_step, march, predict
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import SampleRows, trajectory_start
from ddim_lab.methods.inversion.ddim import DDIMInversion


@dataclass
class DirectInversion(DDIMInversion):
    """DDIM pivot; reconstructions follow it step by step, edits sample freely."""

    name: ClassVar[str] = "direct"
    supports_eta: ClassVar[bool] = False
    formula: ClassVar[str] = (
        "images × M × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def key(self) -> dict[str, Any]:
        return DDIMInversion().key()  # the artifact is exactly DDIM's

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        x = trajectory_start(rows.artifact, plan, rows.start)  # (B, C, H, W)
        pivot = rows.artifact["trajectory"]  # (B, N+1, C, H, W)
        on_pivot = (~rows.edit).to(x.device)  # source branches (reconstructions) follow the pivot

        def step(i: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # both branches in one call (an editor pairs a target with its source in the same UNet call)
            n = len(r)
            t = plan.timesteps[i].expand(n).to(s["x"].device)
            pred = predict(denoiser, s["x"], t, rows.cond[r])
            # 1. target branch: free DDIM sampling with the target prompt
            landed = ddim_step(
                s["x"], pred.eps, plan.alpha[i].expand(n), plan.alpha_next[i].expand(n), x0=pred.x0
            )
            # 2. source branch: the correction onto the pivot one level cleaner (Direct inversion's offset)
            target = pivot[r.to(pivot.device), int(plan.start_index[i]) - 1].to(landed)
            correction = torch.where(on_pivot[r.to(x.device)].view(-1, 1, 1, 1), target - landed, 0.0)
            return {"x": landed + correction}

        out = march({"x": x}, plan.num_steps, step, rows.start, batch_size, desc="direct", progress=progress)
        return out["x"]
