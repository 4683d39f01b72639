"""The σ ↔ ᾱ map of ``ddim_lab.engine.flow``: a DDIM step on rescaled latents is one Euler step of the flow."""

from __future__ import annotations

import torch

from ddim_lab.engine.ddim import ddim_step
from ddim_lab.engine.flow import (
    flow_alpha,
    flow_plan,
    flow_sigma,
    from_flow,
    to_flow,
    velocity,
    velocity_prediction,
)


def test_sigma_alpha_round_trip():
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(flow_sigma(flow_alpha(sigma)), sigma, atol=1e-12)
    assert flow_alpha(torch.tensor(0.0)) == 1 and flow_alpha(torch.tensor(1.0)) == 0


def test_ddim_step_is_an_euler_step_of_the_flow():
    g = torch.Generator().manual_seed(0)
    x_sigma, v = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).unbind(0)[0:2]
    x_sigma, v = x_sigma[None].expand(3, -1, -1, -1), v[None].expand(3, -1, -1, -1)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.2, 0.0])
    pred = velocity_prediction(v, x_sigma, sigma)
    assert torch.allclose(velocity(pred), v)
    # the prediction is consistent with the latent: x_σ = (1−σ) x̂₀ + σ ε̂
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose((1 - s) * pred.x0 + s * pred.eps, x_sigma)
    x_vp = from_flow(x_sigma, sigma)
    moved = ddim_step(x_vp, pred.eps, flow_alpha(sigma), flow_alpha(sigma_next), x0=pred.x0)
    euler = x_sigma + (sigma_next.double() - sigma).view(-1, 1, 1, 1) * v
    assert torch.allclose(to_flow(moved, sigma_next.double()), euler, atol=1e-12)


def test_flow_plan_retraces_sampling():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    plan = flow_plan(sigmas)
    assert torch.allclose(plan.timesteps, sigmas[:-1].double() * 1000)
    assert torch.equal(plan.inv_alpha_from, plan.alpha_next.flip(0))
    assert torch.equal(plan.inv_timesteps, plan.timesteps.flip(0))  # DDIM convention: the noisier time
    current = flow_plan(sigmas, invert_at="current")
    assert torch.allclose(current.inv_timesteps, sigmas[1:].flip(0).double() * 1000)
    assert plan.start_index.tolist() == [4, 3, 2, 1]
