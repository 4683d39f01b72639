"""The inverter contract across methods, and the schedule fixes every method builds on.

- one scheduler feeds the plan and the denoiser, whatever ``scheduler.overrides`` says;
- zero-terminal-SNR schedules are finite (v-prediction, parity with diffusers) or rejected (ε-prediction);
- v-prediction is converted at the network's own timestep, the convention exact for a latent-independent ε;
- negative-prompt and Direct inversion beat DDIM at guidance 7.5 on the digits model;
- ``inversion.guidance_scale=match`` inverts at every sampling guidance of the grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from omegaconf import DictConfig

from ddim_lab.data.folders import Item, load_dataset
from ddim_lab.engine.ddim import invert, sample
from ddim_lab.engine.denoiser import Conditioning, UNetDenoiser
from ddim_lab.methods.inversion import INVERTERS, inverter_class, make_plan
from ddim_lab.methods.inversion.flow_euler import FlowEulerInversion
from ddim_lab.study.runner import Runner
from tests.conftest import lab_config
from tests.denoisers import sd_scheduler

DIGITS = Path(__file__).resolve().parents[1] / "ddim_lab" / "assets" / "digits-heldout"


def make_cfg(*overrides: str, model: str = "tiny", steps: int = 8) -> DictConfig:
    return lab_config(*overrides, model=model, steps=steps)


def items_for(model, n: int) -> list[Item]:
    """n held-out digits of different classes at the model's resolution."""
    return load_dataset(DIGITS, model.resolution, "")[: 2 * n : 2]


# -- one scheduler for plan and denoiser ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "check"),
    [
        (
            "+scheduler.overrides.prediction_type=v_prediction",
            lambda r: r.denoiser.prediction_type == "v_prediction",
        ),
        (
            "+scheduler.overrides.beta_schedule=linear",
            lambda r: (
                not torch.allclose(r.denoiser.alphas_cumprod, r.model.pipe.scheduler.alphas_cumprod.double())
            ),
        ),
    ],
)
def test_plan_and_denoiser_read_the_same_scheduler(tiny, override, check):
    runner = Runner(make_cfg(override), tiny)
    assert check(runner)  # the override reached the denoiser, not just the plan
    torch.testing.assert_close(runner.denoiser.alphas_cumprod, runner.scheduler.alphas_cumprod.double())
    assert runner.denoiser.prediction_type == runner.scheduler.config.prediction_type
    ac = runner.scheduler.alphas_cumprod.double()
    torch.testing.assert_close(runner.plan.alpha, ac[runner.plan.timesteps])
    assert Runner(make_cfg(), tiny).inversion_key(items_for(tiny, 1)[0]) != runner.inversion_key(
        items_for(tiny, 1)[0]
    )


# -- zero terminal SNR ----------------------------------------------------------------------------------

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def test_zero_terminal_snr_sampling_is_finite_and_matches_diffusers(tiny_v, monkeypatch):
    pipe = tiny_v.pipe
    scheduler = tiny_v.scheduler(**ZERO_SNR)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    monkeypatch.setattr(
        pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config, **ZERO_SNR)
    )  # the model is shared: restored after the test
    unet = pipe.unet.config
    x = torch.randn(
        1, unet.in_channels, unet.sample_size, unet.sample_size, generator=torch.Generator().manual_seed(0)
    )
    ref = pipe(
        "a cat", latents=x.clone(), num_inference_steps=10, guidance_scale=2.0, output_type="latent"
    ).images
    cond = Conditioning(tiny_v.embed(["a cat"]), tiny_v.embed([""]), torch.tensor([2.0]))
    plan = make_plan("ddim", scheduler, 10)
    assert float(plan.alpha[0]) == 0.0  # the first step starts from pure noise
    ours = sample(tiny_v.denoiser(scheduler), x, plan, cond)
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    # inversion reaches ᾱ = 0 and comes back finite too
    traj = invert(tiny_v.denoiser(scheduler), ours, plan, cond)
    assert torch.isfinite(traj).all()
    assert torch.isfinite(sample(tiny_v.denoiser(scheduler), traj[-1], plan, cond)).all()


def test_zero_terminal_snr_with_epsilon_prediction_is_rejected(tiny):
    with pytest.raises(ValueError, match="zero terminal SNR"):
        Runner(make_cfg("+scheduler.overrides.rescale_betas_zero_snr=true", "scheduler=ddim-trailing"), tiny)


# -- the v-prediction convention ----------------------------------------------------------------------


class LatentIndependentV(torch.nn.Module):
    """A v-predicting "UNet" whose ε is a fixed table ε(t), expressed at its own timestep:
    v = √ᾱ_t ε − √(1−ᾱ_t) x̂₀ with x̂₀ = (x − √(1−ᾱ_t) ε)/√ᾱ_t."""

    def __init__(self, alphas_cumprod: torch.Tensor, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.ac = alphas_cumprod.double()
        self.table = torch.randn(
            len(self.ac), *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        self.dtype = torch.float64

    def forward(self, x, t, encoder_hidden_states=None, **_):
        t = torch.as_tensor(t).expand(len(x))
        a = self.ac[t].view(-1, 1, 1, 1)
        eps = self.table[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_v_prediction_is_converted_at_the_networks_timestep_which_is_exact():
    scheduler = sd_scheduler(prediction_type="v_prediction")
    net = LatentIndependentV(scheduler.alphas_cumprod, (4, 8, 8))
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = Conditioning(torch.zeros(2, 1, 1), None, torch.ones(2))
    plan = make_plan("ddim", scheduler, 20)
    den = UNetDenoiser(net, scheduler.alphas_cumprod, "v_prediction")
    traj = invert(den, x0, plan, cond)
    torch.testing.assert_close(sample(den, traj[-1], plan, cond), x0, atol=1e-6, rtol=0)

    # diffusers' DDIMInverseScheduler converts v at the cleaner latent's ᾱ: not exact for the same network
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(20)
    z = x0.clone()
    for t in inverse.timesteps:
        z = inverse.step(net(z, t).sample, t, z).prev_sample
    forward = DDIMScheduler.from_config(scheduler.config)
    forward.set_timesteps(20)
    back = z.clone()
    for t in forward.timesteps:
        back = forward.step(net(back, t).sample, t, back).prev_sample
    assert (back - x0).abs().max() > 1e-2
    assert (z - traj[-1]).abs().max() > 1e-2  # the two conventions really differ


# -- negative-prompt and Direct inversion on the digits model ------------------------------------------


def _recon_psnr(digits, inverter: str, guidance: float = 7.5) -> float:
    cfg = make_cfg(f"inverter={inverter}", f"guidance_scale={guidance}", model="digits", steps=20)
    rows, _ = Runner(cfg, digits).run_group(items_for(digits, 3))
    return sum(r["psnr"] for r in rows) / len(rows)


@pytest.mark.parametrize("method", ["negative_prompt", "direct"])
def test_reconstruction_at_high_guidance_beats_ddim(digits, method):
    ddim = _recon_psnr(digits, "ddim")
    assert _recon_psnr(digits, method) > ddim + 1.0


def test_direct_reconstruction_is_the_input_and_edits_equal_ddim(digits):
    cfg = make_cfg(
        "inverter=direct",
        "task=edit",
        "edit_prompt=[null,a handwritten digit eight]",
        "guidance_scale=7.5",
        "start_step=[0,5]",
        model="digits",
        steps=10,
    )
    runner = Runner(cfg, digits)
    items = items_for(digits, 2)
    x0 = digits.encode(torch.stack([it.image for it in items]))
    artifacts, _ = runner.artifacts(items, x0)
    out = runner.sample_grid(
        items, artifacts
    )  # (2 × 4, C, h, w): [recon k0, recon k5, edit k0, edit k5] per image
    P = len(runner.points)
    for i in range(len(items)):
        for j, p in enumerate(runner.points):
            if p.target is None:
                torch.testing.assert_close(out[i * P + j], x0[i], atol=1e-4, rtol=0)
    ddim = Runner(make_cfg(*[a for a in cfg_overrides(cfg)], "inverter=ddim", model="digits", steps=10), digits)
    ref = ddim.sample_grid(items, artifacts)
    edits = [i * P + j for i in range(len(items)) for j, p in enumerate(runner.points) if p.target is not None]
    torch.testing.assert_close(out[edits], ref[edits], atol=1e-5, rtol=0)
    assert runner.denoiser.unet_evals == runner.minimum.forwards


def cfg_overrides(cfg: DictConfig) -> list[str]:
    return [
        "task=edit",
        "edit_prompt=[null,a handwritten digit eight]",
        f"guidance_scale={cfg.guidance_scale}",
        "start_step=[0,5]",
    ]


def test_negative_prompt_reconstruction_costs_one_row_per_step(tiny):
    cfg = make_cfg(
        "inverter=negative_prompt",
        "task=edit",
        "edit_prompt=[null,a dog]",
        "guidance_scale=[1,3]",
        "start_step=[0,3]",
    )
    runner = Runner(cfg, tiny)
    items = items_for(tiny, 2)
    rows, _ = runner.run_group(items)
    recon = sum((8 - k) for k in (0, 3)) * 2  # both guidances, one row per step
    edit = sum((8 - k) * e for k in (0, 3) for e in (1, 2))
    assert runner.evals["sampling"] == len(items) * (recon + edit)
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    assert runner.inversion_key(items[0]) == Runner(make_cfg(), tiny).inversion_key(items[0])  # shares ddim's


# -- inversion guidance "match" -------------------------------------------------------------------------


def test_match_inverts_at_each_sampling_guidance(tiny):
    items = items_for(tiny, 2)
    runner = Runner(make_cfg("inversion.guidance_scale=match", "guidance_scale=[1,3]"), tiny)
    rows, _ = runner.run_group(items)
    assert {(r["guidance_scale"], r["inversion_guidance_scale"]) for r in rows} == {(1.0, 1.0), (3.0, 3.0)}
    assert runner.evals["inversion"] == len(items) * 8 * (1 + 2)
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    fixed = Runner(make_cfg("inversion.guidance_scale=3"), tiny)
    assert runner.inversion_key(items[0], 3.0) == fixed.inversion_key(items[0])  # the same artifact
    x0 = tiny.encode(torch.stack([it.image for it in items]))
    art, _ = runner.artifacts(items, x0)
    ref, _ = fixed.artifacts(items, x0)
    torch.testing.assert_close(art[0, 3.0]["trajectory"], ref[0, None]["trajectory"])


def test_every_registered_inverter_exists():
    for name in INVERTERS:
        cls = inverter_class(name)
        assert cls.name == name
        assert (Path(__file__).resolve().parents[1] / "conf" / "inverter" / f"{name}.yaml").exists()


# -- every method through the engine: accounting, batching, the cache ---------------------------------

ALL = sorted(n for n in INVERTERS if not issubclass(inverter_class(n), FlowEulerInversion) and n != "none")
# UNet methods; the flow solvers need a flow model's scheduler (tests/test_flow_inverters.py), and `none`
# samples only through the editors that start from the clean latent (tests/test_sdedit.py)
GRID = ["task=edit", "edit_prompt=[null,a handwritten digit eight]", "guidance_scale=[1,3]", "start_step=[0,3]"]
# the trained digits model: on random weights (tiny), float32 round-off that differs with the batch size is
# amplified by EDICT and BDIA (two chained predictions a step, a latent from two steps back) beyond 1e-4


@pytest.mark.parametrize("name", ALL)
def test_engine_spends_each_methods_formula_and_batches_exactly(digits, name):
    items = items_for(digits, 2)
    runner = Runner(dcfg(f"inverter={name}", *GRID, "batch_size=5", "inversion.guidance_scale=match"), digits)
    rows, _ = runner.run_group(items)
    assert len(rows) == len(items) * len(runner.points)
    assert runner.denoiser.unet_evals == runner.minimum.forwards > 0
    assert runner.denoiser.unet_backwards == runner.minimum.backwards
    summary = runner.summary(len(items))
    assert summary["unet_evals"] == summary["minimum_unet_evals"] and summary["formula"]
    # the same grid one trajectory per UNet call gives the same latents
    x0 = digits.encode(torch.stack([it.image for it in items]))
    alone = Runner(dcfg(f"inverter={name}", *GRID, "batch_size=1", "inversion.guidance_scale=match"), digits)
    artifacts, _ = alone.artifacts(items, x0)
    together = Runner(
        dcfg(f"inverter={name}", *GRID, "batch_size=16", "inversion.guidance_scale=match"), digits
    )
    a = together.sample_grid(items, artifacts)
    b = alone.sample_grid(items, artifacts)
    torch.testing.assert_close(a, b, atol=1e-4 * float(a.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_artifacts_round_trip_through_the_cache(digits, tmp_path, name):
    items = items_for(digits, 2)
    cfg = dcfg(f"inverter={name}", *GRID, "cache.enabled=true", f"cache.dir='{tmp_path}'")
    first = Runner(cfg, digits)
    rows_a, _ = first.run_group(items)
    second = Runner(cfg, digits)
    rows_b, _ = second.run_group(items)
    assert not any(r["inversion_cached"] for r in rows_a)
    assert all(r["inversion_cached"] for r in rows_b) and second.evals["inversion"] == 0
    assert second.evals["inversion_backwards"] == 0
    assert [r["latent_mse"] for r in rows_a] == [r["latent_mse"] for r in rows_b]


@pytest.mark.parametrize("name", [*ALL, "none"])  # none: no knob, no seed (its editors draw the noise)
def test_the_key_holds_the_knobs_and_no_sampling_setting(digits, name):
    item = items_for(digits, 1)[0]
    base = Runner(dcfg(f"inverter={name}"), digits)
    key = base.inversion_key(item, 3.0)
    for sampling in (["start_step=[0,2]"], ["batch_size=3"], ["task=edit", "edit_prompt=a dog"]):
        assert Runner(dcfg(f"inverter={name}", *sampling), digits).inversion_key(item, 3.0) == key
    seeded = Runner(dcfg(f"inverter={name}", "seed=7"), digits).inversion_key(item, 3.0)
    assert (seeded != key) == base.inverter.stochastic
    other_guidance = base.inversion_key(item, 5.0)
    assert (other_guidance != key) == base.inverter.guidance_dependent
    for knob, value in base.inverter.key().items():
        if knob == "method" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        other = value + 1 if isinstance(value, int) else value * 0.5
        changed = Runner(dcfg(f"inverter={name}", f"inverter.{knob}={other}"), digits)
        assert changed.inversion_key(item, 3.0) != key, knob


def dcfg(*overrides: str) -> DictConfig:
    return make_cfg(*overrides, model="digits")


def test_the_readme_example_method_runs_through_the_engine(digits, monkeypatch):
    import re
    import sys
    import types

    from omegaconf import open_dict

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### The inverter contract: adding a method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_inverter")
    monkeypatch.setitem(sys.modules, "readme_inverter", module)  # dataclasses look their module up
    exec(compile(code, "README.md", "exec"), module.__dict__)
    monkeypatch.setitem(INVERTERS, "halfway", "readme_inverter:HalfwayInversion")
    cfg = dcfg("guidance_scale=[1,3]", "start_step=[0,3]")
    with open_dict(cfg):
        cfg.inverter = {"name": "halfway", "blend": 0.2}
    runner = Runner(cfg, digits)
    rows, _ = runner.run_group(items_for(digits, 2))
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    assert runner.inverter.key() == {"method": "halfway"}  # blend only changes sampling
    assert all(r["psnr"] > 20 for r in rows)


def test_every_method_runs_from_the_command_line_and_the_report_puts_them_side_by_side(tmp_path):
    """The issue's "done when": ``ddim-lab -m inverter=...`` on the digits model, then ``ddim-lab-report``."""
    from tests.test_cli import ddim_lab_here

    data = tmp_path / "data"
    data.mkdir()
    for name in ("digit3_0.png", "digit7_0.png"):
        (data / name).write_bytes((DIGITS / name).read_bytes())
    sweep = tmp_path / "sweep"
    done = ddim_lab_here(
        [
            "-m",
            f"inverter={','.join(ALL)}",
            "num_steps=4",
            "guidance_scale=[1,3]",
            "inversion.guidance_scale=match",
            f"data.path={data}",
            "prompt=a handwritten digit",
            "metrics.lpips=off",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = ddim_lab_here([str(sweep)], tmp_path, module="ddim_lab.report.main")
    assert report.returncode == 0, report.stderr[-3000:]
    table = (sweep / "report.md").read_text()
    for name in ALL:
        assert f"| {name} |" in table
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/run.json")]
    assert sorted(r["inverter"] for r in runs) == ALL
    assert all(r["unet_evals"] == r["minimum_unet_evals"] for r in runs)
