"""Rectified-flow models (SD3, FLUX) in the lab: parity of the DDIM engine's flow sampling with diffusers'
own pipelines, the flow schedule, every DDIM-family inverter on a flow plan, loading errors and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from omegaconf import open_dict

from ddim_lab.data.folders import load_dataset
from ddim_lab.engine.ddim import sample
from ddim_lab.engine.flow import flow_scheduler, flow_sigmas, resolution_shift
from ddim_lab.engine.flow_denoiser import pack_latents, unpack_latents
from ddim_lab.methods.inversion import make_plan
from ddim_lab.models.errors import ModelUnavailable
from ddim_lab.models.latent import FlowModel
from ddim_lab.models.loading import load_model
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS, lab_config, model_spec
from tests.test_cli import ddim_lab_here

STEPS = 4
PROMPTS = ["a cat", "a dog photograph"]


def noise(model: FlowModel, seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *model.latent_shape, generator=torch.Generator().manual_seed(seed))


def lab_sample(model: FlowModel, x: torch.Tensor, guidance: float) -> torch.Tensor:
    """The lab's flow sampling: the DDIM engine over the flow plan of the model's own scheduler."""
    plan = make_plan("ddim", model.scheduler(), STEPS)
    return sample(model.denoiser(), x, plan, model.conditioning(PROMPTS, [guidance] * len(PROMPTS)))


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_flow_sampling_matches_the_sd3_pipeline(tiny_flow, guidance):
    x = noise(tiny_flow)
    ours = lab_sample(tiny_flow, x.clone(), guidance)
    # the pipeline starts from the same noise (x at σ = 1 is the flow latent: r(1) = 1) and returns the
    # latent at σ = 0 in the same (shifted, scaled) space: exactly the engine's final latent
    ref = tiny_flow.pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, latents=x.clone(), output_type="latent"
    ).images
    assert ref.abs().max() > 1  # a real trajectory, not zeros
    assert (ours - ref).abs().max() < 1e-4


def test_flux_sampling_matches_the_flux_pipeline_with_embedded_guidance(tiny_flux):
    assert tiny_flux.guidance == "embedded" and tiny_flux.scheduler().config.use_dynamic_shifting
    x = noise(tiny_flux)
    ours = lab_sample(tiny_flux, x.clone(), 3.5)
    size = tiny_flux.resolution
    ref = tiny_flux.pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        latents=pack_latents(x),
        output_type="latent",
        height=size,
        width=size,
    ).images  # packed (B, h/2 · w/2, 4C)
    _, h, w = tiny_flux.latent_shape
    assert (ours - unpack_latents(ref, h, w)).abs().max() < 1e-4
    unguided = lab_sample(tiny_flux, x.clone(), 1.0)
    assert (unguided - ours).abs().max() > 1e-3  # the guidance embedding is really fed


def test_flux_classifier_free_guidance_matches_true_cfg(cache_dir):
    """A FLUX transformer without guidance embedding (like FLUX.1-schnell): guidance is CFG on v, the
    pipeline's ``true_cfg_scale`` with an empty negative prompt."""
    spec = model_spec("tiny-flux")
    spec["arch"]["transformer"]["guidance_embeds"] = False
    model = load_model(spec, {"device": "cpu"}, cache_dir)
    assert model.guidance == "cfg"
    x = noise(model, seed=1)
    ours = lab_sample(model, x.clone(), 4.0)
    ref = model.pipe(
        PROMPTS,
        negative_prompt=[""] * len(PROMPTS),
        true_cfg_scale=4.0,
        num_inference_steps=STEPS,
        latents=pack_latents(x),
        output_type="latent",
        height=model.resolution,
        width=model.resolution,
    ).images
    _, h, w = model.latent_shape
    assert (ours - unpack_latents(ref, h, w)).abs().max() < 1e-4


def test_packing_round_trips():
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)


def test_dynamic_shift_is_the_static_shift_exp_mu():
    """FLUX's exponential time shift with μ of the image size equals a static shift e^μ."""
    config = dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15)
    seq = 4096
    dynamic = flow_scheduler(FlowMatchEulerDiscreteScheduler(**config).config, seq, "flux")
    mu = resolution_shift(dynamic.config, seq)
    assert mu == pytest.approx(1.15)
    static = FlowMatchEulerDiscreteScheduler(shift=math.exp(mu))
    static.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28))
    assert torch.allclose(flow_sigmas(dynamic, 28), static.sigmas.double(), atol=1e-6)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_scheduler(FlowMatchEulerDiscreteScheduler(**config).config)


def test_flow_plan_steps_the_pipelines_sigmas(tiny_flow):
    scheduler = tiny_flow.scheduler()
    plan = make_plan("ddim", scheduler, 10)
    tiny_flow.pipe.scheduler.set_timesteps(10)
    assert torch.allclose(plan.timesteps, tiny_flow.pipe.scheduler.timesteps.double())
    assert plan.alpha[0] == 0 and plan.alpha_next[-1] == 1  # σ = 1 (pure noise) down to σ = 0
    assert scheduler.config.sigma_spacing == "scheduler" and scheduler.config.mu is None


@pytest.fixture(scope="module")
def items(tiny_flow):
    everything = load_dataset(DIGITS, tiny_flow.resolution, "")
    return [everything[0], everything[2]]


def run_grid(model, items, inverter: str, *overrides: str) -> tuple[torch.Tensor, torch.Tensor, Runner]:
    """Invert two digits and sample them back from steps 0 and 2 at guidance 1 and 3 through the engine:
    (final latents (images × points, C, h, w), the clean latents repeated alike, the runner)."""
    cfg = lab_config(
        f"inverter={inverter}", "guidance_scale=[1,3]", "start_step=[0,2]", *overrides, steps=STEPS
    )
    runner = Runner(cfg, model)
    x0 = model.encode(torch.stack([it.image for it in items]))
    artifacts, _ = runner.artifacts(items, x0)
    out = runner.sample_grid(items, artifacts)
    return out, x0.repeat_interleave(len(runner.points), dim=0), runner


@pytest.mark.parametrize(
    "inverter, overrides",
    [
        ("ddim", ()),
        ("null_text", ("inverter.inner_steps=2",)),
        ("negative_prompt", ()),
        ("fixed_point", ("inverter.iters=3",)),
        ("edit_friendly", ()),
        ("direct", ()),
    ],
)
def test_ddim_family_inverters_run_on_a_flow_model(tiny_flow, items, inverter, overrides):
    out, x0, runner = run_grid(tiny_flow, items, inverter, *overrides)
    assert out.shape == x0.shape and torch.isfinite(out).all()
    assert runner.evals["sampling"] > 0 and runner.evals["inversion"] > 0
    if inverter == "null_text":  # it optimised the null embedding through the transformer
        assert runner.evals["inversion_backwards"] > 0
    if inverter == "direct":  # the source branch walks the pivot: exact at every guidance and start step
        assert (out - x0).abs().max() < 1e-3


def test_embedded_guidance_spends_one_pass_per_row_and_the_minimum_says_so(tiny_flux, items):
    """FLUX.1-dev-style guidance is an input of the transformer: guidance 3 costs what guidance 1 does."""
    _, _, runner = run_grid(tiny_flux, items, "ddim", "inversion.guidance_scale=3")
    assert runner.denoiser.guidance == "embedded"
    spent = runner.evals["inversion"] + runner.evals["sampling"]
    steps_sampled = sum(STEPS - p.start_step for p in runner.points) * len(items)
    assert spent == runner.minimum.forwards == STEPS * len(items) + steps_sampled


def test_fixed_point_inverts_the_top_step_too(tiny_flow, items):
    """At σ = 1 (ᾱ = 0) ε(z) = z, so plain DDIM inversion copies the latent; fixed-point inversion solves the
    x̂₀ form there, so its round trip from step 0 at guidance 1 beats DDIM's."""
    ddim, x0, runner = run_grid(tiny_flow, items, "ddim")
    fixed, _, _ = run_grid(tiny_flow, items, "fixed_point", "inverter.iters=8")
    rows = [n for n, p in enumerate(runner.points * len(items)) if p.guidance == 1 and p.start_step == 0]
    err = {k: (v[rows] - x0[rows]).pow(2).mean().item() for k, v in {"ddim": ddim, "fixed": fixed}.items()}
    assert err["fixed"] < 0.1 * err["ddim"]


@pytest.mark.parametrize("inverter, message", [("edict", "ᾱ = 0"), ("bdia", "ᾱ = 0"), ("course", "flow")])
def test_inverters_that_need_a_ddim_schedule_say_so(tiny_flow, items, inverter, message):
    with pytest.raises(ValueError, match=message):
        run_grid(tiny_flow, items, inverter)


# -- the cache key covers every model option (T5 among them) ----------------------------------------------


def other_value(value):
    """A value of the same kind that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, "other"]
    if isinstance(value, dict):
        return {**value, "other": 1}
    return "other"


def test_every_model_option_but_its_name_enters_the_cache_key(tiny_flow, items, tmp_path):
    """The key holds every option of the resolved model config: changing any one (or adding one) changes it;
    the name, a label, does not."""
    base = lab_config(model="tiny-flow", steps=STEPS, cache=tmp_path)

    def key(option: str, value) -> str:
        cfg = base.copy()
        with open_dict(cfg):
            cfg.model[option] = value
        return Runner(cfg, tiny_flow).inversion_key(items[0])

    reference = Runner(base, tiny_flow).inversion_key(items[0])
    options = [k for k in base.model if k != "name"]
    assert {"t5", "guidance", "resolution", "arch", "seed", "words", "family"} <= set(options)
    for option in options:
        assert key(option, other_value(base.model[option])) != reference, option
    assert key("an_option_added_later", 1) != reference
    assert key("name", "renamed") == reference
    for overrides in (["model.t5=false"], ["model.guidance=embedded"]):  # as the command line toggles them
        assert Runner(lab_config(*overrides, model="tiny-flow", steps=STEPS), tiny_flow).inversion_key(
            items[0]
        ) != Runner(lab_config(model="tiny-flow", steps=STEPS), tiny_flow).inversion_key(items[0])


def test_t5_changes_the_inversion_and_the_cache_never_serves_the_other_setting(
    tiny_flow, items, cache_dir, tmp_path
):
    """SD3 with and without its T5 encoder (zeros in its place) inverts differently: each setting computes and
    caches its own artifact, and a rerun is served its own."""
    no_t5 = load_model({**model_spec("tiny-flow"), "t5": False}, {"device": "cpu"}, cache_dir)
    assert tiny_flow.pipe.text_encoder_3 is not None and no_t5.pipe.text_encoder_3 is None
    with_t5, zeros = (m.embed(["a cat"])[0, 77:] for m in (tiny_flow, no_t5))  # after the 77 CLIP tokens
    assert with_t5.abs().max() > 0 and not zeros.any()
    x0 = tiny_flow.encode(torch.stack([it.image for it in items]))
    made = {}
    for t5, model in ((True, tiny_flow), (False, no_t5), (True, tiny_flow)):
        runner = Runner(
            lab_config("inverter=ddim", f"model.t5={t5}", model="tiny-flow", steps=STEPS, cache=tmp_path), model
        )
        artifacts, costs = runner.artifacts(items, x0)
        cached = {hit for _, hit in costs.values()}
        assert cached == {t5 in made}, (t5, cached)  # computed the first time, served from the cache after
        made.setdefault(t5, artifacts)
        for i in range(len(items)):
            assert torch.equal(artifacts[i, None]["trajectory"], made[t5][i, None]["trajectory"])
    path = {t5: made[t5][0, None]["trajectory"] for t5 in made}  # the first image's (1, N+1, C, h, w)
    assert (path[True] - path[False]).abs().max() > 1e-2 * path[True].abs().max()


def test_pooled_embeddings_ride_with_their_rows(tiny_flow):
    cond = tiny_flow.conditioning(PROMPTS, [1.0, 4.0], negative_prompt="a city")
    assert cond.extra["pooled"].shape == (2, 64) and cond.extra["null_pooled"].shape == (2, 64)
    row = cond[torch.tensor([1])]
    assert torch.equal(row.extra["pooled"][0], cond.extra["pooled"][1])
    swapped = cond.with_null_from(tiny_flow.conditioning(["a dog", "a cup"], [1.0, 1.0]))
    assert torch.equal(
        swapped.extra["null_pooled"], tiny_flow.conditioning(["a dog", "a cup"], [1, 1]).extra["pooled"]
    )


@pytest.mark.parametrize(
    "name, repo",
    [
        ("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers"),
        ("flux-dev", "black-forest-labs/FLUX.1-dev"),
    ],
)
def test_missing_flow_weights_give_the_one_line_message(tmp_path, monkeypatch, name, repo):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable) as err:
        load_model(model_spec(name), {"device": "cpu"}, tmp_path)
    text = str(err.value)
    assert "\n" not in text and repo in text and "huggingface-cli download" in text and "model=local" in text


def test_alpha_plot_of_a_flow_model_needs_no_weights(tmp_path):
    from ddim_lab.study.tasks import alpha_plot

    table = alpha_plot(lab_config("task=alpha_plot", model="tiny-flow", steps=STEPS), tmp_path)
    assert table.alpha_cumprod.iloc[0] == 0 and (table.timestep.diff().dropna() < 0).all()
    assert (tmp_path / "alpha_t.png").exists()


def test_cli_reconstructs_with_a_flow_model(tmp_path):
    run_dir = tmp_path / "flow"
    args = ["model=tiny-flow", f"num_steps={STEPS}", "inverter=ddim", "metrics.lpips=off", "runtime.device=cpu"]
    proc = ddim_lab_here([*args, "start_step=[0,2]", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(run_dir / "results.parquet")
    assert len(table) == 20 * 2 and (table.model == "tiny-flow").all() and table.psnr.notna().all()
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["unet_evals"] == summary["minimum_unet_evals"] > 0
    assert Path(run_dir / "config.yaml").exists()
