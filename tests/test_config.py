"""Every config composes; invalid values fail with one clear line before any model loads."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from ddim_lab.config import ConfigError, compose_config, validate
from tests.conftest import CONF

GROUPS = ("model", "scheduler", "inverter", "data", "logger")


def _compose(overrides: list[str]):
    return compose_config(overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)] + ["+experiment=quickstart"]
)
def test_every_config_file_composes(override):
    cfg = _compose([override])
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    group = override.split("=")[0].lstrip("+")
    if group in GROUPS:
        assert container[group]["name" if group != "data" else "path"] is not None
    if not override.startswith(("model=local", "data=folder")):
        validate(cfg)


def test_defaults_are_the_offline_digits_setup():
    cfg = _compose([])
    assert (cfg.model.source, cfg.data.path.endswith("digits-heldout"), cfg.logger.name) == (
        "digits",
        True,
        "local",
    )
    assert cfg.task == "reconstruct" and cfg.inversion.guidance_scale == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["start_step=50"], "start_step=50 must be an integer in [0, num_steps=50)"),
        (["start_step=[0,-1]"], "start_step=-1"),
        (["guidance_scale=-2"], "guidance_scale=-2"),
        (["inversion.guidance_scale=-0.5"], "inversion.guidance_scale=-0.5"),
        (["num_steps=0"], "num_steps=0"),
        (["task=edit"], "edit_prompt"),
        (["task=painting"], "task='painting'"),
        (["inverter=course", "start_step=48"], "course inverter"),
        (["eta=-1"], "eta=-1"),
        (["task=sample", "guidance_scale=[1,2]"], "one guidance_scale"),
    ],
)
def test_invalid_values_raise_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(_compose(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_group_option_is_rejected_by_hydra():
    with pytest.raises(MissingConfigException, match="model/sd99"):
        _compose(["model=sd99"])


def test_sweepable_keys_are_top_level():
    cfg = _compose(
        [
            "num_steps=20",
            "guidance_scale=[1,7.5]",
            "inversion.guidance_scale=0",
            "start_step=[0,5]",
            "prompt=x",
            "edit_prompt=y",
            "seed=3",
        ]
    )
    assert (cfg.num_steps, list(cfg.guidance_scale), cfg.inversion.guidance_scale) == (20, [1, 7.5], 0)
    assert (list(cfg.start_step), cfg.prompt, cfg.edit_prompt, cfg.seed) == ([0, 5], "x", "y", 3)
