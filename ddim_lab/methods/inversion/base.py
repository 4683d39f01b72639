"""The inverter contract: what every inversion method under ``ddim_lab.methods.inversion`` implements.

An inverter turns (denoiser, clean latents, plan, conditioning) into an **artifact**: a dict of tensors, each
(B, ...) with one row per image, holding whatever its sampler needs to come back — a latent trajectory
(DDIM), per-step null embeddings (null-text), coupled latent pairs (EDICT, BDIA), per-step noise maps
(edit-friendly DDPM). Its sampler takes the artifact rows of a batch of trajectories (one grid point each:
a start step, a guidance scale, a target prompt) and returns their final latents. The engine
(``ddim_lab.study.runner``) caches artifacts by ``key()`` and batches every trajectory of a grid through
``sample``; it never looks inside an artifact.

Flow-matching models plug in at the denoiser, not here: a velocity model x_σ = (1−σ)x₀ + σε is the same
process as ᾱ = (1−σ)²/((1−σ)² + σ²) on latents divided by √((1−σ)² + σ²), and one DDIM step there is one
Euler step of the flow. An adapter that rescales x and returns (ε, x̂₀) = (x + (1−σ)v, x − σv) therefore
runs every inverter here unchanged; solver-specific flow inverters implement this same contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler

from ddim_lab.engine.ddim import Denoiser
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.flow import flow_plan, flow_sigmas, is_flow_scheduler
from ddim_lab.engine.schedule import Plan, exact_plan

Artifact = dict[str, torch.Tensor]  # name → (B, ...) one row per image


def evals_per_step(guidance: float) -> int:
    """UNet rows one guided prediction costs: guidance 1 (prompt only) or 0 (null only) cost one."""
    return 1 if float(guidance) in (0.0, 1.0) else 2


@dataclass(frozen=True)
class Cost:
    """Network passes, counted in rows: forwards and backwards."""

    forwards: int = 0
    backwards: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forwards + other.forwards, self.backwards + other.backwards)


@dataclass
class InvertContext:
    """What an inverter may use besides the latents and the conditioning.

    ``guidance``: the sampling guidance the artifact will serve (only ``guidance_dependent`` inverters read
    it). ``generators``: one per image, seeded from the run's seed (only ``stochastic`` inverters draw).
    ``pivot``: plain DDIM inversion of rows of the batch, served from the cache when the engine has it.
    """

    guidance: float = 1.0
    generators: Sequence[torch.Generator] | None = None
    batch_size: int | None = None
    progress: bool = False
    pivot: Callable[[torch.Tensor], torch.Tensor] | None = None  # rows (b,) → trajectory (b, M+1, C, H, W)


@dataclass
class SampleRows:
    """B trajectories to sample, each with its image's artifact row and its grid point.

    ``cond`` carries the prompt each row samples with (the target prompt of an edit, else the source) and
    its guidance; ``source`` the image's source prompt at the same guidance; ``edit`` marks rows whose
    target differs from the source; ``start`` the sampling step each row starts at.
    """

    artifact: Artifact
    cond: Conditioning
    source: Conditioning
    start: torch.Tensor  # (B,) long
    edit: torch.Tensor  # (B,) bool
    generators: Sequence[torch.Generator] | None = None  # one per row, for eta > 0


class Inverter:
    """Base class: exact-schedule DDIM plan, deterministic, guidance-independent artifact.

    A subclass is a dataclass of its knobs (the fields of its ``conf/inverter/NAME.yaml``), sets ``name``,
    and implements ``invert``, ``sample`` and the two cost formulas. ``key()`` names the artifact: the
    method and every knob that changes it — a knob that only changes sampling stays out.
    """

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False  # the artifact depends on the seed
    guidance_dependent: ClassVar[bool] = False  # the artifact depends on the sampling guidance it serves
    supports_eta: ClassVar[bool] = False  # sampling accepts eta > 0
    sampling_knobs: ClassVar[tuple[str, ...]] = ()  # knobs left out of the artifact's key

    def plan(self, scheduler: DDIMScheduler, num_steps: int) -> Plan:
        """The exact plan: DDIM's (t, t_prev) pairs, or for a flow model's ``FlowMatchEulerDiscreteScheduler``
        the sigmas its own pipeline steps (``ddim_lab.engine.flow.flow_sigmas``) as a flow plan."""
        if is_flow_scheduler(scheduler):
            return flow_plan(flow_sigmas(scheduler, num_steps))
        return exact_plan(scheduler, num_steps)

    def valid_starts(self, plan: Plan) -> list[int]:
        return plan.valid_starts()

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        """Raise ValueError (one line) for settings this method cannot run; needs no model."""
        for k in start_steps:
            if not 0 <= k < num_steps:
                raise ValueError(f"start_step={k} must be an integer in [0, num_steps={num_steps})")
        if eta > 0 and not self.supports_eta:
            raise ValueError(f"inverter={self.name} samples deterministically; eta={eta} needs inverter=ddim")

    def key(self) -> dict[str, Any]:
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"method": self.name, **{k: v for k, v in knobs.items() if k not in self.sampling_knobs}}

    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        """Artifacts of B images: x0 (B, C, H, W) clean latents, ``cond`` their source prompts (B rows)."""
        raise NotImplementedError

    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Final latents (B, C, H, W) of the B trajectories in ``rows``."""
        raise NotImplementedError

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        """Network passes that computing one image's ``artifact`` (rows without batch dim) costs."""
        raise NotImplementedError

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """Network passes that sampling one trajectory costs."""
        raise NotImplementedError


def trajectory_start(
    artifact: Artifact, plan: Plan, start: torch.Tensor, name: str = "trajectory"
) -> torch.Tensor:
    """Row b's latent at its start step: ``artifact[name][b, plan.start_index[start[b]]]`` → (B, C, H, W)."""
    index = plan.start_index[start.cpu()]
    if bool((index < 0).any()):
        raise ValueError(f"start steps {start[index < 0].tolist()} have no inverted latent in this plan")
    traj = artifact[name]
    return traj[torch.arange(len(traj), device=traj.device), index.to(traj.device)]
