"""RF-Inversion's sampling window and inversion time against its reference (huggingface/diffusers,
``examples/community/pipeline_flux_rf_inversion.py``), and their bad input.

- the η window: a transcription of the reference's ``__call__`` (the window computed from N, ``get_timesteps``
  truncating the schedule for the strength of start step k, the loop enumerating the truncated steps)
  selects the same plan steps as ``RFInversion.eta_at`` for every start step over a grid of N, eta_start and
  eta_stop; end to end (a float64 toy flow model, the reference loops of ``tests/references/flow.py``), the
  lab's samples from start steps 2 and 3 at N = 8 equal the reference's, and η = 0.9 moves them away from
  η = 0 (a window counted in absolute plan steps left them equal);
- ``time=reference`` inverts exactly as the reference's ``invert`` (t_j = j/(N+1), steps σ_j − σ_{j+1} from the
  top) on a shifted schedule; ``time=sigma`` and ``time=reference`` walk the same levels on a uniform
  schedule, and coincide there for a velocity that does not depend on time (γ = 0), while on a shifted
  schedule (SD3's shift 3) they walk different levels and differ;
- bad input: ``time`` other than sigma|reference, ``time=reference`` with a start step > 0, and
  ``inverter.time`` with a UNet model (a shipped one, or ``model=local`` whose model_index.json names an SD
  pipeline) stop with one line before any model loads.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddim_lab.config.validate import validate
from ddim_lab.engine.flow import flow_plan, flow_scale, flow_sigmas
from ddim_lab.engine.schedule import Plan
from ddim_lab.errors import ConfigError
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.methods.inversion.flow_solver import flow_levels
from ddim_lab.methods.inversion.rf_inversion import reference_levels
from tests.conftest import lab_config
from tests.denoisers import ToyDenoiser, ToyFlowDenoiser, toy_cond
from tests.references import flow as ref


def uniform_plan(num_steps: int) -> Plan:
    """σ = 1, (N−1)/N, …, 0: the unshifted linear schedule (FluxPipeline's spacing at shift 1)."""
    return flow_plan(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), invert_at="current")


def shifted_plan(num_steps: int) -> Plan:
    """SD3's schedule: FlowMatchEulerDiscreteScheduler(shift=3), set_timesteps(N)."""
    return flow_plan(flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), num_steps), invert_at="current")


def latents(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def rows_for(artifact: dict, cond, start: list[int]) -> SampleRows:
    n = len(start)
    return SampleRows(artifact, cond, cond, torch.tensor(start), torch.zeros(n, dtype=torch.bool))


def toy_velocity(den: ToyFlowDenoiser, cond) -> ref.Velocity:
    """The toy flow model as the reference calls its transformer: v(x_σ, t), t ∈ [0, 1]."""

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        return ToyDenoiser.__call__(den, x, torch.full((len(x),), t * 1000, dtype=torch.float64), cond)

    return v


def flow_latent(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """The lab's variance-preserving latent at σ as the flow latent x_σ = r(σ) · z."""
    return z * float(flow_scale(torch.tensor(sigma)))


# -- the η window --------------------------------------------------------------------------------------------
def reference_eta_steps(N: int, t_start: int, eta_start: float, eta_stop: float) -> list[int]:
    """The plan steps the reference's ``__call__`` applies η on when ``get_timesteps`` starts it at plan step
    ``t_start`` (its strength (N − t_start)/N, up to the float rounding of ``int(N − N·strength)``): the window
    from N, the truncated steps, ``enumerate`` over them."""
    num_inference_steps = N
    start_timestep = int(eta_start * num_inference_steps)
    stop_timestep = min(int(eta_stop * num_inference_steps), num_inference_steps)
    timesteps = list(range(N))[t_start:]  # get_timesteps: the plan steps from t_start
    return [step for i, step in enumerate(timesteps) if start_timestep <= i < stop_timestep]


WINDOWS = [(0.0, 0.25), (0.0, 0.38), (0.1, 0.5), (0.25, 0.25), (0.0, 1.0), (0.3, 0.9), (0.5, 0.75)]


@pytest.mark.parametrize("N", [5, 7, 8, 12, 28, 50])
def test_the_eta_window_selects_the_reference_steps_from_every_start_step(N):
    for eta_start, eta_stop in WINDOWS:
        inverter = make_inverter({"name": "rf_inversion", "eta_start": eta_start, "eta_stop": eta_stop})
        for k in range(N):
            lab = [i for i in range(k, N) if inverter.eta_at(i, N, k) != 0]
            assert lab == reference_eta_steps(N, k, eta_start, eta_stop), (eta_start, eta_stop, k)


@pytest.mark.parametrize("start", [2, 3])
def test_eta_acts_on_the_first_sampled_steps_as_in_the_reference(start):
    """N = 8, the default window [0, 2): η on plan steps k, k + 1 of a trajectory from step k. The lab's sample
    from step k equals the reference's (its loop on the lab's latent at σ_k) and differs from η = 0."""
    N = 8
    den, x0, plan, cond = ToyFlowDenoiser(), latents(), shifted_plan(N), toy_cond(2, 1.0)
    controlled = make_inverter({"name": "rf_inversion", "eta": 0.9})
    plain = make_inverter({"name": "rf_inversion", "eta": 0.0})
    assert [i for i in range(start, N) if controlled.eta_at(i, N, start)] == [start, start + 1]
    artifact = controlled.invert(den, x0, plan, cond, InvertContext(generators=generators(2)))
    rows = rows_for(artifact, cond, [start, start])
    out, without = controlled.sample(den, plan, rows), plain.sample(den, plan, rows)
    sigmas = flow_levels(plan).tolist()
    z = flow_latent(artifact["trajectory"][:, N - start], sigmas[start])
    expected = ref.rf_inversion_sample(toy_velocity(den, cond), z, x0, sigmas, N, 0.9, 0.0, 0.25, t_start=start)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)  # σ_N = 0: flow latent = engine latent
    assert float((out - without).norm() / without.norm()) > 1e-2  # η acts from any start step


def test_mixed_start_steps_get_each_their_own_window():
    den, x0, plan, cond = ToyFlowDenoiser(), latents(3), shifted_plan(8), toy_cond(3, 1.0)
    inverter = make_inverter("rf_inversion")
    artifact = inverter.invert(den, x0, plan, cond, InvertContext(generators=generators(3)))
    starts = [0, 3, 6]
    together = inverter.sample(den, plan, rows_for(artifact, cond, starts))
    for b, k in enumerate(starts):
        one = {name: t[b : b + 1] for name, t in artifact.items()}
        alone = inverter.sample(den, plan, rows_for(one, cond[[b]], [k]))
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-12, rtol=0)


# -- the inversion's time -------------------------------------------------------------------------------------
def test_time_reference_inverts_as_the_reference_on_a_shifted_schedule():
    N = 8
    den, x0, plan, cond = ToyFlowDenoiser(), latents(), shifted_plan(N), toy_cond(2, 1.0)
    inverter = make_inverter({"name": "rf_inversion", "time": "reference"})
    artifact = inverter.invert(den, x0, plan, cond, InvertContext(generators=generators(2)))
    y1 = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype) for g in generators(2)])
    sigmas = flow_levels(plan).tolist()
    v = toy_velocity(den, cond)
    top = ref.rf_inversion_invert(v, x0, y1, sigmas, 0.5)
    torch.testing.assert_close(artifact["trajectory"][:, N], top, atol=1e-10, rtol=0)  # σ_0 = 1: r = 1
    # sampling from step 0 is the reference's __call__ on that latent (sampling evaluates at σ either way)
    expected = ref.rf_inversion_sample(v, top, x0, sigmas, N, 0.9, 0.0, 0.25)
    torch.testing.assert_close(inverter.sample(den, plan, rows_for(artifact, cond, [0, 0])), expected)


def trajectories(den: ToyFlowDenoiser, plan: Plan, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    x0, cond = latents(), toy_cond(2, 1.0)
    out = []
    for time in ("sigma", "reference"):
        inverter = make_inverter({"name": "rf_inversion", "gamma": gamma, "time": time})
        out.append(inverter.invert(den, x0, plan, cond, InvertContext(generators=generators(2)))["trajectory"])
    return out[0], out[1]


def test_sigma_and_reference_time_coincide_on_a_uniform_schedule_and_differ_on_a_shifted_one():
    N = 8
    uniform, shifted = uniform_plan(N), shifted_plan(N)
    # the levels walked: the same on the uniform schedule, not on the shifted one (first step 0.95 vs 0.05)
    torch.testing.assert_close(reference_levels(uniform), flow_levels(uniform).flip(0), atol=1e-15, rtol=0)
    assert float((reference_levels(shifted) - flow_levels(shifted).flip(0)).abs().max()) > 0.1
    # a velocity that does not depend on time, no controller: only the levels can tell the two apart
    frozen = ToyFlowDenoiser()
    frozen.freq = torch.zeros_like(frozen.freq)  # the toy's time embedding sin(0) = 0
    a, b = trajectories(frozen, uniform, 0.0)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    a, b = trajectories(frozen, shifted, 0.0)
    assert float((a[:, N] - b[:, N]).norm() / b[:, N].norm()) > 1e-3  # measured 6.0e-3 (the toy is mildly
    # nonlinear: the order of the steps is all that differs)
    # with time in the model and the controller, the uniform schedule still tells j/(N+1) from j/N
    a, b = trajectories(ToyFlowDenoiser(), uniform, 0.5)
    assert float((a[:, N] - b[:, N]).norm() / b[:, N].norm()) > 1e-2  # measured 0.13 (shifted: 0.16)


def test_time_sigma_is_the_default_and_keys_the_artifact():
    default, sigma = make_inverter("rf_inversion"), make_inverter({"name": "rf_inversion", "time": "sigma"})
    reference = make_inverter({"name": "rf_inversion", "time": "reference"})
    assert default.time == "sigma" and default.key() == sigma.key() != reference.key()
    spec = dict(lab_config("inverter=rf_inversion", model="digits-flow").inverter)
    assert spec["time"] is None and make_inverter(spec) == default  # the yaml's null is the default


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_time_settings_are_one_line():
    with pytest.raises(ValueError, match="time='t' must be one of sigma, reference"):
        make_inverter({"name": "rf_inversion", "time": "t"}).check(8, [0], 0.0)
    reference = make_inverter({"name": "rf_inversion", "time": "reference"})
    with pytest.raises(ValueError, match="start_step=3 needs time=sigma") as err:
        reference.check(8, [0, 3, 5], 0.0)
    assert "\n" not in str(err.value)
    reference.check(8, [0], 0.0)


def one_line(cfg, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_inverter_time_with_a_unet_model_stops_before_any_model_loads(tmp_path):
    flow = ["inverter=rf_inversion", "inverter.time=reference"]
    unet = lab_config(*flow, model="digits")
    one_line(unet, "inverter.time=reference sets where a flow model's .* model=digits is a UNet model")
    unet.inverter.time = "sigma"
    one_line(unet, "inverter.time=sigma .* UNet model")
    unet.inverter.time = None  # unset: rf_inversion's own flow check, once the model is loaded
    validate(unet)
    ok = lab_config(*flow, model="digits-flow")
    validate(ok)
    ok.start_step = [0, 3]
    one_line(ok, "start_step=3 needs time=sigma")
    # model=local: the family its model_index.json names; a directory that cannot tell is left to loading
    local = lab_config(*flow, "model.path=unset", model="local")
    for pipeline in ("StableDiffusionPipeline", "StableDiffusion3Pipeline"):
        folder = tmp_path / pipeline
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}), encoding="utf-8")
        local.model.path = str(folder)
        if pipeline == "StableDiffusionPipeline":
            one_line(local, "model=local is a UNet model")
        else:
            validate(local)
    local.model.path = str(tmp_path / "none")
    validate(local)
