"""Model loading: the built `tiny` model goes through save_pretrained/from_pretrained like SD; clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ddim_lab.models.loading import ModelUnavailable, load_model, model_dir
from tests.conftest import model_spec


def test_tiny_is_a_stable_diffusion_format_model_on_disk(tiny, cache_dir):
    path = model_dir(model_spec("tiny"), cache_dir)
    assert (path / "model_index.json").exists() and (
        path / "unet" / "diffusion_pytorch_model.safetensors"
    ).exists()
    pipe = tiny.pipe
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a photograph of a cat").input_ids
    assert len(ids) == 7 and max(ids) < pipe.text_encoder.config.vocab_size  # each listed word is one token
    assert model_dir(model_spec("tiny"), cache_dir) == path  # built once, then reused


def test_encode_is_the_scaled_posterior_mean(tiny):
    images = torch.rand(2, 3, tiny.resolution, tiny.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = tiny.pipe.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(tiny.encode(images), mean * tiny.pipe.vae.config.scaling_factor)
    torch.testing.assert_close(tiny.encode(images), tiny.encode(images))  # no sampling


def test_prompt_embeddings_match_the_pipeline_encoder(tiny):
    ours = tiny.embed(["a cat", "", "a cat"])
    ref = tiny.pipe.encode_prompt(["a cat", ""], "cpu", 1, False)[0]
    torch.testing.assert_close(ours, torch.stack([ref[0], ref[1], ref[0]]))


def test_missing_hub_model_names_the_id_and_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = {"name": "sd15", "source": "hub", "id": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    with pytest.raises(ModelUnavailable) as err:
        load_model(spec, {"device": "cpu"}, tmp_path)
    text = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in text and "huggingface-cli download" in text
    assert "model=local" in text


def test_local_directory_without_a_model_is_rejected(tmp_path):
    with pytest.raises(ModelUnavailable, match="model_index.json"):
        load_model({"name": "local", "source": "local", "path": str(tmp_path)}, {"device": "cpu"}, tmp_path)


def test_half_precision_keeps_the_vae_in_fp32(cache_dir):
    model = load_model(model_spec("tiny"), {"device": "cpu", "dtype": "bf16", "vae_fp32": True}, cache_dir)
    assert model.pipe.unet.dtype == torch.bfloat16 and model.pipe.vae.dtype == torch.float32
    x = model.encode(torch.rand(1, 3, 32, 32))
    assert (
        x.dtype == torch.float32
        and torch.isfinite(model.denoiser()(x, torch.tensor([500]), _cond(model))).all()
    )


def _cond(model, guidance=(2.0,)):
    from ddim_lab.denoiser import Conditioning

    n = len(guidance)
    return Conditioning(
        text=model.embed(["a cat"] * n), null=model.embed([""] * n), guidance=torch.tensor(guidance)
    )


def test_channels_last_knob_gives_the_same_noise_prediction(tiny, cache_dir):
    fast = load_model(model_spec("tiny"), {"device": "cpu", "channels_last": True}, cache_dir)
    assert fast.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 100])
    torch.testing.assert_close(
        fast.denoiser()(x, t, _cond(fast, (2.0, 1.0))),
        tiny.denoiser()(x, t, _cond(tiny, (2.0, 1.0))),
        atol=1e-5,
        rtol=1e-4,
    )
