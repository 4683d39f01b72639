"""Inversion methods, one module each, behind one contract (``ddim_lab.methods.inversion.base.Inverter``).

``make_inverter(cfg.inverter)`` builds the method a ``conf/inverter/NAME.yaml`` names, with its knobs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from diffusers import DDIMScheduler

from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Inverter

# name → "module:class"; imported on first use
INVERTERS: dict[str, str] = {
    "ddim": "ddim_lab.methods.inversion.ddim:DDIMInversion",
    "course": "ddim_lab.methods.inversion.course:CourseInversion",
    "null_text": "ddim_lab.methods.inversion.null_text:NullTextInversion",
    "negative_prompt": "ddim_lab.methods.inversion.negative_prompt:NegativePromptInversion",
    "edict": "ddim_lab.methods.inversion.edict:EDICTInversion",
    "bdia": "ddim_lab.methods.inversion.bdia:BDIAInversion",
    "fixed_point": "ddim_lab.methods.inversion.fixed_point:FixedPointInversion",
    "renoise": "ddim_lab.methods.inversion.renoise:RenoiseInversion",
    "gnri": "ddim_lab.methods.inversion.gnri:GNRIInversion",
    "edit_friendly": "ddim_lab.methods.inversion.edit_friendly:EditFriendlyInversion",
    "direct": "ddim_lab.methods.inversion.direct:DirectInversion",
    "flow_euler": "ddim_lab.methods.inversion.flow_euler:FlowEulerInversion",
    "rf_solver": "ddim_lab.methods.inversion.rf_solver:RFSolverInversion",
    "fireflow": "ddim_lab.methods.inversion.fireflow:FireFlowInversion",
    "uni_inv": "ddim_lab.methods.inversion.uni_inv:UniInvInversion",
    "rf_inversion": "ddim_lab.methods.inversion.rf_inversion:RFInversion",
    "none": "ddim_lab.methods.inversion.none:NoInversion",  # the clean latent (sdedit, flowedit)
}


def inverter_class(name: str) -> type[Inverter]:
    if name not in INVERTERS:
        raise ValueError(f"unknown inverter {name!r}; choose one of {', '.join(sorted(INVERTERS))}")
    module, cls = INVERTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_inverter(spec: Mapping[str, Any] | str) -> Inverter:
    """The inverter a config names: ``{"name": NAME, **knobs}`` (or just NAME, default knobs)."""
    knobs = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = knobs.pop("name")
    cls = inverter_class(name)
    fields = knob_names(name)
    unknown = sorted(set(knobs) - fields)
    if unknown:
        owners = [n for n in sorted(INVERTERS) if unknown[0] in knob_names(n)]
        raise ValueError(
            f"inverter={name} has no knob {unknown[0]!r} (its knobs: {', '.join(sorted(fields)) or 'none'})"
            + (f"; {unknown[0]} is a knob of inverter={'|'.join(owners)}" if owners else "")
        )
    try:
        return cls(**knobs)
    except TypeError as err:
        raise ValueError(f"inverter={name}: {err}") from err


def knob_names(name: str) -> set[str]:
    """The knobs (dataclass fields) of inverter ``name``."""
    return {f.name for f in dataclasses.fields(inverter_class(name))}  # type: ignore[arg-type]


def make_plan(inverter: str, scheduler: DDIMScheduler, num_steps: int) -> Plan:
    """The plan of inverter ``inverter`` for ``num_steps`` sampling steps."""
    return make_inverter(inverter).plan(scheduler, num_steps)
