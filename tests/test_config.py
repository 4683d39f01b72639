"""Every config composes; invalid values fail with one clear line before any model loads."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from ddim_lab.cli.main import precheck
from ddim_lab.config.compose import compose_config, config_dir
from ddim_lab.config.schema import LabConfig
from ddim_lab.config.validate import check_device, validate
from ddim_lab.errors import ConfigError
from tests.conftest import CONF

GROUPS = ("model", "scheduler", "inverter", "data", "logger")
PARTNERS = {"inverter=none": ["editor=sdedit"]}  # options that run only beside another option


def _compose(overrides: list[str]):
    return compose_config(overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)] + ["+experiment=quickstart"]
)
def test_every_config_file_composes(override):
    cfg = _compose([override, *PARTNERS.get(override, [])])
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    group = override.split("=")[0].lstrip("+")
    if group in GROUPS:
        assert container[group]["name" if group != "data" else "path"] is not None
    if not override.startswith(("model=local", "data=folder", "data=pie", "+experiment=inverters")):
        validate(cfg)


@pytest.mark.parametrize("arm", _options("edit_arm"))
def test_every_flow_editing_arm_composes_validates_and_wins_over_the_preset(arm):
    """The flow-editing study's arms (conf/edit_arm/): each an editor and its inverter; an arm's own values
    (uni_edit's guidance 1 and start step 6) win over the preset's."""
    cfg = _compose(["+experiment=flow_editing", f"edit_arm={arm}"])
    validate(cfg)
    assert cfg.editor.name == arm.split("-")[0] and cfg.model.name == "digits-flow"
    if cfg.editor.name == "uni_edit":
        assert (cfg.guidance_scale, cfg.start_step, cfg.inverter.name) == (1.0, 6, "uni_inv")
    else:
        assert cfg.guidance_scale == 3.0


def test_defaults_are_the_offline_digits_setup():
    cfg = _compose([])
    assert (cfg.model.source, cfg.data.path.endswith("digits-heldout"), cfg.logger.name) == (
        "digits",
        True,
        "local",
    )
    assert cfg.task == "reconstruct" and cfg.inversion.guidance_scale == 1.0
    edit = _compose(["task=edit"])  # the digits data's own target: every digit into an eight
    validate(edit)
    assert edit.edit_prompt == "a handwritten digit eight"
    assert _compose(["task=edit", "data=digits-pie"]).edit_prompt is None  # PIE items carry their targets


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["start_step=50"], "start_step=50 must be an integer in [0, num_steps=50)"),
        (["start_step=[0,-1]"], "start_step=-1"),
        (["guidance_scale=-2"], "guidance_scale=-2"),
        (["inversion.guidance_scale=-0.5"], "inversion.guidance_scale=-0.5"),
        (["num_steps=0"], "num_steps=0"),
        (["task=edit", "data=photos"], "edit_prompt"),  # the digits data default to an eight; photos do not
        (["task=painting"], "task='painting'"),
        (["inverter=course", "start_step=48"], "inverter=course keeps N-2 latents"),
        (["inverter=course", "num_steps=2"], "num_steps=2 must be at least 3"),
        (["data=folder"], "data.path is required"),
        (["model=local"], "model.path is required"),
        (["metrics.lpips_net=resnet"], "metrics.lpips_net='resnet'"),
        (["eta=-1"], "eta=-1"),
        (["task=sample", "guidance_scale=[1,2]"], "one guidance_scale"),
        (["seed=x"], "seed=['x'] must be an integer >= 0 or a list of them"),  # a seed or a list of them
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


def test_the_schema_types_every_key():
    assert OmegaConf.get_type(_compose([])) is LabConfig
    cfg = _compose(["eta=0.5", "num_steps=7"])
    assert isinstance(cfg.eta, float) and cfg.num_steps == 7


@pytest.mark.parametrize("override", ["num_step=10", "eta=abc", "runtime.dtyp=fp16"])
def test_misspelled_keys_and_wrong_types_fail_while_composing(override):
    with pytest.raises(Exception) as err:  # Hydra's ConfigCompositionException
        _compose([override])
    assert (
        override.lstrip("+").split("=")[0] in str(err.value) or "abc" in str(err.value) or "x" in str(err.value)
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["num_step=10"], ["num_step", "misspelled"]),
        (["eta=abc"], ["eta=abc", "Float"]),
        (["model=sd51"], ["model=sd51", "digits", "sd15", "tiny"]),
        (["-m", "num_steps=3,4", "eta=0,abc"], ["eta=abc"]),  # every sweep value is composed once
        (["hydra/launcher=nope"], ["hydra/launcher=nope", "submitit_local", "joblib", "slurm"]),
    ],
)
def test_precheck_gives_one_line(argv, words):
    line = precheck(argv)
    assert line is not None and "\n" not in line
    for word in words:
        assert word in line


@pytest.mark.parametrize(
    "argv", [[], ["-m", "num_steps=3,4", "inverter=ddim,course"], ["--help"], ["hydra/launcher=submitit_local"]]
)
def test_precheck_accepts_valid_commands(argv):
    assert precheck(argv) is None


def test_missing_device_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available") as err:
        validate(_compose(["runtime.device=cuda"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not a device"):
        check_device("gpu7")
    check_device("cpu")


def test_checkout_uses_the_top_level_conf():
    assert config_dir() == CONF


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        slurm = compose(
            "config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
        joblib = compose("config", ["hydra/launcher=joblib"], return_hydra_config=True)
        local = compose("config", ["hydra/launcher=submitit_local"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
    assert launcher.timeout_min > 0 and launcher.array_parallelism > 0
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    assert slurm.hydra.callbacks.ddim_lab._target_ == "ddim_lab.study.sweep.SweepCallback"
