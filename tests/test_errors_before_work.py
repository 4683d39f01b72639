"""Every check that needs no model fails before any weights are read, with one line; what only the loaded model
can tell fails after loading but before any work (nothing written but the claim)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ddim_lab.cli import main as cli
from ddim_lab.errors import ConfigError
from ddim_lab.models import build, controlnet, loading
from tests.conftest import lab_config


class WeightsRead(AssertionError):
    """A model or ControlNet loader ran: the check came too late."""


@pytest.fixture
def no_weights(monkeypatch):
    """Every way the lab reads or builds weights raises WeightsRead."""

    def refuse(*args, **kwargs):
        raise WeightsRead("weights were read before the check")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(controlnet, "load_controlnet", refuse)
    monkeypatch.setattr(build, "build_pipeline", refuse)
    monkeypatch.setattr(build, "build_controlnet", refuse)


# (overrides, words of the one-line message): each check of issue 16 that needs no model
MODEL_FREE = [
    (["model=digits-flow", "editor=p2p"], "editor=p2p controls a UNet's cross-attention; model=digits-flow"),
    (["model=digits-flow", "editor=p2p", "task=edit", "edit_prompt=digit eight"], "use editor=prompt_swap"),
    (["data.path=/nonexistent/digits"], "data.path=/nonexistent/digits does not exist"),
    (["task=controlnet", "control=canny", "controlnet=digits-canny", "data.path=/nope"], "does not exist"),
    (
        ["model=tiny", "control=canny", "controlnet=digits-canny"],
        "controlnet=digits-canny does not fit model=tiny (ControlNet vs the model's UNet: block_out_channels",
    ),
    (
        ["model=tiny", "task=controlnet", "control=canny", "controlnet=digits-canny"],
        "cross_attention_dim 64 vs 32",
    ),
    (["control=canny", "controlnet=tiny"], "controlnet=tiny does not fit model=digits"),
    (["model=digits-flow", "control=canny", "controlnet=digits-canny"], "ControlNets are UNet-only"),
    (["grids=everything"], "grids='everything' must be one of sheet, groups"),
    (["start_step=50"], "start_step=50 must be an integer in [0, num_steps=8)"),
]


@pytest.mark.parametrize(("overrides", "message"), MODEL_FREE)
def test_model_free_checks_fail_before_any_weights_are_read(overrides, message, no_weights, tmp_path):
    cfg = lab_config(*overrides, model="digits", cache=tmp_path / "cache")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        cli.prepare(cfg, run_dir)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not run_dir.exists()  # not even claimed
    assert not (tmp_path / "cache" / "models").exists()  # nothing built


def test_an_empty_data_folder_is_one_line_before_loading(no_weights, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = lab_config(f"data.path='{tmp_path / 'empty'}'", model="digits")
    with pytest.raises(ConfigError, match="holds no image"):
        cli.prepare(cfg, tmp_path / "run")


def test_the_fitting_offline_controlnet_passes_the_checks(no_weights, tmp_path):
    """model=tiny with controlnet=tiny gets through every check; the first thing it does is load weights."""
    cfg = lab_config("control=canny", "controlnet=tiny", "data=photos", model="tiny", cache=tmp_path / "cache")
    with pytest.raises(WeightsRead):
        cli.prepare(cfg, tmp_path / "run")


def test_what_only_the_loaded_model_tells_fails_before_work(monkeypatch, tmp_path):
    """A model=local directory is a flow model only the load can tell: p2p stops there, before the task writes
    anything (no config.yaml, no results)."""
    flow = SimpleNamespace(name="local", family="sd3", controlnet=None, controlnet_revision="")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: flow)
    cfg = lab_config("model=local", "model.path=/some/flow/model", "editor=p2p", model="digits")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"editor=p2p .* model=local is a flow model \(sd3\)"):
        cli.prepare(cfg, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["job.json"]  # the claim only


def test_a_loaded_controlnet_of_another_unet_is_refused(tiny, tmp_path):
    """Hub ControlNets are checked against the loaded UNet (their config may not be on disk before)."""
    cfg = lab_config("control=canny", "controlnet=digits-canny", model="tiny")
    with pytest.raises(ConfigError, match="does not fit model=tiny"):
        controlnet.attach_controlnet(tiny, cfg.controlnet, tmp_path)
    assert tiny.controlnet is None
