"""Null-text inversion (Mokady et al., CVPR 2023): per-step null embeddings that make guided sampling follow
the DDIM pivot.

DDIM inversion at guidance 1 gives a pivot trajectory z*_T … z*_0 that sampling at guidance 1 retraces
almost exactly; at a larger guidance w the unconditional branch pushes sampling off it. The method keeps the
model and the prompt embedding C fixed and optimises, for each sampling step t from the top, the null
embedding ∅_t so that one guided DDIM step from the current latent z̄_t lands on the pivot (Eq. 3, Alg. 1):

    min over ∅_t of ‖ z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C) ‖²,   ε̃ = ε(z̄_t, ∅_t) + w (ε(z̄_t, C) − ε(z̄_t, ∅_t))

with Adam (lr decaying over the steps), at most ``inner_steps`` iterations, stopping early when the loss
falls below a threshold that grows over the steps; ∅_t starts from ∅_{t+1}'s result (the first from the
negative prompt's embedding); then z̄_{t−1} = z_{t−1}(z̄_t, ∅_t, C) with the optimised ∅_t. Sampling with
∅_t as the null branch of step t (reconstructions and edits alike) starts from null-text's own latent z̄ at
the start step: ∅_t was fitted at z̄_t, not at the pivot's z*_t, so a start step k > 0 resumes the fitted
trajectory (from z*_k the embeddings would steer a latent they were never fitted at). At k = 0 the two agree
(z̄_T = z*_T).

Artifact: ``trajectory`` (B, N+1, C, H, W) the pivot z*, ``latents`` (B, N+1, C, H, W) null-text's own
trajectory z̄ in the same layout (index ``plan.start_index[k]`` holds the latent sampling step k starts from,
index 0 the reconstruction z̄_0), ``null`` (B, N, L, D) the per-step null embeddings, ``inner_steps`` (B, N)
the Adam iterations each step used. It is optimised for one sampling guidance (``guidance_dependent``): the
engine computes one per (image, guidance) and puts the guidance in the key. At guidance 1 the null branch is
never evaluated: no optimisation, the null embeddings stay the negative prompt's, z̄ is the pivot, and the
artifact costs nothing beyond the pivot.

Batching: the images of a chunk share every UNet call; each has its own Adam (its state is elementwise, but a
zero gradient would still move it, so only images still optimising are stepped) and leaves the call set when
it stops early, so a batched run equals one image at a time.

Schedule for other step counts: the reference (50 steps) uses lr·(1 − i/100) and the early-stop threshold
ε + i·2e-5 at step i. Both are written here in terms of the progress i/N, lr·(1 − ``lr_decay``·i/N) and
ε + ``epsilon_growth``·i/N, which is the reference exactly at N = 50 (lr_decay = 0.5, epsilon_growth = 1e-3)
and stays positive and proportionate for any N.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, Prediction, ddim_step, invert, march, predict
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import (
    Artifact,
    Cost,
    InvertContext,
    Inverter,
    SampleRows,
    evals_per_step,
    trajectory_start,
)

log = logging.getLogger(__name__)


def _branch(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    extra: dict[str, torch.Tensor],
    null: bool = False,
) -> Prediction:
    """One unguided prediction with ``embeds`` (n, L, D) as the prompt (``null``: as the null prompt, i.e.
    guidance 0, so a flow model pairs it with the null pooled embedding): one UNet row per latent. ``extra``:
    the rows' further conditioning (a ControlNet's control images, a flow model's pooled embeddings)."""
    g = torch.full((len(x),), 0.0 if null else 1.0, dtype=torch.float32, device=x.device)
    return predict(
        denoiser, x, t, Conditioning(text=embeds, null=embeds if null else None, guidance=g, extra=extra)
    )


def _guide(null: Prediction, text: Prediction | None, g: float) -> Prediction:
    """Classifier-free guidance ε̃ = ε_∅ + g (ε_c − ε_∅) (and the same for x̂₀ when the network gives it)."""
    if text is None:  # guidance 0: the null branch alone
        return null
    eps = null.eps + g * (text.eps - null.eps)
    x0 = None if null.x0 is None or text.x0 is None else null.x0 + g * (text.x0 - null.x0)
    return Prediction(eps, x0)


def _take(pred: Prediction | None, idx: torch.Tensor) -> Prediction | None:
    """Rows ``idx`` of a prediction."""
    if pred is None:
        return None
    return Prediction(pred.eps[idx], None if pred.x0 is None else pred.x0[idx])


def _count_backward(denoiser: Denoiser, rows: int) -> None:
    """Count ``rows`` back-propagated rows on denoisers that keep the count (``UNetDenoiser``)."""
    if hasattr(denoiser, "unet_backwards"):
        denoiser.unet_backwards += rows


@dataclass
class NullTextInversion(Inverter):
    """DDIM pivot, then per-step null embeddings optimised for the sampling guidance."""

    inner_steps: int = 10  # N_inner: Adam iterations per step at most (Alg. 1)
    lr: float = 1e-2  # Adam's learning rate at the first (noisiest) step
    lr_decay: float = 0.5  # lr_i = lr · (1 − lr_decay · i/N); the reference's 1 − i/100 at N = 50
    epsilon: float = 1e-5  # early stop when the step's latent MSE < epsilon + epsilon_growth · i/N
    epsilon_growth: float = 1e-3  # the reference's i · 2e-5 at N = 50

    name: ClassVar[str] = "null_text"
    guidance_dependent: ClassVar[bool] = True
    formula: ClassVar[str] = (
        "images × M × (1|2 by inversion guidance) [pivot, shared with ddim]"
        " + Σ_(images, guidance ≠ 1) Σ_i ((0 at guidance 0 else 1) + inner_i + 1) forwards and Σ_i inner_i"
        " backwards + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        super().check(num_steps, start_steps, eta)
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 0):
            raise ValueError(f"inverter=null_text: inner_steps={self.inner_steps} must be an integer ≥ 0")
        if not self.lr > 0:
            raise ValueError(f"inverter=null_text: lr={self.lr} must be > 0")
        if not 0 <= self.lr_decay < 1:
            raise ValueError(f"inverter=null_text: lr_decay={self.lr_decay} must be in [0, 1)")
        if self.epsilon < 0 or self.epsilon_growth < 0:
            raise ValueError("inverter=null_text: epsilon and epsilon_growth must be ≥ 0")

    def step_lr(self, i: int, num_steps: int) -> float:
        """Adam's learning rate at sampling step i (the reference: 1e-2 · (1 − i/100) at N = 50)."""
        return self.lr * (1 - self.lr_decay * i / num_steps)

    def threshold(self, i: int, num_steps: int) -> float:
        """The early-stop loss at sampling step i (the reference: 1e-5 + i · 2e-5 at N = 50)."""
        return self.epsilon + self.epsilon_growth * i / num_steps

    # -- inversion ---------------------------------------------------------------------------------------
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        B, N = len(x0), plan.num_steps
        # 1. the pivot z*: DDIM inversion at the inversion guidance (1 in the paper), from the cache if served
        if ctx.pivot is not None:
            pivot = ctx.pivot(torch.arange(B))  # (B, N+1, C, H, W)
        else:
            pivot = invert(denoiser, x0, plan, cond, ctx.batch_size, ctx.progress).transpose(0, 1)
        pivot = pivot.to(x0.device, x0.dtype).contiguous()
        g = float(ctx.guidance)
        if cond.null is None:
            raise ValueError("inverter=null_text needs null (negative-prompt) embeddings to start from")
        null0 = cond.null.detach()  # (B, L, D)
        if g == 1.0:  # the null branch is never evaluated: nothing to optimise, z̄ = z*
            return {
                "trajectory": pivot,
                "latents": pivot.clone(),
                "null": null0[:, None].expand(B, N, *null0.shape[1:]).contiguous(),  # (B, N, L, D)
                "inner_steps": torch.zeros(B, N, dtype=torch.long),
            }
        # 2. per-step optimisation of ∅_t, sampling steps i = 0 … N−1 from the top (Alg. 1)
        z_top = trajectory_start({"trajectory": pivot}, plan, torch.zeros(B, dtype=torch.long))  # (B, C, H, W)

        def step(i: int, rows: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            target = pivot[rows.to(pivot.device), int(plan.start_index[i]) - 1]  # z*_{t−1}: (n, C, H, W)
            z, null, used = self.optimise_step(denoiser, plan, i, s["z"], s["null"], cond[rows], target, g)
            return {"z": z, "null": null, "inner_steps": used}

        state = {"z": z_top, "null": null0.clone(), "inner_steps": torch.zeros(B, dtype=torch.long)}
        out = march(
            state, N, step, batch_size=ctx.batch_size, keep=True, desc="null-text", progress=ctx.progress
        )
        used = out["inner_steps"][:, 1:]  # (B, N)
        log.debug("null-text: %.2f inner steps per step on average", float(used.float().mean()))
        # 3. z̄ in the pivot's layout: out["z"][:, i] (B, N+1, C, H, W) is the latent entering sampling step i
        #    (i = N: the reconstruction z̄_0), kept at trajectory index start_index[i] (index 0 for z̄_0)
        latents = torch.empty_like(pivot)
        latents[:, plan.start_index.to(pivot.device)] = out["z"][:, :N].to(pivot)
        latents[:, 0] = out["z"][:, N]
        return {
            "trajectory": pivot,
            "latents": latents,
            "null": out["null"][:, 1:].contiguous(),  # (B, N, L, D): ∅ of sampling step i
            "inner_steps": used,
        }

    def optimise_step(
        self,
        denoiser: Denoiser,
        plan: Plan,
        i: int,
        z: torch.Tensor,
        null: torch.Tensor,
        cond: Conditioning,
        target: torch.Tensor,
        g: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of Alg. 1 for n images (``cond``: their source prompts, n rows): (z̄_{t−1} (n, C, H, W),
        ∅_t (n, L, D), iterations used (n,))."""
        n, N = len(z), plan.num_steps
        t = plan.timesteps[i].expand(n).to(z.device)  # (n,)
        a, a_next = plan.alpha[i].expand(n), plan.alpha_next[i].expand(n)
        # 2a. the conditional prediction ε(z̄_t, C), once per step, no gradient (none at guidance 0)
        with torch.no_grad():
            text_pred = None if g == 0.0 else _branch(denoiser, z, t, cond.text, cond.extra)
        # 2b. one leaf and one Adam per image, initialised from the previous step's ∅
        leaves = [null[b].detach().clone().requires_grad_(True) for b in range(n)]  # n × (L, D)
        lr = self.step_lr(i, N)
        optims = [torch.optim.Adam([leaf], lr=lr) for leaf in leaves]
        used = torch.zeros(n, dtype=torch.long)
        active = list(range(n))
        limit = self.threshold(i, N)
        for _ in range(self.inner_steps):
            if not active:
                break
            idx = torch.tensor(active, device=z.device)
            with torch.enable_grad():
                embeds = torch.stack([leaves[b] for b in active])  # (a, L, D)
                extra = {k: v[idx.to(v.device)] for k, v in cond.extra.items()}
                null_pred = _branch(denoiser, z[idx], t[idx], embeds, extra, null=True)
                guided = _guide(null_pred, _take(text_pred, idx), g)
                z_prev = ddim_step(z[idx], guided.eps, a[idx.cpu()], a_next[idx.cpu()], x0=guided.x0)
                # Eq. 3: ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² (MSE per image; the sum keeps each image's gradient)
                loss = (z_prev - target[idx].to(z_prev.dtype)).pow(2).flatten(1).mean(1)  # (a,)
                for b in active:
                    optims[b].zero_grad(set_to_none=True)
                loss.sum().backward()
            _count_backward(denoiser, len(active))
            for b in active:
                optims[b].step()  # only images still optimising: Adam would move a zero-gradient leaf too
                used[b] += 1
            done = loss.detach().cpu() < limit
            active = [b for b, stop in zip(active, done.tolist(), strict=True) if not stop]
        # 2c. z̄_{t−1} with the optimised ∅_t (the conditional ε reused)
        new_null = torch.stack([leaf.detach() for leaf in leaves])  # (n, L, D)
        with torch.no_grad():
            guided = _guide(_branch(denoiser, z, t, new_null, cond.extra, null=True), text_pred, g)
            z_next = ddim_step(z, guided.eps, a, a_next, x0=guided.x0)
        return z_next, new_null, used

    # -- sampling ---------------------------------------------------------------------------------------
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
        x = trajectory_start(rows.artifact, plan, rows.start, name="latents")  # z̄ at the start: (B, C, H, W)
        nulls = rows.artifact["null"]  # (B, N, L, D)

        def step(i: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            n = len(r)
            t = plan.timesteps[i].expand(n).to(s["x"].device)
            cond = replace(rows.cond[r], null=nulls[r.to(nulls.device), i].to(rows.cond.text.dtype))  # ∅_t
            pred = predict(denoiser, s["x"], t, cond)
            a, a_next = plan.alpha[i].expand(n), plan.alpha_next[i].expand(n)
            return {"x": ddim_step(s["x"], pred.eps, a, a_next, x0=pred.x0)}

        out = march({"x": x}, plan.num_steps, step, rows.start, batch_size, desc="sample", progress=progress)
        return out["x"]

    # -- accounting ---------------------------------------------------------------------------------------
    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        """Per step: the conditional ε (none at guidance 0), inner_i null forwards with a backward each, one
        final null forward; nothing at guidance 1. The pivot is counted by whoever computes it."""
        if float(guidance) == 1.0:
            return Cost()
        inner = int(artifact["inner_steps"].sum())
        conditional = 0 if float(guidance) == 0.0 else 1
        return Cost(plan.num_steps * (conditional + 1) + inner, inner)

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * evals_per_step(guidance))
