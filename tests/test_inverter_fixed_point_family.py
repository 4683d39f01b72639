"""The fixed-point family of issue 18: AIDI's Anderson acceleration (``fixed_point``), ``renoise`` and ``gnri``.

- Anderson's step solves a linear fixed point on which the plain iteration diverges, in as many iterations as
  the dimension (the Krylov property); on the digits model at guidance 7.5 it reconstructs better than the
  plain iteration;
- the cost formulas equal the network rows a counting denoiser sees, written out by hand (renoise's first-step
  schedule, its KL evaluation, the noise correction; gnri's iterations); no network backward;
- renoise's regularisation lowers its own losses; its noise correction brings the ancestral sampler back
  onto the inverted trajectory; gnri is steps 1–4 of its docstring, checked by hand on the toy denoiser;
- behaviour on the digits model at N = 4 with trailing steps;
- bad input: ``acceleration`` on an inverter without it is one config error naming the inverter that has it.
"""

from __future__ import annotations

import pytest
import torch

from ddim_lab.config.compose import compose_config
from ddim_lab.config.validate import validate
from ddim_lab.data.folders import load_dataset
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import exact_plan
from ddim_lab.errors import ConfigError
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.anderson import Anderson
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.methods.inversion.fixed_point import StepRows
from ddim_lab.methods.inversion.renoise import pair_loss, patch_kl
from tests.conftest import DIGITS
from tests.denoisers import ToyDenoiser, sd_scheduler, toy_cond


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(n)]


def round_trip(inverter, denoiser, x0, plan, cond) -> tuple[dict, torch.Tensor]:
    artifact = inverter.invert(denoiser, x0, plan, cond, InvertContext(generators=gens(len(x0))))
    n = len(x0)
    rows = SampleRows(artifact, cond, cond, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    return artifact, inverter.sample(denoiser, plan, rows)


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


# -- Anderson acceleration ------------------------------------------------------------------------------


def test_anderson_solves_a_linear_fixed_point_on_which_the_plain_iteration_diverges():
    d = 6
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = 1.5 * A / torch.linalg.eigvals(A).abs().max()  # spectral radius 1.5: z ← Az + b diverges
    b = torch.randn(d, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A, b)

    def step(z):  # (1, d, 1, 1) → g(z)
        return (A @ z.flatten() + b).view(1, d, 1, 1)

    plain = accelerated = torch.zeros(1, d, 1, 1, dtype=torch.float64)
    anderson = Anderson(m=d)
    for _ in range(d + 2):
        plain = step(plain)
        accelerated = anderson.step(accelerated, step(accelerated))
    assert float((plain.flatten() - exact).norm()) > 1.0  # measured 10.4
    assert float((accelerated.flatten() - exact).norm()) < 1e-8  # GMRES-like: exact after d + 1 steps
    assert Anderson(m=0).step(plain, step(plain)).equal(step(plain))  # m = 0 is the plain step


def test_anderson_reconstructs_better_at_high_guidance_on_the_digits_model(digits):
    """Inverted and sampled at 7.5, N = 10, five iterations a step: Anderson's latent error is about half the
    plain iteration's (measured on these four digits: mean latent MSE 0.090 plain, 0.046 Anderson; per image
    0.051/0.0026/0.0038/0.30 → 0.17/5e-5/0.0027/0.010: one image gets worse, at steps where Anderson stalls
    at a fold of the sampling step short of the root, see docs/BENCHMARKS.md)."""
    items = load_dataset(DIGITS, digits.resolution, "")[:4]
    x0 = digits.encode(torch.stack([it.image for it in items]))
    n = len(items)
    cond = Conditioning(
        digits.embed([it.prompt for it in items]), digits.embed([""] * n), torch.full((n,), 7.5)
    )
    scheduler = digits.scheduler()
    denoiser = digits.denoiser(scheduler)
    errors = {}
    for acceleration in ("none", "anderson"):
        inverter = make_inverter({"name": "fixed_point", "acceleration": acceleration})
        plan = inverter.plan(scheduler, 10)
        _, out = round_trip(inverter, denoiser, x0, plan, cond)
        errors[acceleration] = float((out - x0).pow(2).mean())
    assert errors["anderson"] < 0.6 * errors["none"], errors


# -- cost formulas, counted ---------------------------------------------------------------------------


PLAN_6 = exact_plan(sd_scheduler(), 6)  # timesteps 831 665 499 333 167 1: two below t = 250


@pytest.mark.parametrize("guidance", [1.0, 3.5])
@pytest.mark.parametrize(
    ("spec", "per_step_rows"),
    [
        # 4 steps × (1 + 9) + 2 first steps × (1 + 5), + ε* of the KL term at every step
        ({"name": "renoise", "reg_steps": 1, "ac_rolls": 1}, 4 * 10 + 2 * 6 + 6),
        ({"name": "renoise", "reg_steps": 0}, 4 * 10 + 2 * 6),
        ({"name": "renoise", "reg_steps": 1, "ac_rolls": 1, "lambda_kl": 0.0}, 4 * 10 + 2 * 6),
        # the ancestral sampler's noise correction: ε at the inverted latent, once a step
        ({"name": "renoise", "reg_steps": 0, "sampler": "ancestral"}, 4 * 10 + 2 * 6 + 6),
        ({"name": "renoise", "reg_steps": 0, "sampler": "ancestral", "correction_steps": 0}, 4 * 10 + 2 * 6),
        ({"name": "renoise", "iters": 3, "first_step_max_timestep": 0, "reg_steps": 0}, 6 * 4),
        ({"name": "gnri"}, 6 * 2),
        ({"name": "gnri", "iters": 1, "sampler": "ancestral"}, 6 * 1),
        ({"name": "fixed_point", "acceleration": "anderson", "iters": 4}, 6 * 5),
    ],
)
def test_inversion_costs_are_the_rows_the_network_sees(x0, spec, per_step_rows, guidance):
    toy = ToyDenoiser()
    inverter = make_inverter(spec)
    inverter.invert(toy, x0, PLAN_6, toy_cond(len(x0), guidance), InvertContext(generators=gens(len(x0))))
    rows = len(x0) * per_step_rows * (1 if guidance == 1.0 else 2)
    cost = inverter.inversion_cost(PLAN_6, {}, guidance, guidance)
    assert toy.unet_evals == rows == len(x0) * cost.forwards
    assert toy.unet_backwards == cost.backwards == 0


# -- renoise ---------------------------------------------------------------------------------------------


def test_the_regularisation_lowers_each_of_its_losses(x0):
    """One round of either term on a correlated, off-scale ε lowers that term's loss (at the digits' 8×8
    the pairwise step is 20·8·8/64² = 0.3125: measured L_pair 8.26 → 7.4; the KL 26.5 → 25.7)."""
    smooth = torch.nn.functional.avg_pool2d(x0.float(), 3, stride=1, padding=1) * 3  # correlated neighbours
    optimal = torch.randn(smooth.shape, generator=torch.Generator().manual_seed(1))

    def pair(e):  # the same shifts for both sides
        return float(sum(pair_loss(e[b], torch.Generator().manual_seed(9)) for b in range(len(e))))

    for kl, ac in ((0.0, 20.0), (0.065, 0.0)):
        inverter = make_inverter({"name": "renoise", "reg_steps": 1, "lambda_kl": kl, "lambda_ac": ac})
        out = inverter.regularise(smooth, StepRows(0, x0.float(), {}, gens(2, 5), {"optimal": optimal}))
        if ac:
            assert pair(out) < 0.95 * pair(smooth)
        else:
            assert float(patch_kl(out, optimal).sum()) < 0.99 * float(patch_kl(smooth, optimal).sum())


def test_noise_correction_moves_the_maps_towards_the_ones_that_land_on_the_input(x0):
    """Ancestral sampling (DDIM at η = 1) with the inversion's maps, two renoising iterations a step on the
    toy denoiser: the reference's rule (normalised steps of ``correction_lr`` on ‖n − n_req‖) brings a map to
    within ``correction_lr`` of n_req, so many small steps reconstruct far better than the maps as drawn
    (measured max error 1.71 → 0.060); a map already within 1.8 of n_req oscillates about it and returns where
    it started after the reference's 10 steps (here every map: the same reconstruction)."""
    toy, cond = ToyDenoiser(), toy_cond(len(x0), 1.0)
    plan = exact_plan(sd_scheduler(), 10)
    base = {"name": "renoise", "reg_steps": 0, "iters": 2, "average": False, "sampler": "ancestral"}
    errors = {}
    for steps, lr in ((0, 1.8), (10, 1.8), (200, 0.05)):
        spec = {**base, "correction_steps": steps, "correction_lr": lr}
        _, out = round_trip(make_inverter(spec), toy, x0, plan, cond)
        errors[steps] = float((out - x0).abs().max())
    assert errors[200] < 0.1 * errors[0]
    assert abs(errors[10] - errors[0]) < 1e-9


# -- gnri ------------------------------------------------------------------------------------------------


def test_gnri_is_newton_raphson_on_the_regularised_residual_checked_by_hand(x0):
    """Every step of gnri (iters 2, α 0.3) written out: x̃⁰ the Euler guess, the score f̄ (G1), the Newton
    step (G2), the better of the two g̃'s."""
    toy, cond = ToyDenoiser(), toy_cond(len(x0), 2.0)
    alpha = 0.3
    traj = make_inverter({"name": "gnri", "alpha": alpha}).invert(toy, x0, PLAN_6, cond, InvertContext())[
        "trajectory"
    ]
    for j in range(6):
        a_c, a_n = float(PLAN_6.inv_alpha_from[j]), float(PLAN_6.inv_alpha_to[j])
        t = PLAN_6.inv_timesteps[j].expand(len(x0))
        z_clean = traj[:, j]

        def g(x, z_clean=z_clean, t=t, a_c=a_c, a_n=a_n):  # Eq. 1 at σ = 0: the DDIM step from z' with ε(x)
            eps = toy(x, t, cond)
            return a_n**0.5 * (z_clean - (1 - a_c) ** 0.5 * eps) / a_c**0.5 + (1 - a_n) ** 0.5 * eps

        s, sigma = a_n**0.5, ((1 - a_n) / a_n) ** 0.5
        x = (a_n / a_c) ** 0.5 * z_clean  # 1.
        candidates, scores = [], []
        for _ in range(2):
            gx = g(x)  # 2.
            r = (gx - x) / s
            f = r.abs() + alpha * 0.5 * ((gx / s - x0) / sigma) ** 2
            candidates.append(gx)
            scores.append(f.flatten(1).mean(1))
            x = x + s * scores[-1].view(-1, 1, 1, 1) * torch.sign(r)  # 3. (G2)
        best = torch.where((scores[1] < scores[0]).view(-1, 1, 1, 1), candidates[1], candidates[0])  # 4.
        torch.testing.assert_close(traj[:, j + 1], best, rtol=0, atol=1e-12)


def test_gnri_refuses_the_zero_snr_top_step(x0):
    plan = exact_plan(sd_scheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 4)
    assert float(plan.inv_alpha_to[-1]) == 0.0
    with pytest.raises(ValueError, match="inverter=gnri: ᾱ = 0"):
        make_inverter("gnri").invert(ToyDenoiser(), x0, plan, toy_cond(len(x0), 1.0), InvertContext())


# -- the digits model at four trailing steps -------------------------------------------------------------


@pytest.fixture(scope="module")
def few_steps(digits):
    """Three held-out digits, N = 4 with trailing steps, guidance 1: latent MSE of a method's round trip."""
    items = load_dataset(DIGITS, digits.resolution, "")[:6:2]
    x0 = digits.encode(torch.stack([it.image for it in items]))
    n = len(items)
    cond = Conditioning(digits.embed([it.prompt for it in items]), digits.embed([""] * n), torch.ones(n))
    scheduler = digits.scheduler(timestep_spacing="trailing", steps_offset=0)
    denoiser = digits.denoiser(scheduler)

    def error(spec) -> float:
        inverter = make_inverter(spec)
        _, out = round_trip(inverter, denoiser, x0, inverter.plan(scheduler, 4), cond)
        assert torch.isfinite(out).all()
        return float((out - x0).pow(2).mean())

    return error


def test_renoise_and_gnri_beat_ddim_at_four_steps(few_steps):
    """Measured latent MSE: ddim 0.12, gnri 0.086, renoise 0.080 (defaults: its KL term costs reconstruction),
    renoise without regularisation 0.0020, and with the ancestral sampler and noise correction 0.0031."""
    ddim = few_steps("ddim")
    assert few_steps("gnri") < 0.9 * ddim
    assert few_steps("renoise") < 0.9 * ddim
    assert few_steps({"name": "renoise", "reg_steps": 0}) < 0.05 * ddim
    assert few_steps({"name": "renoise", "reg_steps": 0, "sampler": "ancestral"}) < 0.05 * ddim


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "renoise", "null_text"])
def test_acceleration_on_an_inverter_without_it_is_one_config_error(name):
    cfg = compose_config([f"inverter={name}", "+inverter.acceleration=anderson", "runtime.device=cpu"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert f"inverter={name} has no knob 'acceleration'" in message and "inverter=fixed_point" in message


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            {"name": "fixed_point", "acceleration": "nesterov"},
            "acceleration='nesterov' must be one of none, anderson",
        ),
        ({"name": "fixed_point", "acceleration": "anderson", "anderson_m": 0}, "anderson_m=0"),
        ({"name": "fixed_point", "acceleration": "anderson", "average": 2}, "set inverter.average=1"),
        ({"name": "renoise", "average_range": [5, 2]}, "average_range"),
        ({"name": "renoise", "sampler": "euler"}, "sampler='euler'"),
        ({"name": "gnri", "iters": 0}, "iters=0"),
    ],
)
def test_bad_knobs_are_refused_before_any_model(spec, match):
    with pytest.raises(ValueError, match=match):
        make_inverter(spec).check(4, [0], 0.0)


@pytest.mark.parametrize("name", ["renoise", "gnri"])
def test_the_runs_eta_stays_zero_for_inverters_with_their_own_sampler(name):
    with pytest.raises(ValueError, match="eta=0.5 must stay 0"):
        make_inverter(name).check(4, [0], 0.5)
