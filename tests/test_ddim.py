"""The DDIM core against diffusers (parity), against algebra (exactness), and against the seed notebook."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ddim_lab.engine.ddim import invert, sample
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.inversion import make_plan

PROMPT = "a photograph of a cat"


def _cond(model, prompts: list[str], guidance: float, negative: str = "") -> Conditioning:
    return Conditioning(
        text=model.embed(prompts),
        null=model.embed([negative] * len(prompts)),
        guidance=torch.full((len(prompts),), float(guidance)),
    )


def _latents(model, batch: int = 1, seed: int = 0) -> torch.Tensor:
    unet = model.pipe.unet.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, unet.in_channels, unet.sample_size, unet.sample_size, generator=g)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sampling_matches_stable_diffusion_pipeline(tiny, guidance, spacing, monkeypatch):
    pipe = tiny.pipe
    monkeypatch.setattr(
        pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    )  # the model is shared: restored after the test
    x = _latents(tiny)
    ref = pipe(
        PROMPT,
        negative_prompt="blurry",
        latents=x.clone(),
        num_inference_steps=10,
        guidance_scale=guidance,
        output_type="latent",
    ).images
    plan = make_plan("ddim", tiny.scheduler(timestep_spacing=spacing), 10)
    ours = sample(tiny.denoiser(), x, plan, _cond(tiny, [PROMPT], guidance, "blurry"))
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_stochastic_sampling_matches_pipeline_with_same_generator(tiny, monkeypatch):
    pipe = tiny.pipe
    monkeypatch.setattr(
        pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config)
    )  # the model is shared: restored after the test
    x = _latents(tiny)
    ref = pipe(
        PROMPT,
        latents=x.clone(),
        num_inference_steps=8,
        guidance_scale=3.0,
        eta=0.7,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images
    plan = make_plan("ddim", tiny.scheduler(), 8)
    cond = _cond(tiny, [PROMPT], 3.0)
    ours = sample(tiny.denoiser(), x, plan, cond, eta=0.7, generators=[torch.Generator().manual_seed(5)])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    deterministic = sample(tiny.denoiser(), x, plan, cond)
    assert (ours - deterministic).abs().max() > 1e-2  # the seed's noise really entered


def test_v_prediction_sampling_matches_pipeline(tiny_v, monkeypatch):
    assert tiny_v.prediction_type == "v_prediction"
    pipe = tiny_v.pipe
    monkeypatch.setattr(
        pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config)
    )  # the model is shared: restored after the test
    x = _latents(tiny_v)
    ref = pipe(
        PROMPT, latents=x.clone(), num_inference_steps=10, guidance_scale=2.5, output_type="latent"
    ).images
    plan = make_plan("ddim", tiny_v.scheduler(), 10)
    ours = sample(tiny_v.denoiser(), x, plan, _cond(tiny_v, [PROMPT], 2.5))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_inversion_matches_diffusers_inverse_scheduler_loop(tiny, guidance):
    x0 = _latents(tiny, seed=1) * 0.5
    cond = _cond(tiny, [PROMPT], guidance)
    inverse = DDIMInverseScheduler.from_config(tiny.pipe.scheduler.config)
    inverse.set_timesteps(12)
    ref, z = [], x0.clone()
    with torch.no_grad():
        for t in inverse.timesteps:
            pair = torch.cat([cond.null, cond.text])
            eps_null, eps_text = tiny.pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=pair).sample.chunk(
                2
            )
            eps = eps_null + guidance * (eps_text - eps_null)
            z = inverse.step(eps, t, z).prev_sample
            ref.append(z)
    ours = invert(tiny.denoiser(), x0, make_plan("ddim", tiny.scheduler(), 12), cond)
    assert ours.shape == (13, *x0.shape)
    torch.testing.assert_close(ours[0], x0)
    torch.testing.assert_close(ours[1:], torch.stack(ref), atol=3e-5, rtol=1e-5)


class ConstantDenoiser:
    """ε depends only on t, never on x: DDIM inversion is then exact, so invert-then-sample is the identity."""

    def __init__(self, shape):
        self.table = torch.randn(1000, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def __call__(self, x, t, cond):
        return self.table[t].to(x.dtype)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_invert_then_sample_is_exact_for_latent_independent_denoiser(spacing):
    scheduler = DDIMScheduler.from_config(
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1 if spacing == "leading" else 0,
            "timestep_spacing": spacing,
        }
    )
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    den = ConstantDenoiser((4, 8, 8))
    cond = torch.zeros(2)
    plan = make_plan("ddim", scheduler, 25)
    traj = invert(den, x0, plan, cond)
    assert (traj[-1] - x0).abs().max() > 0.5  # it really moved to noise
    for k in (0, 7, 24):
        out = sample(den, traj[plan.start_index[k]], plan, cond, start_step=k)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # the course schedule is not exact: it starts one step off and ends at ᾱ_1
    course = make_plan("course", scheduler, 25)
    traj = invert(den, x0, course, cond)
    out = sample(den, traj[course.start_index[0]], course, cond)
    assert (out - x0).abs().max() > 1e-3


def notebook_invert(unet_eps, alphas_cumprod, timesteps, start_latents, n):
    """The seed notebook's invert(), transcribed loop for loop (its scheduler calls kept as data)."""
    latents = start_latents.clone()
    intermediate_latents = []
    timesteps = reversed(timesteps)
    for i in range(1, n):
        if i >= n - 1:
            continue
        t = timesteps[i]
        noise_pred = unet_eps(latents, t)
        current_t = max(0, t.item() - (1000 // n))
        next_t = t
        alpha_t = alphas_cumprod[current_t]
        alpha_t_next = alphas_cumprod[next_t]
        latents = (latents - (1 - alpha_t).sqrt() * noise_pred) * (alpha_t_next.sqrt() / alpha_t.sqrt()) + (
            1 - alpha_t_next
        ).sqrt() * noise_pred
        intermediate_latents.append(latents)
    return torch.cat(intermediate_latents)


def notebook_sample(unet_eps, alphas_cumprod, timesteps, start_latents, start_step, n):
    """The seed notebook's sample() loop."""
    latents = start_latents.clone()
    for i in range(start_step, n):
        t = timesteps[i]
        noise_pred = unet_eps(latents, t)
        prev_t = max(1, t.item() - (1000 // n))
        alpha_t = alphas_cumprod[t.item()]
        alpha_t_prev = alphas_cumprod[prev_t]
        predicted_x0 = (latents - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
        direction_pointing_to_xt = (1 - alpha_t_prev).sqrt() * noise_pred
        latents = alpha_t_prev.sqrt() * predicted_x0 + direction_pointing_to_xt
    return latents


def test_course_inverter_reproduces_the_notebook(tiny):
    n, start_step = 50, 20
    scheduler = tiny.scheduler()
    scheduler.set_timesteps(n)
    cond = _cond(tiny, [PROMPT], 3.5)
    den = tiny.denoiser()

    def unet_eps(latents, t):
        return den(latents, t.expand(len(latents)), cond)

    x0 = _latents(tiny, seed=2) * 0.5
    ref = notebook_invert(unet_eps, scheduler.alphas_cumprod, scheduler.timesteps, x0, n)
    assert ref.shape == (48, *x0.shape[1:])
    plan = make_plan("course", tiny.scheduler(), n)
    traj = invert(den, x0, plan, cond)
    assert traj.shape[0] == 49
    torch.testing.assert_close(traj[1:, 0], ref, atol=5e-5, rtol=1e-5)  # fp32 vs fp64 over 48 steps

    start = ref[-(start_step + 1)][None]
    torch.testing.assert_close(traj[plan.start_index[start_step]], start)
    ref_out = notebook_sample(unet_eps, scheduler.alphas_cumprod, scheduler.timesteps, start, start_step, n)
    out = sample(den, start, plan, cond, start_step=start_step)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert plan.valid_starts() == list(range(n - 2))


def test_batched_rows_with_different_starts_equal_one_at_a_time(tiny):
    plan = make_plan("ddim", tiny.scheduler(), 10)
    x = _latents(tiny, batch=3, seed=4)
    cond = Conditioning.cat([_cond(tiny, [PROMPT], g) for g in (1.0, 3.0, 0.0)])
    starts = torch.tensor([0, 4, 7])
    together = sample(tiny.denoiser(), x, plan, cond, start_step=starts, batch_size=2)
    for b in range(3):
        alone = sample(tiny.denoiser(), x[b : b + 1], plan, cond[b : b + 1], start_step=int(starts[b]))
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)
