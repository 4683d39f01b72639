"""``sdedit`` and ``inverter=none`` (issue 17): exact answers where SDEdit has one, its cost formula against the
evaluations the engine counts, and the bad inputs that stop before any model loads.

Reference parity with diffusers' image-to-image pipelines: ``tests/test_reference_parity_sdedit.py``.
"""

from __future__ import annotations

import pytest
import torch

from ddim_lab.cli import main as cli
from ddim_lab.data.folders import load_dataset
from ddim_lab.engine.ddim import sample
from ddim_lab.engine.flow import flow_alpha, flow_plan, to_flow
from ddim_lab.errors import ConfigError
from ddim_lab.methods.editing import make_editor
from ddim_lab.methods.editing.sdedit import noised
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import SampleRows
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS, lab_config
from tests.denoisers import ToyFlowDenoiser, toy_cond
from tests.test_errors_before_work import no_weights  # noqa: F401  (fixture)

N = 5


def sdedit_rows(x0: torch.Tensor, cond, starts: list[int], seed: int = 7) -> SampleRows:
    gens = [torch.Generator().manual_seed(seed + b) for b in range(len(x0))]
    edit = torch.zeros(len(x0), dtype=torch.bool)
    return SampleRows({"x0": x0}, cond, cond, torch.tensor(starts), edit, gens)


def test_sdedit_from_sigma_one_is_plain_sampling_from_its_noise():
    """At σ = 1 (ᾱ = 0) the noised latent is the noise itself: SDEdit from step 0 is text-to-image sampling."""
    den, plan = ToyFlowDenoiser(), flow_plan(torch.linspace(1, 0, N + 1))
    x0 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = toy_cond(2, 3.0)
    ours = make_editor("sdedit").sample(make_inverter("none"), den, plan, sdedit_rows(x0, cond, [0, 0]), None)
    noise = torch.stack(
        [
            torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(7 + b), dtype=x0.dtype)
            for b in range(2)
        ]
    )
    assert torch.equal(ours, sample(den, noise, plan, cond))


def test_sdedit_noises_to_the_flow_marginal_and_to_ddpm_s():
    """Step 2 on the engine's latents is x_σ = (1−σ)x₀ + σε in flow coordinates, √ᾱ x₀ + √(1−ᾱ) ε in DDIM's."""
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
    )
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    flow = to_flow(noised(x0, flow_alpha(sigma), eps), sigma)
    assert torch.allclose(flow, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps, atol=1e-12)
    alpha = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    ddpm = noised(x0, alpha, eps)
    assert torch.equal(ddpm[0], eps[0]) and torch.equal(ddpm[2], x0[2])


@pytest.fixture(scope="module")
def flow_model(cache_dir):
    from ddim_lab.models.loading import load_model
    from tests.conftest import model_spec

    return load_model(model_spec("digits-flow"), {"device": "cpu"}, cache_dir)


def run(model, *overrides: str, images: int = 2, inverter: str = "none") -> tuple[list[dict], Runner]:
    cfg = lab_config(
        "task=edit", f"inverter={inverter}", "editor=sdedit", *overrides, model="digits-flow", steps=4
    )
    runner = Runner(cfg, model)
    rows, _ = runner.run_group(load_dataset(DIGITS, model.resolution, "")[:images])
    return rows, runner


@pytest.mark.parametrize("name", ["none"])  # the cost formula of inverter=none (tests/test_method_coverage.py)
def test_sdedit_spends_its_formula_and_replicates_over_a_seed_list(flow_model, name):
    grid = ("edit_prompt=[null,a handwritten digit eight]", "guidance_scale=[1,3]", "start_step=[1,2]")
    rows, runner = run(flow_model, *grid, "seed=[0,1,2]", inverter=name)
    assert len(rows) == 2 * 2 * 2 * 2 * 3 and sorted({r["seed"] for r in rows}) == [0, 1, 2]
    expected = sum((4 - r["start_step"]) * (1 if r["guidance_scale"] == 1 else 2) for r in rows)
    assert runner.evals["sampling"] == runner.minimum.forwards == sum(r["unet_evals"] for r in rows) == expected
    assert runner.evals["inversion"] == 0 and all(r["inversion_unet_evals"] == 0 for r in rows)
    assert len({r["sample_seed"] for r in rows}) == len(rows)  # every trajectory its own noise
    by_seed = {}
    for r in rows:  # replicates of one (image, point) differ; the run is reproducible
        by_seed.setdefault((r["image"], r["edit_prompt"], r["guidance_scale"], r["start_step"]), []).append(
            r["psnr"]
        )
    assert all(len(set(v)) == 3 for v in by_seed.values())
    again, _ = run(flow_model, *grid, "seed=[0,1,2]")
    assert [r["psnr"] for r in again] == [r["psnr"] for r in rows]


EDIT = ("inverter=edit_friendly", "task=edit", "edit_prompt=a handwritten digit eight", "guidance_scale=3")


def test_a_stochastic_inverter_replicates_its_artifact_per_seed(digits):
    """edit_friendly under seed=[3,4]: one artifact per image and seed, each the one seed=s alone gives."""
    items = load_dataset(DIGITS, digits.resolution, "")[:1]
    listed = Runner(lab_config(*EDIT, "seed=[3,4]", model="digits", steps=4), digits)
    rows, _ = listed.run_group(items)
    assert [r["seed"] for r in rows] == [3, 4] and listed.evals["inversions_computed"] == 2
    for r in rows:
        alone = Runner(lab_config(*EDIT, f"seed={r['seed']}", model="digits", steps=4), digits)
        assert listed.inversion_key(items[0], seed=r["seed"]) == alone.inversion_key(items[0])
        (one,), _ = alone.run_group(items)
        assert one["seed"] == r["seed"] and one["psnr"] == pytest.approx(r["psnr"], abs=1e-3)  # batched vs not
    assert rows[0]["psnr"] != pytest.approx(rows[1]["psnr"], abs=1e-3)  # the seeds' noise maps differ


BAD = [
    (
        ["task=edit", "edit_prompt=x", "seed=[0,1]"],
        "seed=[0, 1] changes nothing: inverter=ddim with editor=prompt_swap",
    ),
    (
        ["editor=sdedit", "task=edit", "edit_prompt=x"],
        "editor=sdedit starts from the clean image and inverts nothing: use inverter=none",
    ),
    (["inverter=none", "task=edit", "edit_prompt=x"], "inverter=none inverts nothing, and editor=prompt_swap"),
    (["task=sample", "seed=[0,1]"], "seed lists replicate reconstruct and edit runs; task=sample takes one"),
    (["seed=[1,1]", "inverter=edit_friendly"], "repeats a seed"),
    (
        ["model=digits-flow", "editor=flowedit", "task=edit", "edit_prompt=x"],
        "editor=flowedit starts from the clean image and inverts nothing: use inverter=none, not inverter=ddim",
    ),
    (
        ["editor=flowedit", "inverter=none", "task=edit", "edit_prompt=x"],
        "editor=flowedit runs on flow models only",
    ),
    (
        ["model=digits-flow", "editor=flowedit", "inverter=none", "editor.n_avg=0"],
        "n_avg=0 must be an integer >= 1",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_inputs_are_one_line_before_any_model_loads(overrides, message, no_weights, tmp_path):  # noqa: F811
    cfg = lab_config(*overrides, model="digits", cache=tmp_path / "cache")
    with pytest.raises(ConfigError) as err:
        cli.prepare(cfg, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
