"""The exactly invertible inverters, EDICT and BDIA: invert-then-sample gives back the clean latent.

- with the latent-dependent, nonlinear ``ToyDenoiser`` in float64, to 1e-5 (measured ~1e-12) at guidance 1
  and 7.5 from start steps 0 and a middle one, where plain DDIM misses by far more than 1e-2;
- rows batched with different start steps and guidances equal each row sampled alone;
- through the engine on the ``tiny`` model: the counters equal the cost formulas, artifacts round-trip
  through the cache, the knobs (and only they) change the key;
- on the trained digits model in float32: reconstruction within 0.05 dB of the VAE round trip at guidance 1
  and 7.5 (inverting at the sampling guidance).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from ddim_lab.data.folders import Item, load_dataset
from ddim_lab.engine.schedule import exact_plan
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, Inverter, SampleRows
from ddim_lab.study.cache import InversionCache
from ddim_lab.study.runner import Runner
from tests.conftest import lab_config
from tests.denoisers import ToyDenoiser, sd_scheduler, toy_cond

DIGITS = Path(__file__).resolve().parents[1] / "ddim_lab" / "assets" / "digits-heldout"
EXACT = ["edict", "bdia"]
STEPS = 10  # toy-denoiser plan
TINY_STEPS = 6


def make_cfg(cache: Path | None, *overrides: str, model: str = "tiny", steps: int = TINY_STEPS) -> DictConfig:
    return lab_config(*overrides, model=model, steps=steps, cache=cache)


def items_for(model, n: int) -> list[Item]:
    """n held-out digits of different classes at the model's resolution."""
    return load_dataset(DIGITS, model.resolution, "")[: 2 * n : 2]


def per_step(guidance: float) -> int:
    """UNet rows of one guided prediction, written out again so the test does not trust the engine."""
    return 1 if guidance in (0, 1) else 2


def toy_latents(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def round_trip(inverter: Inverter, guidance: float, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert two random float64 latents with the toy denoiser at ``guidance``; sample them back from
    ``start`` with the same prompt and guidance. Returns (result, clean latents)."""
    denoiser, x0, plan, cond = (
        ToyDenoiser(),
        toy_latents(),
        exact_plan(sd_scheduler(), STEPS),
        toy_cond(2, guidance),
    )
    artifact = inverter.invert(denoiser, x0, plan, cond, InvertContext())
    rows = SampleRows(artifact, cond, cond, torch.full((2,), start), torch.zeros(2, dtype=torch.bool))
    return inverter.sample(denoiser, plan, rows), x0


# -- exactness with a nonlinear, latent-dependent denoiser ------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("start", [0, STEPS // 2])
def test_exact_inverters_round_trip_where_ddim_does_not(guidance, start):
    ddim_out, x0 = round_trip(make_inverter("ddim"), guidance, start)
    assert (ddim_out - x0).abs().max() > 1e-2  # measured 0.35 … 38: the toy denoiser is far from linear
    for name in EXACT:
        out, _ = round_trip(make_inverter(name), guidance, start)
        err = float((out - x0).abs().max())
        assert err < 1e-5, f"{name} at guidance {guidance} from step {start}: {err}"  # measured ≤ 1e-12


def test_artifacts_hold_the_pairs_at_every_level():
    N, x0, plan = STEPS, toy_latents(), exact_plan(sd_scheduler(), STEPS)
    edict = make_inverter("edict").invert(ToyDenoiser(), x0, plan, toy_cond(2, 3.0), InvertContext())
    assert set(edict) == {"x", "y"} and edict["x"].shape == edict["y"].shape == (2, N + 1, 4, 8, 8)
    assert torch.equal(edict["x"][:, 0], x0) and torch.equal(edict["y"][:, 0], x0)  # both start clean …
    assert (edict["x"][:, N] - edict["y"][:, N]).abs().max() > 1e-3  # … and part on the way up
    bdia = make_inverter("bdia").invert(ToyDenoiser(), x0, plan, toy_cond(2, 3.0), InvertContext())
    assert set(bdia) == {"trajectory", "top_partner"}
    assert bdia["trajectory"].shape == (2, N + 1, 4, 8, 8) and bdia["top_partner"].shape == (2, 4, 8, 8)
    assert torch.equal(bdia["trajectory"][:, 0], x0)


@pytest.mark.parametrize("name", EXACT)
def test_edits_and_knobs_change_the_result(name):
    """A different sampling prompt moves the result; so does each knob (same exactness, other path)."""
    denoiser = ToyDenoiser()
    x0 = toy_latents(1)
    plan = exact_plan(sd_scheduler(), STEPS)
    source, target = toy_cond(1, 3.0, seed=1), toy_cond(1, 3.0, seed=2)
    inverter = make_inverter(name)
    artifact = inverter.invert(denoiser, x0, plan, source, InvertContext())
    for k in (0, STEPS // 2):  # start step 0 is a real step: the target prompt acts there too
        rows = SampleRows(artifact, target, source, torch.tensor([k]), torch.ones(1, dtype=torch.bool))
        assert (inverter.sample(denoiser, plan, rows) - x0).abs().max() > 1e-3
    knob = {"edict": {"name": "edict", "p": 0.8}, "bdia": {"name": "bdia", "gamma": 0.7}}[name]
    other = make_inverter(knob).invert(denoiser, x0, plan, source, InvertContext())
    assert all((other[k] - artifact[k]).abs().max() > 1e-3 for k in artifact)
    if name == "edict":
        plain = make_inverter({"name": "edict", "leapfrog": False})
        art = plain.invert(denoiser, x0, plan, source, InvertContext())
        assert (art["x"] - artifact["x"]).abs().max() > 1e-3
        rows = SampleRows(art, source, source, torch.tensor([0]), torch.zeros(1, dtype=torch.bool))
        assert (plain.sample(denoiser, plan, rows) - x0).abs().max() < 1e-5


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "edict", "p": 0.0},
        {"name": "edict", "p": 1.5},
        {"name": "edict", "leapfrog": "yes"},
        {"name": "bdia", "gamma": 0.0},
        {"name": "bdia", "gamma": 1.2},
    ],
)
def test_unusable_knobs_are_rejected(spec):
    with pytest.raises(ValueError, match=spec["name"]):
        make_inverter(spec).check(10, [0], 0.0)


def test_eta_is_rejected():
    for name in EXACT:
        with pytest.raises(ValueError, match="eta"):
            make_inverter(name).check(10, [0], 0.5)


# -- batched rows = each row alone ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT)
def test_batched_rows_with_different_starts_equal_each_row_alone(name):
    inverter = make_inverter(name)
    denoiser = ToyDenoiser()
    x0 = toy_latents()
    plan = exact_plan(sd_scheduler(), STEPS)
    source = toy_cond(2, 2.0)
    artifact = inverter.invert(denoiser, x0, plan, source, InvertContext(batch_size=1))
    whole = inverter.invert(denoiser, x0, plan, source, InvertContext())
    for k in artifact:
        torch.testing.assert_close(artifact[k], whole[k], atol=1e-12, rtol=0)
    # five trajectories: image, start step, guidance and prompt all vary
    image = torch.tensor([0, 1, 0, 1, 0])
    start = torch.tensor([0, 3, 7, 0, 9])
    guidance = torch.tensor([2.0, 2.0, 1.0, 7.5, 0.0], dtype=torch.float64)
    target = toy_cond(5, 1.0, seed=5)
    cond = toy_cond(2, 1.0)[image]
    cond.guidance = guidance
    edit = torch.tensor([False, False, True, True, False])
    cond.text[edit] = target.text[edit]
    source_rows = source[image]
    source_rows.guidance = guidance
    rows = SampleRows({k: v[image] for k, v in artifact.items()}, cond, source_rows, start, edit)
    batched = inverter.sample(denoiser, plan, rows, batch_size=3)
    for b in range(5):
        one = torch.tensor([b])
        alone = SampleRows(
            {k: v[one] for k, v in rows.artifact.items()}, cond[one], source_rows[one], start[one], edit[one]
        )
        torch.testing.assert_close(
            batched[b], inverter.sample(denoiser, plan, alone, batch_size=1)[0], atol=1e-12, rtol=0
        )
    # rows 0 and 1 reconstruct (source prompt, inversion guidance): exact
    torch.testing.assert_close(batched[:2], x0[image[:2]], atol=1e-9, rtol=0)
    assert (batched[2:] - x0[image[2:]]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the others do not


# -- through the engine on the tiny model -----------------------------------------------------------------

GRID = [
    "task=edit",
    "edit_prompt=[null,a photograph of a cat]",
    "guidance_scale=[0,3]",
    "start_step=[0,4]",
]


@pytest.mark.parametrize(("name", "inversion_guidance"), [("edict", 3), ("bdia", 1)])
def test_engine_spends_exactly_the_formula(tiny, name, inversion_guidance):
    cfg = make_cfg(
        None, f"inverter={name}", f"inversion.guidance_scale={inversion_guidance}", *GRID, "batch_size=4"
    )
    runner = Runner(cfg, tiny)
    items = items_for(tiny, 2)
    rows, _ = runner.run_group(items)
    N, calls = TINY_STEPS, {"edict": 2, "bdia": 1}[name]
    inversion_steps = {"edict": N, "bdia": N + 1}[name]  # BDIA also computes the top latent's partner
    expected_inversion = len(items) * inversion_steps * calls * per_step(inversion_guidance)
    expected_sampling = len(items) * 2 * sum((N - k) * calls * per_step(g) for g in (0, 3) for k in (0, 4))
    assert runner.evals["inversion"] == expected_inversion
    assert runner.evals["sampling"] == expected_sampling
    assert runner.denoiser.unet_evals == runner.minimum.forwards == expected_inversion + expected_sampling
    assert runner.summary(len(items))["minimum_unet_evals"] == runner.denoiser.unet_evals
    assert sum(r["unet_evals"] for r in rows) == expected_sampling
    assert len(rows) == len(items) * 8


@pytest.mark.parametrize("name", EXACT)
def test_engine_batches_equal_batch_size_one_and_reconstruct(digits, name):
    """On the digits model: the random-weight tiny UNet amplifies float32 round-off (which differs with the
    batch composition) to ~1e-3 over a coupled round trip; the trained model does not."""
    overrides = [f"inverter={name}", "inversion.guidance_scale=3", *GRID]
    batched = Runner(make_cfg(None, *overrides, "batch_size=5", model="digits", steps=TINY_STEPS), digits)
    items = items_for(digits, 2)
    x0 = digits.encode(torch.stack([it.image for it in items]))
    artifacts, _ = batched.artifacts(items, x0)
    out = batched.sample_grid(items, artifacts)  # (2 × 8, C, h, w), image-major
    alone = Runner(make_cfg(None, *overrides, "batch_size=1", model="digits", steps=TINY_STEPS), digits)
    one = alone.sample_grid(items, artifacts)
    scale = float(out.abs().max())
    torch.testing.assert_close(out, one, atol=1e-5 * scale, rtol=1e-5)
    P = len(batched.points)
    for i in range(len(items)):
        for j, p in enumerate(batched.points):
            if p.target is None and p.guidance == 3:  # the inversion's prompt and guidance: exact
                torch.testing.assert_close(out[i * P + j], x0[i], atol=1e-4, rtol=0)
            else:  # the rows really differ, so a mix-up would not pass unnoticed
                assert (out[i * P + j] - x0[i]).abs().max() > 1e-2 * scale
    assert batched.denoiser.unet_evals == batched.minimum.forwards


@pytest.mark.parametrize("name", EXACT)
def test_artifacts_round_trip_through_the_cache(tiny, tmp_path, name):
    cfg = make_cfg(tmp_path / "cache", f"inverter={name}", "inversion.guidance_scale=3", "guidance_scale=3")
    items = items_for(tiny, 2)
    x0 = tiny.encode(torch.stack([it.image for it in items]))
    first = Runner(cfg, tiny)
    art_a, costs_a = first.artifacts(items, x0)
    assert [costs_a[i, None][1] for i in range(2)] == [False, False]
    second = Runner(cfg, tiny)
    art_b, costs_b = second.artifacts(items, x0)
    assert [costs_b[i, None][1] for i in range(2)] == [True, True] and second.denoiser.unet_evals == 0
    for i in range(2):
        assert set(art_a[i, None]) == set(art_b[i, None])
        for k in art_a[i, None]:
            assert torch.equal(art_a[i, None][k], art_b[i, None][k])
    stored = InversionCache(tmp_path / "cache" / "inversions").load(first.inversion_key(items[0]))
    assert stored is not None and set(stored) == set(art_a[0, None])
    torch.testing.assert_close(second.sample_grid(items, art_b), x0, atol=1e-2, rtol=0)  # float32, see above


KNOBS = {"edict": ["inverter.p=0.9", "inverter.leapfrog=false"], "bdia": ["inverter.gamma=1"]}


@pytest.mark.parametrize("name", EXACT)
def test_knobs_change_the_key_sampling_settings_do_not(tiny, tmp_path, name):
    item = items_for(tiny, 1)[0]

    def key(*overrides: str) -> str:
        return Runner(make_cfg(tmp_path, f"inverter={name}", *overrides), tiny).inversion_key(item)

    base = key()
    for knob in KNOBS[name]:
        assert key(knob) != base, knob
    assert key("guidance_scale=[1,7.5]", "start_step=[0,3]") == base
    assert key("task=edit", "edit_prompt=a cat", "batch_size=1") == base
    assert key("inversion.guidance_scale=3") != base
    assert Runner(make_cfg(tmp_path), tiny).inversion_key(item) != base  # not DDIM's entry


# -- the trained digits model, float32 --------------------------------------------------------------------


@pytest.mark.parametrize(("guidance", "steps"), [(1.0, 10), (7.5, 20)])
@pytest.mark.parametrize("name", EXACT)
def test_digits_reconstruction_reaches_the_vae_ceiling(digits, name, guidance, steps):
    cfg = make_cfg(
        None,
        f"inverter={name}",
        f"guidance_scale={guidance}",
        f"inversion.guidance_scale={guidance}",
        model="digits",
        steps=steps,
    )
    runner = Runner(cfg, digits)
    rows, _ = runner.run_group(items_for(digits, 3))
    gaps = [r["vae_psnr"] - r["psnr"] for r in rows]
    assert max(abs(g) for g in gaps) < 0.05, gaps  # the target; measured ≤ 0.0004 dB
    assert max(r["latent_mse"] for r in rows) < 1e-8  # float32 round-off only (measured ≤ 3e-10)
    assert runner.denoiser.unet_evals == runner.minimum.forwards
