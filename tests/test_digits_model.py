"""The shipped digits model: it loads offline as a Stable Diffusion model, inverts well, and the judge works.

No skips: the model is part of the package, so a missing model is a failure.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ddim_lab.data import digits
from ddim_lab.data.folders import load_dataset
from ddim_lab.data.judge import held_out_accuracies, to_scan, train_judge
from ddim_lab.engine.ddim import invert, sample
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.inversion import make_plan
from ddim_lab.models.loading import load_model
from ddim_lab.models.sources import shipped_model_dir

HELD_OUT_DIR = Path(str(resources.files("ddim_lab") / "assets" / "digits-heldout"))
SD_DEFAULT_SCALING = 0.18215
MAX_WEIGHT_BYTES = 20 * 1024**2


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    spec = {"name": "digits", "source": "digits", "resolution": 16}
    return load_model(spec, {"device": "cpu"}, tmp_path_factory.mktemp("cache"))


def test_shipped_model_is_a_stable_diffusion_model(digits_model):
    pipe = digits_model.pipe
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer.model_max_length == 77
    assert digits_model.resolution == 16
    # the latent scaling factor was measured on the digits latents, not left at SD's default
    stats = json.loads((shipped_model_dir() / "train_stats.json").read_text())
    assert digits_model.scaling_factor != pytest.approx(SD_DEFAULT_SCALING, abs=1e-4)
    assert digits_model.scaling_factor == pytest.approx(stats["scaling_factor"], rel=1e-6)


def test_shipped_weights_are_small_safetensors():
    root = shipped_model_dir()
    weights = sorted(root.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt"))
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES


def _reconstruction_errors(model, steps: int) -> tuple[float, float]:
    """Latent MSE to x0 and pixel MSE to the VAE round trip of exact DDIM inversion + reconstruction
    (guidance 1, start step 0) of two held-out digits."""
    items = [
        it
        for it in load_dataset(HELD_OUT_DIR, model.resolution, "")
        if it.name in ("digit3_0.png", "digit8_0.png")
    ]
    images = torch.stack([it.image for it in items])
    cond = Conditioning(
        text=model.embed([it.prompt for it in items]), null=None, guidance=torch.ones(len(items))
    )
    plan = make_plan("ddim", model.scheduler(), steps)
    x0 = model.encode(images)
    trajectory = invert(model.denoiser(), x0, plan, cond)
    out = sample(model.denoiser(), trajectory[plan.start_index[0]], plan, cond)
    latent = float((out - x0).pow(2).mean())
    pixel = float((model.decode(out) - model.decode(x0)).pow(2).mean())
    return latent, pixel


def test_more_steps_reconstruct_held_out_digits_better(digits_model):
    latent_10, pixel_10 = _reconstruction_errors(digits_model, 10)
    latent_50, pixel_50 = _reconstruction_errors(digits_model, 50)
    assert latent_50 * 4 <= latent_10  # measured: 16× lower (0.0197 → 0.0013)
    assert pixel_50 * 4 <= pixel_10  # measured: 16× lower (2.5e-4 → 1.5e-5)


def test_judge_reads_8x8_scans_and_their_16px_round_trip():
    judge = train_judge()
    acc = held_out_accuracies(judge, 16)
    assert acc["scans_8x8"] >= 0.9
    assert abs(acc["rgb_16x16_round_trip"] - acc["scans_8x8"]) <= 0.03
    images, labels = digits.split()["held_out"]
    back = to_scan(digits.to_rgb(images[:50], 16))
    assert back.shape == (50, 8, 8)
    assert np.abs(back - images[:50]).mean() < 0.1  # bilinear up, area down: close, slightly blurred
    assert judge.accuracy(digits.to_rgb(images, 16), labels) == acc["rgb_16x16_round_trip"]
