"""Null-text inversion (Mokady et al. 2023): guided reconstruction on the digits model, sampling from a later
start step along null-text's own trajectory, batching, the engine's accounting (one pivot per image, cache or
not), the cache key and entries.

The optimisation runs on the shipped digits model (10 DDIM steps, three held-out digits, 8×8 latents); the
engine's accounting on the ``tiny`` random-weight model.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from ddim_lab.data.folders import Item, load_dataset
from ddim_lab.engine.ddim import invert, sample
from ddim_lab.engine.denoiser import Conditioning, UNetDenoiser
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.methods.inversion.null_text import NullTextInversion
from ddim_lab.metrics.image import psnr
from ddim_lab.models.loading import load_model
from ddim_lab.study.cache import InversionCache
from ddim_lab.study.runner import Runner
from tests.conftest import model_spec
from tests.test_controlnet import _controlnet
from tests.test_engine import DIGITS, encode, make_cfg, per_step

STEPS_DIGITS = 10
GUIDANCE = 7.5
HELD_OUT = ("digit2_0.png", "digit5_1.png", "digit7_0.png")


@pytest.fixture(scope="module")
def digits(cache_dir):
    return load_model(model_spec("digits"), {"device": "cpu"}, cache_dir)


@pytest.fixture(scope="module")
def setup(digits):
    """Three held-out digits: items, clean latents, the plan, the source conditioning at guidance 1 / 7.5."""
    items = [it for it in load_dataset(DIGITS, digits.resolution, "") if it.name in HELD_OUT]
    assert [it.name for it in items] == list(HELD_OUT)
    x0 = encode(digits, items)  # (3, 4, 8, 8)
    text = digits.embed([it.prompt for it in items])
    null = digits.embed([""] * len(items))
    B = len(items)
    plan = NullTextInversion().plan(digits.scheduler(), STEPS_DIGITS)
    return {
        "items": items,
        "x0": x0,
        "plan": plan,
        "cond1": Conditioning(text, null, torch.ones(B)),
        "cond": Conditioning(text, null, torch.full((B,), GUIDANCE)),
    }


def reconstruct(inverter, denoiser, setup, artifact, rows: list[int] | None = None) -> torch.Tensor:
    """Guided reconstruction (start step 0) of the rows of ``artifact``: (b, C, h, w)."""
    rows = list(range(len(setup["x0"]))) if rows is None else rows
    cond = setup["cond"][torch.tensor(rows)]
    start = torch.zeros(len(rows), dtype=torch.long)
    batch = SampleRows(artifact, cond, cond, start, torch.zeros(len(rows), dtype=torch.bool))
    return inverter.sample(denoiser, setup["plan"], batch)


@pytest.fixture(scope="module")
def optimised(digits, setup):
    """Default knobs, all three images in one batch, optimised for guidance 7.5."""
    denoiser = digits.denoiser(digits.scheduler())
    inverter = NullTextInversion()
    artifact = inverter.invert(
        denoiser, setup["x0"], setup["plan"], setup["cond1"], InvertContext(guidance=GUIDANCE)
    )
    return inverter, denoiser, artifact


# -- 1. the method: guided reconstruction follows the pivot ------------------------------------------------


def test_guided_reconstruction_beats_its_own_ddim_pivot(digits, setup, optimised):
    inverter, denoiser, artifact = optimised
    x0, plan, N = setup["x0"], setup["plan"], STEPS_DIGITS
    B, C, h, w = x0.shape
    assert artifact["trajectory"].shape == (B, N + 1, C, h, w)
    assert artifact["null"].shape == (B, N, *setup["cond"].null.shape[1:])
    assert artifact["inner_steps"].shape == (B, N)
    assert artifact["latents"].shape == (B, N + 1, C, h, w)
    # the pivot is plain DDIM inversion at guidance 1
    pivot = invert(denoiser, x0, plan, setup["cond1"]).transpose(0, 1)
    torch.testing.assert_close(artifact["trajectory"], pivot, atol=1e-5, rtol=0)
    # the same pivot sampled at 7.5 with the plain null embedding (what inverter=ddim gives at 7.5) ...
    ddim = sample(denoiser, pivot[:, plan.start_index[0]], plan, setup["cond"])
    # ... against sampling with the optimised per-step null embeddings
    null_text = reconstruct(inverter, denoiser, setup, artifact)
    mse_ddim = (ddim - x0).pow(2).flatten(1).mean(1)  # (B,)
    mse_null = (null_text - x0).pow(2).flatten(1).mean(1)
    assert bool((mse_null < 0.5 * mse_ddim).all()), (mse_null, mse_ddim)  # measured: 3.8–7.3× lower
    vae = digits.decode(x0)
    gain = psnr(digits.decode(null_text), vae) - psnr(digits.decode(ddim), vae)  # (B,) dB
    assert bool((gain > 2.0).all()), gain  # measured: +6.4 to +9.9 dB
    # the null embeddings moved away from the negative prompt's, step by step
    moved = (artifact["null"] - setup["cond"].null[:, None]).abs().flatten(2).amax(2)  # (B, N)
    assert bool((moved > 1e-3).all())
    assert bool(((artifact["inner_steps"] >= 1) & (artifact["inner_steps"] <= inverter.inner_steps)).all())


def test_guidance_one_optimises_nothing_and_samples_like_ddim(digits, setup):
    denoiser = digits.denoiser(digits.scheduler())
    inverter = NullTextInversion()
    plan = setup["plan"]
    artifact = inverter.invert(denoiser, setup["x0"], plan, setup["cond1"], InvertContext(guidance=1.0))
    assert denoiser.unet_evals == STEPS_DIGITS * len(setup["x0"]) and denoiser.unet_backwards == 0  # pivot only
    assert int(artifact["inner_steps"].sum()) == 0
    assert torch.equal(artifact["null"], setup["cond1"].null[:, None].expand_as(artifact["null"]))
    cond = setup["cond1"]
    start = torch.zeros(len(cond), dtype=torch.long)
    out = inverter.sample(denoiser, plan, SampleRows(artifact, cond, cond, start, start.bool()))
    ddim = sample(denoiser, artifact["trajectory"][:, plan.start_index[0]], plan, cond)
    torch.testing.assert_close(out, ddim, atol=1e-6, rtol=0)
    assert torch.equal(artifact["latents"], artifact["trajectory"])  # z̄ = z*: every start is on the pivot


def test_later_start_steps_resume_null_texts_own_trajectory(digits, setup, optimised):
    """∅_t was fitted at z̄_t: sampling from step k starts at z̄_k (``latents``), so the reconstruction from any
    k lands on the same z̄_0 as from k = 0. Starting at the pivot's z*_k instead (the old behaviour, here
    rebuilt by handing the sampler the pivot as ``latents``) lands elsewhere."""
    inverter, denoiser, artifact = optimised
    plan, B, N = setup["plan"], len(setup["x0"]), STEPS_DIGITS
    latents, pivot = artifact["latents"], artifact["trajectory"]
    top = plan.start_index[0]
    assert torch.equal(latents[:, top], pivot[:, top])  # z̄_T = z*_T: start step 0 is unchanged
    assert float((latents[:, 1:top] - pivot[:, 1:top]).abs().amax()) > 1e-2  # z̄ leaves the pivot below T
    vae = digits.decode(setup["x0"])
    z0 = latents[:, 0]  # z̄_0: the end of null-text's own trajectory
    scale = float(z0.abs().max())

    def from_step(k: int, art: dict) -> torch.Tensor:
        start, cond = torch.full((B,), k, dtype=torch.long), setup["cond"]
        return inverter.sample(denoiser, plan, SampleRows(art, cond, cond, start, start.bool()))

    at_zero = psnr(digits.decode(from_step(0, artifact)), vae)  # (B,) dB
    for k in (3, 6, N - 1):
        out = from_step(k, artifact)
        torch.testing.assert_close(out, z0, atol=1e-5 * scale, rtol=0)  # measured ≤ 6e-6 · scale
        gap = at_zero - psnr(digits.decode(out), vae)
        assert bool((gap.abs() < 0.01).all()), (k, gap)  # measured: < 1e-4 dB
        # from the pivot's z*_k the fitted embeddings steer a latent they never saw: measured 0.03–0.4 off
        off = from_step(k, {**artifact, "latents": pivot})
        assert float((off - z0).abs().amax()) > 100 * 1e-5 * scale, k


# -- 2. batched over images = one image at a time ---------------------------------------------------------


def test_batched_equals_one_at_a_time_with_early_stops(digits, setup):
    """Images that stop early leave the call set; the others go on. In float64, so that the UNet's rounding
    per batch size (which Adam's normalised step amplifies on near-zero gradients) cannot hide a mix-up.
    Knobs chosen so that the images stop at different iterations (checked); few steps to stay fast."""
    scheduler = digits.scheduler()
    unet = copy.deepcopy(digits.pipe.unet).double()
    plan = NullTextInversion().plan(scheduler, 6)
    inverter = NullTextInversion(inner_steps=4, epsilon=0.04, epsilon_growth=0.0)  # losses 0.03–0.16
    x0, cond1 = setup["x0"][:2].double(), setup["cond1"][:2]  # a digit that stops early and one that does not
    cond1 = Conditioning(cond1.text.double(), cond1.null.double(), cond1.guidance)

    def run(rows: list[int], batch_size: int | None = None):
        denoiser = UNetDenoiser(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type)
        ctx = InvertContext(guidance=GUIDANCE, batch_size=batch_size)
        idx = torch.tensor(rows)
        art = inverter.invert(denoiser, x0[idx], plan, cond1[idx], ctx)
        return art, (denoiser.unet_evals, denoiser.unet_backwards)

    batched, (fwd, bwd) = run([0, 1])
    used = batched["inner_steps"]
    assert len({tuple(u) for u in used.tolist()}) > 1 and bool((used < 4).any()) and bool((used == 4).any())
    # one set of UNet calls per inner step: the rows counted are the rows each image needed, no more
    assert bwd == int(used.sum())
    assert fwd == len(x0) * 6 + len(x0) * 6 * 2 + int(used.sum())  # pivot + (conditional, final) + inner
    alone = run([0, 1], batch_size=1)[0]  # march's chunks of one row: each image in its own UNet calls
    assert torch.equal(alone["inner_steps"], used)
    for k in ("trajectory", "null"):
        scale = float(batched[k].abs().max())
        torch.testing.assert_close(alone[k], batched[k], atol=1e-9 * scale, rtol=0)


# -- 3. through the engine: accounting, key, cache ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_items(tiny) -> list[Item]:
    everything = load_dataset(DIGITS, tiny.resolution, "")
    return [everything[0], everything[2]]


STEPS = 4  # on the tiny model
GRID = [f"num_steps={STEPS}", "task=edit", "edit_prompt=[a dog]", "guidance_scale=[1,0,3]", "start_step=[0,3]"]


def test_engine_spends_exactly_the_formula(tiny, tiny_items, tmp_path):
    grid = ["inverter=null_text", "inverter.inner_steps=2", *GRID]
    runner = Runner(make_cfg(tmp_path, *grid, "batch_size=4"), tiny)
    rows, _ = runner.run_group(tiny_items)
    artifacts = {
        (i, g): runner.cache.load(runner.inversion_key(item, g))
        for i, item in enumerate(tiny_items)
        for g in (0.0, 1.0, 3.0)
    }
    # the formula written out again: per image one pivot (then cached, shared by the guidances), per (image,
    # guidance ≠ 1) and step the conditional ε (not at guidance 0), the inner iterations and the final null
    # forward; then every trajectory's sampling
    fwd, bwd = len(tiny_items) * STEPS * per_step(1.0), 0
    for (_, g), art in artifacts.items():
        inner = int(art["inner_steps"].sum())
        assert art["inner_steps"].shape == (STEPS,) and art["null"].shape[0] == STEPS
        assert (inner > 0) == (g != 1)
        if g != 1:
            fwd += STEPS * ((0 if g == 0 else 1) + 1) + inner
            bwd += inner
    assert runner.evals["pivots_computed"] == len(tiny_items)
    assert runner.evals["inversion"] == fwd and runner.evals["inversion_backwards"] == bwd
    sampling = len(tiny_items) * sum((STEPS - k) * per_step(g) for g in (1, 0, 3) for k in (0, 3))
    assert runner.denoiser.unet_evals == fwd + sampling == runner.minimum.forwards
    assert runner.denoiser.unet_backwards == bwd == runner.minimum.backwards
    summary = runner.summary(len(tiny_items))
    assert summary["unet_backwards"] == summary["minimum_unet_backwards"] == bwd
    assert {r["inversion_unet_backwards"] > 0 for r in rows if r["guidance_scale"] != 1} == {True}
    assert {r["inversion_unet_backwards"] for r in rows if r["guidance_scale"] == 1} == {0}
    # the same rows sampled one trajectory per UNet call (edits use the per-step null embeddings too)
    single = Runner(make_cfg(tmp_path, *grid, "batch_size=1"), tiny)
    out = single.sample_grid(tiny_items, artifacts)
    x0 = encode(tiny, tiny_items).repeat_interleave(len(single.points), dim=0)
    alone = (out - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(alone, torch.tensor([r["latent_mse"] for r in rows]), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("inversion_guidance", ["1", "match"])
def test_without_the_cache_the_pivot_is_computed_once_per_image_and_inversion_guidance(
    tiny, tiny_items, inversion_guidance
):
    """cache.enabled=false, sampling guidances {1, 3}: the pivot depends on the image and the inversion guidance
    only, so the group computes it once per image (per image and guidance with ``match``), and the counted
    evaluations, the reported minimum and the formula written out here all agree."""
    grid = [f"num_steps={STEPS}", "guidance_scale=[1,3]", "start_step=[0,3]", "inverter=null_text"]
    overrides = [*grid, "inverter.inner_steps=2", f"inversion.guidance_scale={inversion_guidance}"]
    runner = Runner(make_cfg(None, *overrides), tiny)
    x0 = encode(tiny, tiny_items)
    artifacts, _ = runner.artifacts(tiny_items, x0)
    runner.sample_grid(tiny_items, artifacts)
    inverted_at = [1.0] if inversion_guidance == "1" else [1.0, 3.0]
    assert runner.evals["pivots_computed"] == len(tiny_items) * len(inverted_at)
    pivots = len(tiny_items) * sum(STEPS * per_step(g) for g in inverted_at)
    inner = sum(int(artifacts[i, 3.0]["inner_steps"].sum()) for i in range(len(tiny_items)))
    null_text = len(tiny_items) * STEPS * 2 + inner  # at 3: conditional and final null forward per step, inner
    sampling = len(tiny_items) * sum((STEPS - k) * per_step(g) for g in (1, 3) for k in (0, 3))
    assert runner.denoiser.unet_evals == pivots + null_text + sampling == runner.minimum.forwards
    assert runner.summary(len(tiny_items))["minimum_unet_evals"] == pivots + null_text + sampling
    # the artifact of each sampling guidance holds that one pivot
    for i in range(len(tiny_items)):
        if inversion_guidance == "1":
            assert torch.equal(artifacts[i, 1.0]["trajectory"], artifacts[i, 3.0]["trajectory"])


def test_batched_inversion_through_the_engine_equals_one_image_at_a_time(tiny, tiny_items):
    """batch_size=1 optimises each image in its own UNet calls. In float32 Adam's normalised first step turns
    rounding-level gradients into lr-sized moves of single elements, so the comparison is of the samples, at
    the tolerance test_engine uses for a whole run alone (the float64 test above is the exact one)."""
    grid = [
        f"num_steps={STEPS}",
        "guidance_scale=[3]",
        "task=edit",
        "edit_prompt=[a dog]",
        "inverter=null_text",
        "inverter.inner_steps=2",
    ]
    x0 = encode(tiny, tiny_items)
    runners = [Runner(make_cfg(None, *grid, f"batch_size={n}"), tiny) for n in (4, 1)]
    (both, _), (alone, _) = [r.artifacts(tiny_items, x0) for r in runners]
    for key in both:
        assert torch.equal(alone[key]["inner_steps"], both[key]["inner_steps"])
        pivot = both[key]["trajectory"]
        torch.testing.assert_close(
            alone[key]["trajectory"], pivot, atol=1e-4 * float(pivot.abs().max()), rtol=0
        )
    out_both, out_alone = runners[0].sample_grid(tiny_items, both), runners[0].sample_grid(tiny_items, alone)
    scale = float(out_both.abs().max())
    torch.testing.assert_close(out_alone, out_both, atol=5e-3 * scale, rtol=1e-3)


def test_key_holds_the_sampling_guidance_and_every_knob(tiny, tiny_items, tmp_path):
    item = tiny_items[0]

    def key(*overrides: str, guidance: float = 7.5) -> str:
        return Runner(make_cfg(tmp_path, "inverter=null_text", *overrides), tiny).inversion_key(item, guidance)

    base = key()
    assert key(guidance=3.0) != base and key(guidance=1.0) != base
    for knob in ("inner_steps=5", "lr=0.02", "lr_decay=0.25", "epsilon=1e-4", "epsilon_growth=0"):
        assert key(f"inverter.{knob}") != base, knob
    for sampling_side in (["start_step=[0,3]"], ["batch_size=1"], ["task=edit", "edit_prompt=[a dog]"]):
        assert key(*sampling_side) == base, sampling_side
    assert Runner(make_cfg(tmp_path, "inverter=ddim"), tiny).inversion_key(item) != base
    assert set(NullTextInversion().key()) == {
        "method",
        "inner_steps",
        "lr",
        "lr_decay",
        "epsilon",
        "epsilon_growth",
    }


def test_artifact_round_trips_through_the_cache(tiny, tiny_items, tmp_path):
    grid = [f"num_steps={STEPS}", "guidance_scale=[1,3]"]
    cfg = make_cfg(tmp_path / "cache", "inverter=null_text", "inverter.inner_steps=2", *grid)
    x0 = encode(tiny, tiny_items)
    first = Runner(cfg, tiny)
    art_a, _ = first.artifacts(tiny_items, x0)
    out_a = first.sample_grid(tiny_items, art_a)
    entry = InversionCache(tmp_path / "cache" / "inversions").load(first.inversion_key(tiny_items[0], 3.0))
    assert entry is not None and set(entry) == {"trajectory", "latents", "null", "inner_steps"}
    for k, v in entry.items():
        assert torch.equal(v, art_a[0, 3.0][k]) and v.dtype == art_a[0, 3.0][k].dtype
    second = Runner(cfg, tiny)
    art_b, costs = second.artifacts(tiny_items, x0)
    assert all(cached for _, cached in costs.values())
    assert second.denoiser.unet_evals == 0 and second.denoiser.unet_backwards == 0
    assert torch.equal(second.sample_grid(tiny_items, art_b), out_a)
    # the pivot is shared with inverter=ddim: a ddim run after it inverts nothing
    ddim = Runner(make_cfg(tmp_path / "cache", *grid), tiny)
    _, ddim_costs = ddim.artifacts(tiny_items, x0)
    assert all(cached for _, cached in ddim_costs.values()) and ddim.denoiser.unet_evals == 0


# -- 4. knobs and settings ---------------------------------------------------------------------------------


def test_schedule_is_the_reference_at_fifty_steps():
    inverter = NullTextInversion()
    for i in range(50):
        assert inverter.step_lr(i, 50) == pytest.approx(1e-2 * (1 - i / 100), rel=1e-12)
        assert inverter.threshold(i, 50) == pytest.approx(1e-5 + i * 2e-5, rel=1e-12)
    assert all(inverter.step_lr(i, 500) > 0 for i in range(500))  # stays positive for any N


@pytest.mark.parametrize(
    "knobs",
    [{"inner_steps": -1}, {"inner_steps": 2.5}, {"lr": 0.0}, {"lr_decay": 1.0}, {"epsilon": -1e-5}],
    ids=str,
)
def test_check_rejects_settings_it_cannot_run(knobs):
    with pytest.raises(ValueError, match="inverter=null_text"):
        NullTextInversion(**knobs).check(10, [0], 0.0)
    with pytest.raises(ValueError, match="eta"):
        NullTextInversion().check(10, [0], 0.5)
    NullTextInversion().check(10, [0, 9], 0.0)


def test_config_builds_the_default_inverter():
    from omegaconf import OmegaConf

    from ddim_lab.config.compose import CONF_DIR

    spec = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "inverter" / "null_text.yaml"))
    assert make_inverter(spec) == NullTextInversion()
    assert dataclasses.asdict(NullTextInversion()) == {k: v for k, v in spec.items() if k != "name"}


def test_controlnet_rows_reach_every_branch(tiny):
    """The conditional, the optimised and the final null-branch calls all carry the rows' control images (the
    denoiser refuses a ControlNet call without them)."""
    scheduler = tiny.scheduler()
    denoiser = UNetDenoiser(
        tiny.pipe.unet, scheduler.alphas_cumprod, controlnet=_controlnet(tiny.pipe.unet), controlnet_scale=0.8
    )
    plan = NullTextInversion().plan(scheduler, 3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    control = torch.rand(2, 3, tiny.resolution, tiny.resolution, generator=g)
    inverter = NullTextInversion(inner_steps=2)
    cond = Conditioning(tiny.embed(["a cat"] * 2), tiny.embed([""] * 2), torch.ones(2), {"control": control})
    artifact = inverter.invert(denoiser, x0, plan, cond, InvertContext(guidance=3.0))
    assert denoiser.unet_backwards == int(artifact["inner_steps"].sum()) > 0
    assert denoiser.unet_evals == 2 * 3 + 2 * 3 * 2 + int(artifact["inner_steps"].sum())
