"""ControlNet conditioning through the denoiser adapter matches diffusers' ControlNet pipeline."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

from ddim_lab.ddim import sample
from ddim_lab.denoiser import Conditioning, UNetDenoiser
from ddim_lab.inversion import make_plan


def _controlnet(unet) -> ControlNetModel:
    """A ControlNet copied from the UNet whose zero convolutions get random weights, so it really acts."""
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            module.weight.normal_(std=0.05)
    return net.eval()


def test_controlnet_sampling_matches_pipeline(tiny):
    pipe = tiny.pipe
    controlnet = _controlnet(pipe.unet)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref_pipe = StableDiffusionControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref_pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    control = torch.rand(1, 3, tiny.resolution, tiny.resolution, generator=g)  # an edge map, in [0, 1]
    x = torch.randn(1, 4, 16, 16, generator=g)
    ref = ref_pipe(
        "a cat",
        image=control,
        latents=x.clone(),
        num_inference_steps=6,
        guidance_scale=3.0,
        output_type="latent",
        controlnet_conditioning_scale=0.8,
    ).images

    den = UNetDenoiser(pipe.unet, scheduler.alphas_cumprod, controlnet=controlnet, controlnet_scale=0.8)
    cond = Conditioning(
        text=tiny.embed(["a cat"]),
        null=tiny.embed([""]),
        guidance=torch.tensor([3.0]),
        extra={"control": control},
    )
    plan = make_plan("ddim", scheduler, 6)
    ours = sample(den, x, plan, cond)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    plain = sample(UNetDenoiser(pipe.unet, scheduler.alphas_cumprod), x, plan, cond)
    assert (plain - ours).abs().max() > 1e-3  # the control image really steered the sample
