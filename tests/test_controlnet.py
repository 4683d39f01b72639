"""ControlNet conditioning through the denoiser adapter matches diffusers' ControlNet pipeline; the offline
ControlNet of model=tiny; the scores generation rows carry (judge agreement, control adherence)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

from ddim_lab.config.compose import compose_config
from ddim_lab.data import digits
from ddim_lab.data.folders import load_dataset
from ddim_lab.data.judge import prompt_digit, train_judge
from ddim_lab.engine.ddim import sample
from ddim_lab.engine.denoiser import Conditioning, UNetDenoiser
from ddim_lab.methods.control import make_control
from ddim_lab.methods.inversion import make_plan
from ddim_lab.metrics.image import ssim
from ddim_lab.models.controlnet import attach_controlnet
from ddim_lab.models.loading import load_model
from ddim_lab.study.controlnet_task import controlnet_task
from ddim_lab.study.loggers import LocalLogger
from ddim_lab.study.tasks import generation_scores, text_to_image
from tests.conftest import ROOT, model_spec


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


# -- the offline ControlNet of model=tiny -------------------------------------------------------------------
def test_tiny_controlnet_is_built_offline_fits_tiny_and_acts(tmp_path):
    model = load_model(model_spec("tiny"), {"device": "cpu"}, tmp_path)
    model = attach_controlnet(model, compose_config(["controlnet=tiny"]).controlnet, tmp_path)  # built here
    assert isinstance(model.controlnet, ControlNetModel) and model.controlnet_revision
    assert list(tmp_path.glob("models/controlnet-*/config.json"))
    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    control = torch.rand(1, 3, model.resolution, model.resolution, generator=g)
    x = torch.randn(1, *model.latent_shape, generator=g)
    cond = Conditioning(
        text=model.embed(["a cat"]),
        null=model.embed([""]),
        guidance=torch.tensor([1.0]),
        extra={"control": control},
    )
    plan = make_plan("ddim", scheduler, 3)
    controlled = sample(model.denoiser(scheduler), x, plan, cond)
    model.controlnet_scale = 0.0
    plain = sample(model.denoiser(scheduler), x, plan, cond)
    assert (controlled - plain).abs().max() > 1e-3  # its zero convolutions are not zero: the control acts


# -- scores of generated images --------------------------------------------------------------------------------
def test_prompt_digit_reads_every_caption_template():
    assert [prompt_digit(digits.caption(k, t)) for k in range(10) for t in range(4)] == [
        k for k in range(10) for _ in range(4)
    ]
    assert [prompt_digit(p) for p in ("", "a cat", "digit three or eight", "digit 12")] == [None] * 4


def test_generation_scores_judge_the_prompt_digit_and_the_control_adherence():
    scans, labels = digits.split()["held_out"]
    images = digits.to_rgb(scans[:30], 16)  # real held-out digits stand in for generated ones
    labels = labels[:30]
    read = train_judge().predict(images)
    cfg = compose_config(["model=digits"])
    right = generation_scores(cfg, images, [digits.caption(k) for k in labels])
    assert right["judge_agreement"] == [float(r == k) for r, k in zip(read, labels, strict=True)]
    assert np.mean(right["judge_agreement"]) >= 0.9
    wrong = generation_scores(cfg, images, [digits.caption((k + 5) % 10, 3) for k in labels])
    assert np.mean(wrong["judge_agreement"]) <= 0.1  # the judge reads the image, not the prompt
    mixed = generation_scores(cfg, images[:2], [digits.caption(labels[0]), "a cat"])
    assert mixed["judge_agreement"][1] != mixed["judge_agreement"][1]  # NaN: the prompt names no digit
    canny = make_control({"name": "canny"})
    scores = generation_scores(cfg, images, ["a cat"] * 30, canny(images), canny)
    assert "judge_agreement" not in scores  # no prompt names a digit
    assert scores["control_ssim"] == pytest.approx([1.0] * 30)  # the result's edges are its control's
    shifted = generation_scores(cfg, images, [""] * 30, canny(images.roll(1, 0)), canny)
    assert np.mean(shifted["control_ssim"]) < 0.6  # another digit's edges
    plumbing = generation_scores(compose_config(["model=tiny"]), images, [digits.caption(k) for k in labels])
    assert plumbing == {}  # the judge only scores the digits models


def test_controlnet_rows_carry_their_scores(tmp_path):
    """task=controlnet on the digits ControlNet: each row's judge agreement and edge-SSIM are those of its own
    result (recomputed from the saved latents), and the controlled results follow their edges."""
    heldout = ROOT / "ddim_lab" / "assets" / "digits-heldout"
    data = tmp_path / "data"
    data.mkdir()
    names = ["digit1_0.png", "digit4_0.png", "digit7_0.png"]
    for name in names:
        shutil.copy(heldout / name, data / name)
    (data / "captions.csv").write_text(
        "image,prompt\n" + "".join(f"{n},{digits.caption(int(n[5]))}\n" for n in names)
    )
    cfg = compose_config(
        ["task=controlnet", "control=canny", "controlnet=digits-canny", f"data.path='{data}'", "num_steps=10"]
        + ["num_images=2", "guidance_scale=1", "runtime.device=cpu", "runtime.progress=false"]
    )
    model = attach_controlnet(load_model(cfg.model, {"device": "cpu"}), cfg.controlnet)
    table = controlnet_task(cfg, model, tmp_path, LocalLogger())
    results = model.decode(torch.load(tmp_path / "latents.pt"))
    canny = make_control({"name": "canny"})
    controls = canny(torch.stack([it.image for it in load_dataset(data, 16, "")]))[[0, 0, 1, 1, 2, 2]]
    read = train_judge().predict(results)
    assert list(table.judge_agreement) == [
        float(r == prompt_digit(p)) for r, p in zip(read, table.prompt, strict=True)
    ]
    assert list(table.control_ssim) == pytest.approx(ssim(canny(results), controls).tolist())
    assert table.control_ssim.mean() > 0.3 and table.unet_evals.eq(10).all()


def test_sample_rows_on_the_digits_model_carry_the_judge(tmp_path):
    """task=sample on the shipped digits model: the judge reads the digit each prompt names."""
    cfg = compose_config(
        ["task=sample", "prompt=[a handwritten digit one,digit 7]", "num_images=3", "num_steps=10"]
        + ["guidance_scale=4", "runtime.device=cpu", "runtime.progress=false"]
    )
    model = load_model(cfg.model, {"device": "cpu"})
    table = text_to_image(cfg, model, tmp_path, LocalLogger())
    assert set(table.judge_agreement) <= {0.0, 1.0} and table.judge_agreement.mean() >= 5 / 6
