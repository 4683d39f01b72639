"""Control signals for ControlNet, one module each, behind one interface (``ddim_lab.methods.control.base``).

``make_control(cfg.control)`` builds the signal a ``conf/control/NAME.yaml`` names (``None`` for ``none``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddim_lab.methods.control.base import ControlSignal, ControlUnavailable

__all__ = ["CONTROLS", "ControlSignal", "ControlUnavailable", "control_settings", "make_control"]

# name → "module:class"; imported on first use (OpenCV / controlnet_aux only when asked for)
CONTROLS: dict[str, str] = {
    "canny": "ddim_lab.methods.control.canny:Canny",
    "openpose": "ddim_lab.methods.control.openpose:OpenPose",
    "image": "ddim_lab.methods.control.image:ImageControl",
}


def make_control(spec: Mapping[str, Any] | str | None) -> ControlSignal | None:
    """The signal a config names: ``{"name": NAME, **knobs}`` or NAME; ``none``/empty → None."""
    knobs = {"name": spec} if isinstance(spec, str) or spec is None else dict(spec)
    name = knobs.pop("name", None) or "none"
    if name == "none":
        return None
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; choose one of none, {', '.join(sorted(CONTROLS))}")
    module, cls = CONTROLS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**knobs)
    except TypeError as err:
        raise ValueError(f"control={name}: {err}") from err


def control_settings(cfg: DictConfig) -> dict[str, Any]:
    """The control columns of a result row: signal, its knobs, ControlNet name, scale, guidance start/end."""
    control = OmegaConf.to_container(cfg.control, resolve=True) if cfg.get("control") else {}
    controlnet = cfg.get("controlnet") or {}
    return {
        "control": control.get("name", "none"),
        "control_knobs": json.dumps({k: v for k, v in control.items() if k != "name"}, sort_keys=True),
        "controlnet": controlnet.get("name", "none"),
        "controlnet_scale": float(controlnet.get("scale", 1.0)),
        "control_guidance_start": float(controlnet.get("guidance_start", 0.0)),
        "control_guidance_end": float(controlnet.get("guidance_end", 1.0)),
    }
