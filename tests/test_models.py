"""Model loading: the built `tiny` model goes through save_pretrained/from_pretrained like SD; a built model's
folder follows its recipe, build code and package versions; each family's pipeline is imported only when that
family loads; clear errors (a broken torch/torchvision pair on one line)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ddim_lab.models import build, families
from ddim_lab.models.errors import BrokenInstall, ModelUnavailable
from ddim_lab.models.loading import load_model
from ddim_lab.models.sources import model_dir
from tests.conftest import ROOT, model_spec


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
    from ddim_lab.engine.denoiser import Conditioning

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


# -- built models: a changed build builds afresh -------------------------------------------------------------
def test_code_digest_sees_code_and_ignores_comments_and_docstrings():
    code = 'def f(x):\n    """Doubles."""\n    return 2 * x  # twice\n'
    same = 'def f(x):\n    """Twice x, reworded."""\n\n    return 2 * x\n'
    assert build.code_digest(code) == build.code_digest(same)
    assert build.code_digest(code) != build.code_digest(code.replace("2 * x", "3 * x"))


def test_a_changed_build_gets_a_new_folder_and_is_built_afresh(tiny, cache_dir, monkeypatch):
    """The folder of a built model hashes its recipe, the build code (comments aside) and the versions of the
    packages it builds with: a change to any of them builds afresh instead of serving the older build."""
    spec = model_spec("tiny")
    before = model_dir(spec, cache_dir)  # the session's tiny model
    recipe = {"arch": spec["arch"], "words": sorted(set(spec["words"])), "seed": 0}
    assert build.recipe_dir(cache_dir / "models", "built", recipe) == before
    assert build.recipe_dir(cache_dir / "models", "built", {**recipe, "seed": 1}) != before
    source = build.module_source

    def edit(module: str, text: str):
        monkeypatch.setattr(
            build, "module_source", lambda name: source(name) + (text if name == module else "")
        )
        return model_dir(spec, cache_dir)

    assert edit("ddim_lab.models.build", "# a comment\n") == before  # no code changed
    rebuilt = edit("ddim_lab.models.tokenizer", "MAX_LENGTH = 76\n")  # the build changed
    assert rebuilt != before and (rebuilt / "model_index.json").exists()
    monkeypatch.setattr(build, "module_source", source)

    identity = build.build_identity()
    assert all(identity[p] == metadata.version(p) for p in ("torch", "diffusers", "transformers"))
    monkeypatch.setattr(build, "build_identity", lambda: {**identity, "diffusers": "0.0.1"})
    assert build.recipe_dir(cache_dir / "models", "built", recipe) != before  # another diffusers


# -- lazy imports and a broken install ---------------------------------------------------------------------
LAZY = """
import sys
import ddim_lab.models.loading as loading

def imported(*prefixes):
    return sorted(m for m in sys.modules if m.startswith(prefixes) and "pipeline_" in m.rsplit(".", 1)[-1])

assert "torchvision" not in sys.modules, "importing the loader imported torchvision"
assert not imported("diffusers.pipelines."), imported("diffusers.pipelines.")
loading.load_model({"name": "digits", "source": "digits"}, {"device": "cpu"}, sys.argv[1])
print(*(m.rsplit(".", 1)[-1] for m in imported("diffusers.pipelines.flux", "diffusers.pipelines.stable")))
"""


def test_the_loader_imports_a_familys_pipeline_only_when_that_family_loads(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", LAZY, str(tmp_path)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the digits UNet model: Stable Diffusion's pipeline (and its output class), no SD3 or FLUX pipeline
    assert proc.stdout.split() == ["pipeline_output", "pipeline_stable_diffusion"]


def test_a_failing_pipeline_import_is_one_line_naming_the_torch_pair(monkeypatch, cache_dir):
    def broken(name: str):  # what diffusers' lazy import raises on a mismatched pair: the cause, wrapped twice
        try:
            try:
                raise RuntimeError("operator torchvision::nms does not exist")
            except RuntimeError as cause:
                raise ModuleNotFoundError("Could not import module 'CLIPImageProcessor'.") from cause
        except ModuleNotFoundError as wrapped:
            raise RuntimeError(
                "Failed to import diffusers.pipelines.flux.pipeline_flux because of the following error (look"
                " up to see its traceback):\nCould not import module 'CLIPImageProcessor'."
            ) from wrapped

    monkeypatch.setattr(families, "import_module", broken)
    with pytest.raises(BrokenInstall) as err:
        load_model(model_spec("digits"), {"device": "cpu"}, cache_dir)
    text = str(err.value)
    assert isinstance(err.value, ModelUnavailable)  # the CLI's usage errors: one line, exit code 2
    assert "\n" not in text and "StableDiffusionPipeline" in text
    assert "RuntimeError: operator torchvision::nms does not exist" in text
    assert f"torch {torch.__version__} and torchvision {metadata.version('torchvision')}" in text
    assert "must be a matching pair" in text
