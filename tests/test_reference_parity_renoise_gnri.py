"""Reference parity of ``renoise`` and ``gnri`` (issue 18) on the shipped digits model, float32, against compact
transcriptions of their reference code: ``tests/references/renoise.py`` (garibida/ReNoise-Inversion) with
``tests/references/euler_ancestral.py`` (their Euler-ancestral scheduler with its noise list), and
``tests/references/gnri.py`` (dvirsamuel/NewtonRaphsonInversion).

- renoise with the DDIM scheduler (``sampler=ddim``): renoising, the first-step schedule, averaging and the
  noise regularisation (both terms, the pairwise term's random shifts from the image's generator), at the
  reference's guidance 1; at guidance 3.5 the reference's first call batches [z_fwd, z] against [∅, c, ∅, c]
  (its ε* and ε_0 mix the two latents): with the two calls separated it is the lab, as written the deviation
  is measured;
- renoise and gnri with the Euler-ancestral scheduler (``sampler=ancestral``, DDIM at η = 1): the reference
  runs in the sampler's unscaled latents x̃ = x/√ᾱ, the lab in the model's; the test compares x = √ᾱ x̃. The
  lab's plan then ends at ᾱ = 1 (``set_alpha_to_one``) as the Euler sigmas end at 0. Inversion, the noise maps
  (ReNoise's corrected ones, GNRI's as drawn) and sampling with them (the reference's ``step`` loop).

The Newton step of GNRI divides by the latent's size (the reference's 64·64·4 at 512 px; 4·8·8 here). The
regularisation runs at λ_pair = 0.5 and λ_KL = 0.01 here. The reference's λ_pair = 20 is sized for 64×64
latents (the pairwise gradient scales as 1/(H·W)) and diverges on 8×8 ones; the lab's ``lambda_ac`` is the
step at 64×64 (it takes λ·H·W/64²), so 0.5 here is its 32. Its λ_KL = 0.065 runs, but the
KL term's |·| makes its gradient jump where a patch's KL crosses 0: at 0.065 a 1e-6 change of the input
latents moves the digits' trajectory by 1.8e-2 (measured), so float32 rounding (a different batch size in
one network call) is no longer rounding; at 0.01 the same change moves it by 1.2e-5.
"""

from __future__ import annotations

import torch

from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from tests import test_reference_parity_ddim_family as family
from tests.references import euler_ancestral, gnri, renoise
from tests.test_reference_parity_ddim_family import assert_deviation, assert_parity, cond, reference_scheduler

lab = family.lab  # the family's fixture: three held-out digits, their latents and embeddings

SEED = 10  # image b draws from Generator(SEED + b), in the lab and in the reference
REG = {"lambda_kl": 0.01, "lambda_ac": 0.5, "num_reg_steps": 2, "num_ac_rolls": 2}
LAB_REG = {"lambda_kl": 0.01, "lambda_ac": 0.5 * 64**2 / 8**2, "reg_steps": 2, "ac_rolls": 2}
SCHEDULE = {"iters": 3, "average_range": [2, 4], "first_step_iters": 2, "first_step_average_range": [0, 2]}
REF_SCHEDULE = {
    "num_renoise_steps": 3,
    "avg_range": (2, 4),
    "max_renoise_first_step": 2,
    "first_step_range": (0, 2),
}


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(SEED + b) for b in range(n)]


def lab_run(lab: dict, spec: dict, N: int, B: int, guidance: float, **scheduler_overrides):
    """The lab's inverter, plan, denoiser and artifact for the first B digits."""
    scheduler = lab["model"].scheduler(**scheduler_overrides)
    inverter = make_inverter(spec)
    plan, denoiser = inverter.plan(scheduler, N), lab["model"].denoiser(scheduler)
    c = cond(lab, lab["text"][:B], guidance)
    artifact = inverter.invert(denoiser, lab["x0"][:B], plan, c, InvertContext(generators=generators(B)))
    return inverter, plan, denoiser, artifact


def reconstruct(inverter, plan, denoiser, artifact, c: Conditioning) -> torch.Tensor:
    n = len(c)
    rows = SampleRows(artifact, c, c, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    return inverter.sample(denoiser, plan, rows)


def renoise_reference(lab: dict, N: int, B: int, guidance: float, **kwargs) -> torch.Tensor:
    """The reference with the DDIM scheduler, one image at a time: (B, N+1, C, h, w)."""
    out = []
    for b, g in enumerate(generators(B)):
        x0 = lab["x0"][b : b + 1]
        forward = torch.randn(x0.shape, generator=g)  # the pipeline's self.noise
        scheduler = reference_scheduler(lab["model"], N)
        text, null = lab["text"][b : b + 1], lab["null"][b : b + 1]
        kw = {"text": text, "null": null, "guidance_scale": guidance, **REF_SCHEDULE, **kwargs}
        out.append(renoise.invert(lab["unet"], scheduler, x0, forward, reg=REG, generator=g, **kw))
    return torch.cat(out)


def test_renoise_matches_the_reference_with_its_noise_regularisation(lab):
    """N = 6 (two steps below t = 250: the first-step schedule), both regularisation terms, guidance 1."""
    N, B = 6, 2
    _, _, _, artifact = lab_run(lab, {"name": "renoise", **SCHEDULE, **LAB_REG}, N, B, 1.0)
    theirs = renoise_reference(lab, N, B, 1.0)
    assert_parity(
        "renoise inversion, regularised", artifact["trajectory"], theirs
    )  # measured 5.0e-6 (scale 4.6)


def test_renoise_first_call_deviates_with_guidance_as_stated(lab):
    """At guidance 3.5: with ε* and ε_0 from two calls the reference is the lab; as written it is not."""
    N, B, g = 6, 2, 3.5
    _, _, _, artifact = lab_run(lab, {"name": "renoise", **SCHEDULE, **LAB_REG}, N, B, g)
    fixed = renoise_reference(lab, N, B, g, separate_first_call=True)
    assert_parity("renoise inversion g=3.5, first call separated", artifact["trajectory"], fixed)
    theirs = renoise_reference(lab, N, B, g)
    assert_deviation("renoise first call at g=3.5", artifact["trajectory"], theirs, 1.0, 20.0)  # measured 4.6


# -- the Euler-ancestral sampler (DDIM at η = 1) with noise lists -------------------------------------------


def euler_levels(plan, like: torch.Tensor) -> torch.Tensor:
    """√ᾱ of each trajectory index [x₀, z_1 … z_N] (N+1,), as a column for ``like`` (B, N+1, C, h, w)."""
    alpha = torch.cat([torch.ones(1, dtype=torch.float64), plan.inv_alpha_to])
    return alpha.sqrt().to(like).view(1, -1, 1, 1, 1)


def noise_lists(lab: dict, N: int, B: int) -> list[list[torch.Tensor]]:
    """Each image's noise list (sampling order), drawn first from its generator, as ``main.run`` draws it."""
    shape = (1, *lab["x0"].shape[1:])
    return [[torch.randn(shape, generator=g) for _ in range(N)] for g in generators(B)]


def test_renoise_ancestral_noise_correction_matches_the_reference(lab):
    """The reference's SDXL-Turbo setup on the digits: Euler-ancestral with a noise list, regularised
    renoising, ``perform_noise_correction``; then its sampler from the top with the corrected list."""
    N, B = 4, 2
    spec = {"name": "renoise", **SCHEDULE, **LAB_REG, "sampler": "ancestral"}
    inverter, plan, denoiser, artifact = lab_run(lab, spec, N, B, 1.0, set_alpha_to_one=True)
    config = lab["model"].pipe.scheduler.config
    trajectories, maps, samples = [], [], []
    for b, (g, noise) in enumerate(zip(generators(B), noise_lists(lab, N, B), strict=True)):
        for _ in range(N):  # the lab's generator b drew the same list: keep the two streams aligned
            torch.randn((1, *lab["x0"].shape[1:]), generator=g)
        x0, text = lab["x0"][b : b + 1], lab["text"][b : b + 1]
        forward = torch.randn(x0.shape, generator=g)
        scheduler = euler_ancestral.euler_ancestral(config, N, noise)
        kw = {"text": text, "null": lab["null"][b : b + 1], "guidance_scale": 1.0, **REF_SCHEDULE}
        traj = renoise.invert(
            lab["unet"], scheduler, x0, forward, reg=REG, generator=g, noise_correction=True, **kw
        )
        trajectories.append(traj)
        maps.append(torch.cat(scheduler.noise_list))
        samples.append(euler_ancestral.sample(lab["unet"], scheduler, traj[:, -1], text))
    theirs = torch.cat(trajectories)
    assert_parity("renoise ancestral inversion", artifact["trajectory"], theirs * euler_levels(plan, theirs))
    assert_parity(
        "renoise corrected noise maps", artifact["noise"], torch.stack(maps)
    )  # measured 4.1e-5 (scale 7.5)
    ours = reconstruct(inverter, plan, denoiser, artifact, cond(lab, lab["text"][:B], 1.0))
    assert_parity("renoise ancestral reconstruction", ours, torch.cat(samples))


def test_gnri_matches_the_reference_with_its_euler_ancestral_sampler(lab):
    """``inv_hp = [2, 0.1, 0.2]`` (``main.py``), the prompt alone (the reference's guidance 0), N = 4."""
    N, B = 4, 2
    inverter, plan, denoiser, artifact = lab_run(
        lab, {"name": "gnri", "sampler": "ancestral"}, N, B, 1.0, set_alpha_to_one=True
    )
    config = lab["model"].pipe.scheduler.config
    size = lab["x0"][0].numel()
    trajectories, samples = [], []
    for b, noise in enumerate(noise_lists(lab, N, B)):
        scheduler = euler_ancestral.euler_ancestral(config, N, noise)
        text = lab["text"][b : b + 1]
        traj = gnri.invert(lab["unet"], scheduler, lab["x0"][b : b + 1].clone(), text, [2, 0.1, 0.2], 1 / size)
        trajectories.append(traj)
        samples.append(euler_ancestral.sample(lab["unet"], scheduler, traj[:, -1], text))
    theirs = torch.cat(trajectories)
    assert_parity("gnri ancestral inversion", artifact["trajectory"], theirs * euler_levels(plan, theirs))
    assert_parity(
        "gnri noise maps (as drawn)",
        artifact["noise"],
        torch.stack([torch.cat(n) for n in noise_lists(lab, N, B)]),
    )
    ours = reconstruct(inverter, plan, denoiser, artifact, cond(lab, lab["text"][:B], 1.0))
    assert_parity("gnri ancestral reconstruction", ours, torch.cat(samples))
