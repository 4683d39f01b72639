"""Config helpers: the ``${asset:...}`` resolver and validation that runs before any model loads."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

TASKS = ("reconstruct", "edit", "sample", "alpha_plot")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the checkout's conf/ (install with pip -e)


class ConfigError(ValueError):
    """A config value is invalid; the message is one line that names the key."""


def register_resolvers() -> None:
    """``${asset:NAME}`` → the path of ``ddim_lab/assets/NAME`` in the installed package."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver(
            "asset", lambda name: str(resources.files("ddim_lab") / "assets" / name)
        )


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The lab's config as the CLI composes it, via Hydra's compose API (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def as_list(value: Any) -> list:
    """A scalar or a list-valued config entry as a list (``None`` → ``[]``)."""
    if value is None:
        return []
    if isinstance(value, ListConfig | Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one clear line) for values that cannot run."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {', '.join(TASKS)}")
    n = cfg.num_steps
    if not isinstance(n, int) or n < 1 or n > 1000:
        raise ConfigError(f"num_steps={n!r} must be an integer in [1, 1000]")
    for key, values in (
        ("guidance_scale", as_list(cfg.guidance_scale)),
        ("inversion.guidance_scale", [cfg.inversion.guidance_scale]),
    ):
        for g in values:
            if not isinstance(g, int | float) or isinstance(g, bool) or g < 0:
                raise ConfigError(f"{key}={g!r} must be a number >= 0")
    starts = as_list(cfg.start_step)
    if not starts:
        raise ConfigError("start_step is empty")
    for k in starts:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < n:
            raise ConfigError(f"start_step={k!r} must be an integer in [0, num_steps={n})")
        if cfg.inverter.name == "course" and k > n - 3:
            raise ConfigError(
                f"start_step={k!r}: the course inverter keeps N-2 latents, so start_step <= {n - 3}"
            )
    if cfg.eta < 0:
        raise ConfigError(f"eta={cfg.eta!r} must be >= 0")
    if cfg.task == "sample" and len(as_list(cfg.guidance_scale)) != 1:
        raise ConfigError("task=sample takes one guidance_scale; sweep several with -m guidance_scale=a,b")
    if cfg.task == "edit" and not as_list(cfg.edit_prompt):
        raise ConfigError("task=edit needs edit_prompt=... (a string or a list)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} must be >= 1")
    if cfg.metrics.lpips not in ("auto", "required", "off"):
        raise ConfigError(f"metrics.lpips={cfg.metrics.lpips!r} must be auto, required or off")
    if cfg.runtime.dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"runtime.dtype={cfg.runtime.dtype!r} must be fp32, fp16 or bf16")
