"""SDXL and the few-step models (issue 18, parts 1–2).

- `tiny-sdxl` (random weights in the SDXL classes) samples as ``StableDiffusionXLPipeline`` does (same noise,
  DDIMScheduler, ``output_type="latent"``) at guidance 1 and > 1, with an empty (zeroed) and a real negative
  prompt, to float32 round-off;
- its conditioning carries the pooled embeddings and time ids through ``cond[rows]`` and ``Conditioning.cat``;
- the exact inverters reconstruct their latents (MSE < 1e-6) where plain DDIM misses, and at N = 1 (trailing
  spacing: the step starts at t = 999) every UNet inverter runs and spends exactly its cost formula;
- bad input is one line: a start step other than 0 at N = 1 (before any model loads), SDXL weights that are
  not here (the id and how to get them, also in ``ddim-lab-prefetch``), non-finite VAE output (naming
  ``runtime.vae_fp32``);
- one end-to-end CLI run: tiny-sdxl, inversion with EDICT and a prompt-to-prompt edit, two steps.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler

from ddim_lab.config.validate import validate
from ddim_lab.engine.ddim import sample
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.errors import ConfigError
from ddim_lab.methods.editing import make_editor
from ddim_lab.methods.inversion import make_plan
from ddim_lab.models.errors import ModelUnavailable
from ddim_lab.models.latent import check_finite
from ddim_lab.models.loading import load_model
from ddim_lab.models.sdxl import SDXLModel
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS, lab_config, model_spec
from tests.test_cli import ddim_lab_here
from tests.test_inverter_exact import items_for
from tests.test_inverters import ALL
from tests.test_p2p import FULL, grid
from tests.test_prefetch import caches, row_of, rows  # noqa: F401 - caches is a fixture

PROMPTS = ["a photograph of a cat", "a dog on the beach"]
HUB_IDS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
    "sd-turbo": "stabilityai/sd-turbo",
}


@pytest.fixture(scope="module")
def tiny_sdxl(cache_dir) -> SDXLModel:
    return load_model(model_spec("tiny-sdxl"), {"device": "cpu"}, cache_dir)


def noise(model: SDXLModel, batch: int = 2) -> torch.Tensor:
    unet = model.pipe.unet.config
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, unet.in_channels, unet.sample_size, unet.sample_size, generator=g)


# -- the model and its conditioning --------------------------------------------------------------------------


def test_tiny_sdxl_encodes_both_encoders_the_pooled_embedding_and_time_ids(tiny_sdxl):
    pipe = tiny_sdxl.pipe
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and isinstance(tiny_sdxl, SDXLModel)
    widths = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert widths == (32, 48) and pipe.unet.config.cross_attention_dim == sum(widths)
    cond = tiny_sdxl.conditioning(PROMPTS, [3.0, 1.0])
    assert cond.text.shape == (2, 77, 80) and cond.extra["pooled"].shape == (2, 40)
    res = float(tiny_sdxl.resolution)
    assert cond.extra["time_ids"].tolist() == [[res, res, 0.0, 0.0, res, res]] * 2
    # an empty negative prompt is zeros (force_zeros_for_empty_prompt), not the encoding of ""
    assert pipe.config.force_zeros_for_empty_prompt
    assert not cond.null.any() and not cond.extra["null_pooled"].any()
    assert tiny_sdxl.embed([""]).abs().max() > 0.1
    real = tiny_sdxl.conditioning(PROMPTS, [3.0, 1.0], negative_prompt="blurry")
    torch.testing.assert_close(real.null, tiny_sdxl.embed(["blurry"] * 2))
    # the extra tensors follow rows and concatenation
    picked = Conditioning.cat([cond[torch.tensor([1])], cond[0:1]])
    torch.testing.assert_close(picked.extra["pooled"], cond.extra["pooled"].flip(0))
    assert set(picked.extra) == {"pooled", "time_ids", "null_pooled", "null_time_ids"}


@pytest.mark.parametrize("guidance, negative", [(1.0, ""), (4.0, ""), (4.0, "blurry")])
def test_sampling_matches_stable_diffusion_xl_pipeline(tiny_sdxl, guidance, negative, monkeypatch):
    pipe = tiny_sdxl.pipe
    monkeypatch.setattr(pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config))  # shared model
    x = noise(tiny_sdxl)
    ref = pipe(
        PROMPTS,
        negative_prompt=[negative] * 2 if negative else None,  # None: the pipeline's zeros
        latents=x.clone(),
        num_inference_steps=6,
        guidance_scale=guidance,
        output_type="latent",
    ).images
    cond = tiny_sdxl.conditioning(PROMPTS, [guidance] * 2, negative)
    ours = sample(tiny_sdxl.denoiser(), x, make_plan("ddim", tiny_sdxl.scheduler(), 6), cond)
    assert ref.abs().max() > 1.0
    # measured max |Δ| 8.6e-6 … 1.5e-5 on latents of size ~26 (random weights): float32 round-off
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-6)


# -- inversion: exactness, and every method at one step ------------------------------------------------------


EXACT = ("edict", "bdia", "direct", "edit_friendly")  # exact by construction: the round trip gives x_0 back


def test_exact_inverters_reconstruct_their_latents(tiny_sdxl):
    items = items_for(tiny_sdxl, 1)
    grid = ("guidance_scale=[1,3]", "inversion.guidance_scale=match")
    mse = {}
    for name in ("ddim", *EXACT):
        runner = Runner(lab_config(f"inverter={name}", *grid, model="tiny-sdxl", steps=3), tiny_sdxl)
        mse[name] = max(row["latent_mse"] for row in runner.run_group(items)[0])
    assert all(mse[name] < 1e-6 for name in EXACT), mse  # measured ≤ 2.2e-8
    assert mse["ddim"] > 1e-2, mse  # measured 0.8: the random UNet is far from DDIM's linearity


def test_one_step_trailing_plan_starts_at_the_top(tiny_sdxl):
    scheduler = tiny_sdxl.scheduler(timestep_spacing="trailing", steps_offset=0)
    plan = make_plan("ddim", scheduler, 1)
    assert plan.timesteps.tolist() == [999] and plan.inv_timesteps.tolist() == [999]
    assert float(plan.alpha_next[0]) == float(scheduler.final_alpha_cumprod) and plan.valid_starts() == [0]


@pytest.mark.parametrize("name", ALL)
def test_every_inverter_runs_at_one_step_and_spends_its_formula(tiny_sdxl, name):
    """N = 1 with trailing spacing (the turbo models' setting): a reconstruction and an edit at guidance 3,
    inverted at that guidance; the counted evaluations equal the method's cost formula."""
    grid = ("scheduler=ddim-trailing", "task=edit", "edit_prompt=[null,a dog]", "guidance_scale=3")
    config = lab_config(f"inverter={name}", *grid, "inversion.guidance_scale=match", model="tiny-sdxl", steps=1)
    if name == "course":  # the notebook keeps N − 2 latents: one line before any model, as at N = 2
        with pytest.raises(ConfigError, match="num_steps=1 must be at least 3"):
            validate(config)
        return
    validate(config)
    runner = Runner(config, tiny_sdxl)
    assert runner.plan.timesteps.tolist() == [999]
    rows_, _ = runner.run_group(items_for(tiny_sdxl, 1))
    assert len(rows_) == 2 and all(torch.isfinite(torch.tensor(r["latent_mse"])) for r in rows_)
    if name in EXACT:
        assert max(r["latent_mse"] for r in rows_ if not r["edit_prompt"]) < 1e-6
    assert runner.denoiser.unet_evals == runner.minimum.forwards > 0
    assert runner.denoiser.unet_backwards == runner.minimum.backwards


def test_prompt_to_prompt_controls_the_sdxl_unets_attention(tiny_sdxl):
    """Identical prompts with full replacement give the reconstruction bit for bit (every attention layer of
    the SDXL UNet, two transformer blocks deep, runs the controlling processor); a real edit under p2p differs
    from the same edit without attention control."""
    cfg = lab_config("inverter=ddim", "guidance_scale=[3]", "start_step=[0]", model="tiny-sdxl", steps=3)
    runner = Runner(cfg, tiny_sdxl)
    editor = make_editor({"name": "p2p", **FULL})
    rows, prompts = grid(runner, n_images=1, edit=True)  # target prompt = source prompt
    paired, take = editor.pair(rows, prompts)
    out, _ = editor.sample_pairs(runner.inverter, runner.denoiser, runner.plan, paired)
    plain = runner.inverter.sample(runner.denoiser, runner.plan, replace(paired, edit=~paired.edit))
    assert torch.equal(out[take], plain[take])
    rows, prompts = grid(runner, n_images=1, edit=True, target="a photograph of a dog")
    controlled = editor.sample(runner.inverter, runner.denoiser, runner.plan, rows, prompts)
    swapped = runner.inverter.sample(runner.denoiser, runner.plan, rows)
    assert (controlled - swapped).abs().max() > 1e-3


# -- few-step model configs ----------------------------------------------------------------------------------


def test_turbo_models_default_to_trailing_spacing_four_steps_and_the_prompt_alone():
    from ddim_lab.config.compose import compose_config

    for model in ("sdxl-turbo", "sd-turbo"):
        cfg = compose_config([f"model={model}"])
        assert cfg.scheduler.name == "ddim-trailing" and cfg.model.id == HUB_IDS[model]
        assert cfg.num_steps == 4 and cfg.guidance_scale == 1.0  # the model card's guidance off: prompt alone
    chosen = compose_config(["model=sdxl-turbo", "scheduler=ddim", "num_steps=1"])  # the command line wins
    assert chosen.scheduler.name == "ddim" and chosen.num_steps == 1


def test_a_start_step_other_than_zero_at_one_step_is_one_line_before_any_model():
    with pytest.raises(ConfigError, match=r"start_step=1: at num_steps=1 .* start_step must be 0"):
        validate(lab_config("start_step=[0,1]", model="tiny-sdxl", steps=1))
    validate(lab_config("start_step=0", "scheduler=ddim-trailing", model="tiny-sdxl", steps=1))


# -- bad input: missing weights, prefetch, non-finite VAE output ---------------------------------------------


@pytest.mark.parametrize("model", sorted(HUB_IDS))
def test_missing_hub_weights_name_the_id_and_how_to_provide_them(tmp_path, monkeypatch, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable) as err:
        load_model(model_spec(model), {"device": "cpu"}, tmp_path)
    text = str(err.value)
    assert "\n" not in text and HUB_IDS[model] in text and f"huggingface-cli download {HUB_IDS[model]}" in text


def test_prefetch_knows_the_sdxl_model(caches, capsys):  # noqa: F811 - the imported fixture
    from ddim_lab.cli import prefetch

    assert prefetch.main(["--check", "model=sdxl", "metrics.lpips=off"]) == 1
    found = row_of(rows(capsys), "hub model")
    assert found[:2] == ["missing", "required"] and HUB_IDS["sdxl"] in found


def test_sdxl_keeps_its_vae_in_fp32_and_says_so(cache_dir, caplog):
    with caplog.at_level(logging.INFO, logger="ddim_lab.models.loading"):
        model = load_model(model_spec("tiny-sdxl"), {"device": "cpu", "dtype": "bf16"}, cache_dir)
    assert model.pipe.unet.dtype == torch.bfloat16 and model.pipe.vae.dtype == torch.float32
    assert any("runtime.vae_fp32=true" in r.getMessage() for r in caplog.records)


def test_non_finite_vae_output_is_one_line_naming_vae_fp32(tiny_sdxl, monkeypatch):
    with pytest.raises(ConfigError, match=r"non-finite values on decode.*set runtime\.vae_fp32=true"):
        check_finite(torch.tensor([1.0, float("inf")]), "decode", torch.float16)
    vae = tiny_sdxl.pipe.vae
    monkeypatch.setattr(vae, "encode", lambda x: type("Out", (), {"latent_dist": _Inf(x)})())
    with pytest.raises(ConfigError, match="non-finite values on encode") as err:
        tiny_sdxl.encode(torch.rand(1, 3, 32, 32))
    assert "runtime.vae_fp32" in str(err.value) and "\n" not in str(err.value)


class _Inf:
    """A posterior whose mean overflowed, as a float16 SDXL VAE's does."""

    def __init__(self, x: torch.Tensor) -> None:
        self.mean = torch.full((len(x), 4, 16, 16), float("inf"))


# -- end to end -----------------------------------------------------------------------------------------------


def test_cli_inverts_and_edits_with_prompt_to_prompt_on_tiny_sdxl(tmp_path, cache_dir):
    import pandas as pd

    data = tmp_path / "one"
    data.mkdir()
    name = sorted(p.name for p in DIGITS.glob("*.png"))[0]
    shutil.copy(DIGITS / name, data / name)
    header, *lines = (DIGITS / "captions.csv").read_text().splitlines()
    (data / "captions.csv").write_text("\n".join([header, *[r for r in lines if r.startswith(name)]]) + "\n")
    args = ["model=tiny-sdxl", "data=folder", f"data.path={data}", "num_steps=2", "metrics.lpips=off"]
    edit = [
        "task=edit",
        "editor=p2p",
        "inverter=edict",
        "edit_prompt=[null,a photograph of a dog]",
        "guidance_scale=3",
    ]
    built = {"DDIM_LAB_CACHE": str(cache_dir)}  # the session's tiny-sdxl build, not a second one
    proc = ddim_lab_here(
        [*args, *edit, "inversion.guidance_scale=match", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, env=built
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert len(table) == 2 and set(table.model) == {"tiny-sdxl"}  # the reconstruction and the edit
    assert table.latent_mse.min() < 1e-6  # EDICT's reconstruction row
    bad = ddim_lab_here([*args, "num_steps=1", "start_step=1", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path)
    assert bad.returncode == 2 and "start_step must be 0" in bad.stderr and "loading" not in bad.stderr
