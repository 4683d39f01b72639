"""Composing the lab's config: its folder, Hydra's compose API, the resolvers ``conf/`` uses, the options of a
config group, and small readers of composed values shared by the checks (``validate``, ``budget``)."""

from __future__ import annotations

import functools
import os
import textwrap
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ddim_lab.config.schema import register_configs

FLOW_FAMILIES = ("sd3", "flux")  # model families without a UNet (``model.family``)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's conf/ (install with pip -e)
HELP_INDENT = 16  # the column where `--help` lists a group's options


def register_resolvers() -> None:
    """``${asset:NAME}`` → the path of ``ddim_lab/assets/NAME`` in the installed package; also stores the
    schema (both are needed before Hydra composes)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver(
            "asset", lambda name: str(resources.files("ddim_lab") / "assets" / name)
        )
    if not OmegaConf.has_resolver("unless_budget"):  # num_steps' default: ${unless_budget:50}
        OmegaConf.register_new_resolver("unless_budget", lambda steps: steps)
    if not OmegaConf.has_resolver("options"):  # `--help` lists each group's options: ${options:inverter}
        OmegaConf.register_new_resolver("options", help_options)
    register_configs()


def group_options(group: str, kind: str = "") -> list[str]:
    """The options of config group ``group`` (its YAML files in :func:`config_dir`), sorted; ``kind``:
    ``unet`` or ``flow`` keeps the models of that kind (by their ``family:`` key)."""
    options = {p.stem: p for p in (config_dir() / group).glob("*.yaml")}
    if kind:
        flow = {name for name, p in options.items() if OmegaConf.load(p).get("family") in FLOW_FAMILIES}
        options = {name: p for name, p in options.items() if (name in flow) == (kind == "flow")}
    return sorted(options)


@functools.cache
def help_options(group: str, kind: str = "") -> str:
    """``group_options`` as `--help` shows them: the default marked, wrapped under the first line's column.
    Cached: Hydra resolves the help text on every compose, and the config files do not change in a process."""
    defaults = {}
    for entry in OmegaConf.load(config_dir() / "config.yaml").get("defaults", []):
        if isinstance(entry, DictConfig):
            defaults.update({str(k): str(v) for k, v in entry.items()})
    names = [f"{o} (default)" if defaults.get(group) == o else o for o in group_options(group, kind)]
    indent = " " * HELP_INDENT
    lines = textwrap.wrap(", ".join(names), 110 - HELP_INDENT, break_on_hyphens=False)
    return ("\n" + indent).join(lines)


def config_dir() -> Path:
    """The config folder: ``ddim_lab/conf`` inside an installed wheel, else the checkout's ``conf/``."""
    packaged = Path(str(resources.files("ddim_lab"))) / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return CONF_DIR


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The lab's config as the CLI composes it, via Hydra's compose API (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def as_list(value: Any) -> list:
    """A scalar or a list-valued config entry as a list (``None`` → ``[]``)."""
    if value is None:
        return []
    if isinstance(value, ListConfig | Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def config_family(model: DictConfig) -> str | None:
    """The model's family from its config: ``family:`` (or a built model's ``arch.family``); ``sd`` for the
    other shipped, built and hub models; None when only the model directory can tell (``model=local``)."""
    family = model.get("family") or (model.get("arch") or {}).get("family")
    if family:
        return str(family)
    return None if model.get("source") == "local" else "sd"


def known_family(model: DictConfig) -> str | None:
    """``config_family``, else (``model=local``) the family its directory's model_index.json names; None
    when that cannot be read (the loaded model tells)."""
    family = config_family(model)
    if family is not None:
        return family
    from ddim_lab.models.errors import ModelUnavailable
    from ddim_lab.models.families import model_family
    from ddim_lab.models.sources import model_dir

    spec = OmegaConf.to_container(model, resolve=True)
    try:
        return model_family(spec, model_dir(spec, ""))
    except (ModelUnavailable, ValueError):
        return None


def job_environment() -> dict[str, str]:
    """The environment a job sees (kept for provenance of launcher-set variables)."""
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    return {k: os.environ[k] for k in keys if k in os.environ}
