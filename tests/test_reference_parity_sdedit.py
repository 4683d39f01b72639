"""Reference parity of ``sdedit`` on the shipped digits models: the lab's editor against diffusers' own
image-to-image pipelines, which are SDEdit (noise the image to ``strength``'s level, then sample):

- the flow model (digits-flow, SD3 architecture): ``StableDiffusion3Img2ImgPipeline`` (its
  ``scheduler.scale_noise``: x_σ = (1−σ)x₀ + σε) at start step k ↔ strength (N − k)/N;
- the UNet model (digits): ``StableDiffusionImg2ImgPipeline`` with the DDIM scheduler (``add_noise``:
  √ᾱ x₀ + √(1−ᾱ) ε), η = 0.

Both are given the clean latent as their ``image`` (a latent-channel tensor is taken as the latent), the same
prompt embeddings and the same noise (one image, its generator seeded as the lab seeds the row's).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline

from ddim_lab.data import digits
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from tests.conftest import model_spec

N = 6
SEED = 3


@pytest.fixture(scope="module")
def flow_model(cache_dir):
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("digits-flow"), {"device": "cpu"}, cache_dir)


def one_digit(model) -> tuple[torch.Tensor, str]:
    scans, labels = digits.held_out_subset(1, seed=1)
    return model.encode(digits.to_rgb(scans, model.resolution)), digits.caption(int(labels[0]))


def lab_sdedit(model, x0: torch.Tensor, prompt: str, guidance: float, k: int) -> torch.Tensor:
    """The editor as the engine runs it: ``inverter=none``'s artifact, one row from start step k."""
    inverter, editor = make_inverter("none"), make_editor("sdedit")
    plan = inverter.plan(model.scheduler(), N)
    den = model.denoiser(model.scheduler())
    cond = model.conditioning([prompt], [guidance])
    artifact = inverter.invert(den, x0, plan, cond, InvertContext())
    rows = SampleRows(
        artifact, cond, cond, torch.tensor([k]), torch.tensor([False]), [torch.Generator().manual_seed(SEED)]
    )
    return editor.sample(inverter, den, plan, rows, EditPrompts([prompt], [prompt], [None]))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("k", [0, 2, 4])
def test_sdedit_matches_the_sd3_img2img_pipeline(flow_model, k, guidance):
    x0, prompt = one_digit(flow_model)
    ours = lab_sdedit(flow_model, x0, prompt, guidance, k)
    cond = flow_model.conditioning([prompt], [guidance])
    pipe = StableDiffusion3Img2ImgPipeline(**flow_model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=x0.clone(),
        strength=(N - k) / N,
        num_inference_steps=N,
        guidance_scale=guidance,
        prompt_embeds=cond.text,
        pooled_prompt_embeds=cond.extra["pooled"],
        negative_prompt_embeds=cond.null,
        negative_pooled_prompt_embeds=cond.extra.get("null_pooled"),
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).images
    assert (ours - ref).abs().max() < 5e-5
    assert (ours - x0).abs().max() > 0.05  # the noise did something


@pytest.mark.parametrize("k", [0, 3])
def test_sdedit_matches_the_sd_img2img_pipeline(digits_unet, k):
    model = digits_unet
    x0, prompt = one_digit(model)
    guidance = 3.0
    ours = lab_sdedit(model, x0, prompt, guidance, k)
    cond = model.conditioning([prompt], [guidance])
    scheduler = model.scheduler()
    pipe = StableDiffusionImg2ImgPipeline(**{**model.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=x0.clone(),
        strength=(N - k) / N,
        num_inference_steps=N,
        guidance_scale=guidance,
        prompt_embeds=cond.text,
        negative_prompt_embeds=cond.null,
        generator=torch.Generator().manual_seed(SEED),
        eta=0.0,
        output_type="latent",
    ).images
    assert (ours - ref).abs().max() < 5e-5
    assert (ours - x0).abs().max() > 0.05  # the noise did something


@pytest.fixture(scope="module")
def digits_unet(digits):
    return digits
