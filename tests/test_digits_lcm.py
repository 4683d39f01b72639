"""The shipped few-step digits model (digits-lcm): an SD-format ε model that samples digits in 4 DDIM steps
with trailing spacing, and its distillation script (latent consistency distillation of digits-ldm).

No skips: the model is part of the package, so a missing model is a failure.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from omegaconf import OmegaConf

from ddim_lab.config.compose import compose_config
from ddim_lab.config.validate import validate
from ddim_lab.data import digits
from ddim_lab.data.judge import train_judge
from ddim_lab.engine.ddim import sample
from ddim_lab.methods.inversion import make_plan
from ddim_lab.models.loading import load_model
from ddim_lab.models.sources import shipped_model_dir
from tests.conftest import ROOT
from tests.test_cli import as_main, run_here

MAX_BYTES = 10 * 1000**2  # the bound: 10 MB on disk
SCRIPTS = ROOT / "scripts"


def recipe():
    """conf/train/digits_lcm.yaml, the distillation recipe."""
    return OmegaConf.load(ROOT / "conf" / "train" / "digits_lcm.yaml")


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    spec = {"name": "digits-lcm", "source": "digits-lcm", "resolution": 16}
    return load_model(spec, {"device": "cpu"}, tmp_path_factory.mktemp("cache"))


@pytest.fixture
def script(monkeypatch):
    """scripts/train_digits_lcm.py as a module (its directory on sys.path, as `python scripts/...` has it)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("train_digits_lcm")


def test_digits_lcm_is_a_small_sd_model_sharing_the_teachers_vae_and_text_encoder(lcm):
    pipe = lcm.pipe
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    root = shipped_model_dir("digits-lcm")
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) <= MAX_BYTES
    teacher = StableDiffusionPipeline.from_pretrained(shipped_model_dir("digits-ldm"), safety_checker=None)
    for part in ("vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert lcm.scaling_factor == teacher.vae.config.scaling_factor


def test_model_config_chooses_trailing_spacing_4_steps_and_guidance_1():
    cfg = compose_config(["model=digits-lcm"])
    assert cfg.model.source == "digits-lcm" and cfg.scheduler.name == "ddim-trailing"
    assert cfg.guidance_scale == 1.0 and cfg.num_steps == 4


@pytest.mark.parametrize(("task", "arm"), [("edit", "fixed_point-anderson"), ("reconstruct", "gnri")])
def test_few_step_study_arms_compose_and_validate_on_digits_lcm(task, arm):
    """+experiment=few_step: an inverter arm (conf/few_step_arm/) with a task arm validates on digits-lcm at
    trailing spacing; the Anderson arm is fixed_point with acceleration=anderson."""
    arms = sorted(p.stem for p in (ROOT / "conf" / "few_step_arm").glob("*.yaml"))
    assert arms == ["ddim", "edit_friendly", "fixed_point", "fixed_point-anderson", "gnri", "renoise"]
    cfg = compose_config(["+experiment=few_step", f"+few_step_task={task}", f"+few_step_arm={arm}"])
    validate(cfg)
    assert (cfg.model.name, cfg.scheduler.name, cfg.task, cfg.num_steps) == (
        "digits-lcm",
        "ddim-trailing",
        task,
        4,
    )
    assert cfg.inverter.name == arm.split("-")[0]
    assert cfg.inverter.get("acceleration", "none") == ("anderson" if arm.endswith("anderson") else "none")
    assert cfg.data.path.endswith("digits-pie" if task == "edit" else "digits-heldout")


def test_four_step_samples_are_judged_correct(lcm):
    labels = np.arange(20) % 10
    x = torch.randn((len(labels), *lcm.latent_shape), generator=torch.Generator().manual_seed(0))
    plan = make_plan("ddim", lcm.scheduler(), 4)
    assert plan.timesteps.tolist() == [999, 749, 499, 249]
    cond = lcm.conditioning([digits.caption(int(k), 1) for k in labels], [1.0] * len(labels))
    images = lcm.decode(sample(lcm.denoiser(), x, plan, cond))
    assert train_judge().accuracy(images, labels) >= 0.8  # the model card: 4 steps, 200 samples


def test_ddim_with_the_students_eps_is_its_consistency_function(lcm, script):
    """At the lab's timesteps c_skip ≈ 0: f(x, t) is the DDIM x̂₀ of the student's ε (so DDIM sampling is LCM's
    multistep sampling without fresh noise); at t = 0 the boundary condition f(x, 0) = x holds."""
    lc = recipe().lcd
    alphas = lcm.pipe.scheduler.alphas_cumprod
    x = torch.randn(4, *lcm.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = lcm.embed([digits.caption(k) for k in range(4)])
    t = torch.tensor([999, 749, 499, 249])
    a = alphas[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        f = script.consistency(lcm.pipe.unet, x, t, cond, a, lc)
        eps = lcm.pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(f, (x - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-4)
    c_skip, c_out = script.boundary_scalings(torch.tensor([0, 24]), lc.sigma_data, lc.timestep_scaling)
    assert c_skip.flatten().tolist()[0] == 1.0 and c_out.flatten().tolist()[0] == 0.0
    assert c_skip.flatten().tolist()[1] < 1e-5


def test_the_solver_step_is_diffusers_ddim_step_on_the_skipping_grid(script):
    """DDIMSolver's t_n → t_n − k equals DDIMScheduler.step at T/k trailing steps (ᾱ₀ below the grid)."""
    reference = DDIMScheduler.from_pretrained(shipped_model_dir("digits-ldm") / "scheduler")
    reference = DDIMScheduler.from_config(reference.config, timestep_spacing="trailing")
    solver = script.DDIMSolver(reference.alphas_cumprod, 25)
    reference.set_timesteps(len(solver.timesteps))
    assert sorted(reference.timesteps.tolist()) == solver.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 20, 39):
        x, eps = torch.randn(2, 1, 4, 8, 8, generator=gen)
        t = int(solver.timesteps[n])
        want = reference.step(eps, t, x).prev_sample
        a = solver.alpha[n]
        got = solver.step((x - (1 - a).sqrt() * eps) / a.sqrt(), eps, torch.tensor([n]))
        assert torch.allclose(got, want, atol=1e-5)


def test_distillation_script_smoke_run_produces_a_loadable_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # its sibling import, as `python scripts/...` has it
    out = tmp_path / "model"
    args = [
        "train.steps=2",
        "train.warmup=1",
        "train.batch_size=4",
        "log_every=1",
        "threads=1",
        f"out_dir={out}",
        f"state_path={tmp_path / 'state.pt'}",
        f"teacher_dir={shipped_model_dir('digits-ldm')}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    path = SCRIPTS / "train_digits_lcm.py"
    proc = run_here(as_main(path), [str(path), *args], tmp_path, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stderr
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps_done"] == 2 and stats["train_images"] == 1437
    spec = {"name": "smoke", "source": "local", "path": str(out), "resolution": 16}
    model = load_model(spec, {"device": "cpu"}, tmp_path / "cache")
    assert model.pipe.scheduler.config.timestep_spacing == "trailing"
    assert model.pipe.unet.dtype == torch.float32  # saved in fp16, loaded at the runtime's dtype
    # the shared loop resumes from its checkpoint (train_digits_flow.resume / run_steps)
    again = run_here(as_main(path), [str(path), *args, "resume=true", "train.steps=3"], tmp_path, {})
    assert again.returncode == 0 and "resumed at step 2" in again.stderr, again.stderr[-3000:]
    assert json.loads((out / "train_stats.json").read_text())["steps_done"] == 3
