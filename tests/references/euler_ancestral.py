"""``MyEulerAncestralDiscreteScheduler`` of garibida/ReNoise-Inversion (``src/schedulers/euler_scheduler.py``),
which dvirsamuel/NewtonRaphsonInversion copies (``src/euler_scheduler.py``): diffusers' Euler-ancestral
scheduler with a fixed noise list (``set_noise_list``), its sampling ``step`` with the list's map of the step,
``inv_step`` (the step solved for the noisier sample, the list's map subtracted) and ReNoise's
``step_and_update_noise`` (the map corrected towards the one that lands on the expected sample; the
``optimize_epsilon_type`` branch: 10 gradient steps of 1.8 on ‖n − n_req‖). ε-prediction only, as the lab's
digits model; ``scale_model_input`` as the reference's (it re-initialises the step index from t).

The sampler works on unscaled latents x̃ = x/√ᾱ_t with σ_t = √((1−ᾱ_t)/ᾱ_t); the network sees x̃/√(σ²+1).
"""

from __future__ import annotations

import torch
from diffusers import EulerAncestralDiscreteScheduler


class MyEulerAncestral(EulerAncestralDiscreteScheduler):
    def set_noise_list(self, noise_list: list[torch.Tensor]) -> None:
        self.noise_list = noise_list

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self._init_step_index(timestep.view(1))
        return EulerAncestralDiscreteScheduler.scale_model_input(self, sample, timestep)

    def _sigmas(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma_from = self.sigmas[self.step_index]
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        return sigma_from, sigma_to, sigma_up

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Sampling: x̃ + ε (σ_down − σ) + n σ_up."""
        self._init_step_index(timestep.view(1))
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)
        _, sigma_to, sigma_up = self._sigmas()
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev_sample = sample + model_output * (sigma_down - sigma)
        prev_sample = prev_sample + self.noise_list[self.step_index] * sigma_up
        self._step_index += 1
        return prev_sample.to(model_output.dtype)

    def step_and_update_noise(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        expected_prev_sample: torch.Tensor,
        optimize_epsilon_type: bool = False,
    ) -> torch.Tensor:
        self._init_step_index(timestep.view(1))
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)
        _, sigma_to, sigma_up = self._sigmas()
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev_sample = sample + model_output * (sigma_down - sigma)
        if sigma_up > 0:
            req_noise = (expected_prev_sample - prev_sample) / sigma_up
            if not optimize_epsilon_type:
                self.noise_list[self.step_index] = req_noise
            else:
                for _ in range(10):
                    n = self.noise_list[self.step_index].detach().clone().requires_grad_(True)
                    with torch.enable_grad():
                        loss = torch.norm(n - req_noise.detach())
                        loss.backward()
                    self.noise_list[self.step_index] -= n.grad.detach() * 1.8
        prev_sample = prev_sample + self.noise_list[self.step_index] * sigma_up
        self._step_index += 1
        return prev_sample.to(model_output.dtype)

    def inv_step(
        self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """Inversion: x̃ − ε (σ_to²/σ_from − σ_from) − n σ_up (the noisier x̃ from the cleaner one)."""
        self._init_step_index(timestep.view(1))
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)
        sigma_from = self.sigmas[self.step_index]
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2).abs() / sigma_from**2) ** 0.5
        sigma_down = sigma_to**2 / sigma_from
        prev_sample = sample - model_output * (sigma_down - sigma)
        prev_sample = prev_sample - self.noise_list[self.step_index] * sigma_up
        self._step_index += 1
        return prev_sample.to(model_output.dtype)


def euler_ancestral(config, num_steps: int, noise_list: list[torch.Tensor]) -> MyEulerAncestral:
    """The reference's scheduler from a model's scheduler config, after ``set_timesteps`` and its noise list."""
    scheduler = MyEulerAncestral.from_config(config)
    scheduler.set_timesteps(num_steps)
    scheduler.set_noise_list(noise_list)
    return scheduler


@torch.no_grad()
def sample(
    unet: torch.nn.Module, scheduler: MyEulerAncestral, x: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """The inference pipelines' loop at guidance 0/1 (no CFG): x̃ from the top through every ``step``."""
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=text).sample
        x = scheduler.step(eps, t, x)
    return x
