"""The shipped digits flow model: it loads offline as an SD3 model, draws the prompted digits and reconstructs
held-out digits better with more steps. Its training script runs end to end on a few steps.

No skips: the model is part of the package, so a missing model is a failure.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection

from ddim_lab.data import digits
from ddim_lab.data.judge import train_judge
from ddim_lab.engine.ddim import invert, sample
from ddim_lab.methods.inversion import make_plan
from ddim_lab.models.loading import load_model
from ddim_lab.models.sources import shipped_model_dir
from tests.conftest import ROOT
from tests.test_cli import as_main, run_here

MAX_WEIGHT_BYTES = 20 * 1024**2
SAMPLE_STEPS = 12
SAMPLE_GUIDANCE = 4.0


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory):
    spec = {"name": "digits-flow", "source": "digits-flow", "resolution": 16}
    return load_model(spec, {"device": "cpu"}, tmp_path_factory.mktemp("cache"))


def test_shipped_flow_model_is_a_small_sd3_model(flow_model):
    pipe = flow_model.pipe
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert flow_model.latent_shape == (4, 8, 8)
    root = shipped_model_dir("digits-flow")
    stats = json.loads((root / "train_stats.json").read_text())
    assert flow_model.scaling_factor == pytest.approx(stats["scaling_factor"], rel=1e-6)
    assert flow_model.shift_factor == 0.0
    weights = sorted(root.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt"))
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES
    assert (root / "MODEL_CARD.md").exists()


def test_prompted_samples_show_the_prompted_digit(flow_model):
    plan = make_plan("flow_euler", flow_model.scheduler(), SAMPLE_STEPS)
    labels = np.arange(10)
    prompts = [digits.caption(int(k)) for k in labels]
    cond = flow_model.conditioning(prompts, [SAMPLE_GUIDANCE] * len(labels))
    x = torch.randn((len(labels), *flow_model.latent_shape), generator=torch.Generator().manual_seed(0))
    images = flow_model.decode(sample(flow_model.denoiser(), x, plan, cond))
    correct = int((train_judge().predict(images) == labels).sum())
    assert correct >= 8, f"the judge agrees on {correct}/10 samples"  # measured: 10/10


def _reconstruction_errors(model, steps: int) -> tuple[float, float]:
    """Latent and pixel MSE of flow-Euler inversion + sampling (guidance 1, captioned) of four held-out
    digits, against the encoded latents and their VAE decoding."""
    scans, labels = digits.held_out_subset(4, seed=0)
    x0 = model.encode(digits.to_rgb(scans, model.resolution))
    cond = model.conditioning([digits.caption(int(k)) for k in labels], [1.0] * len(labels))
    plan = make_plan("flow_euler", model.scheduler(), steps)
    trajectory = invert(model.denoiser(), x0, plan, cond)
    start = plan.valid_starts()[0]
    out = sample(model.denoiser(), trajectory[plan.start_index[start]], plan, cond, start_step=start)
    latent = float((out - x0).pow(2).mean())
    pixel = float((model.decode(out) - model.decode(x0)).pow(2).mean())
    return latent, pixel


def test_more_steps_reconstruct_held_out_digits_better(flow_model):
    latent_10, pixel_10 = _reconstruction_errors(flow_model, 10)
    latent_50, pixel_50 = _reconstruction_errors(flow_model, 50)
    assert latent_50 * 10 <= latent_10  # measured: 100× lower (0.32 → 0.0032)
    assert pixel_50 * 10 <= pixel_10  # measured: 170× lower (0.024 → 1.4e-4)


def test_flow_training_script_smoke_run_produces_a_loadable_model(tmp_path):
    out = tmp_path / "model"
    args = [
        "train.steps=2",
        "train.warmup=1",
        "log_every=1",
        f"out_dir={out}",
        f"state_path={tmp_path / 'state.pt'}",
        f"base_dir={shipped_model_dir()}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    script = ROOT / "scripts" / "train_digits_flow.py"
    # `python SCRIPT ARGS`, run in this process
    proc = run_here(as_main(script), [str(script), *args], tmp_path, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps_done"] == 2
    assert stats["collapsed_context_max_abs_diff"] < 1e-4  # the training shortcut equals the pipeline
    spec = {"name": "smoke", "source": "local", "path": str(out), "resolution": 16}
    model = load_model(spec, {"device": "cpu"}, tmp_path / "cache")
    assert isinstance(model.pipe, StableDiffusion3Pipeline)
    assert model.pipe.tokenizer.model_max_length == 16
