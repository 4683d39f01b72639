"""Inverters: each is a function ``(scheduler, num_steps) -> Plan`` (see ``ddim_lab.schedule``)."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import DDIMScheduler

from ddim_lab.inversion import course, ddim
from ddim_lab.schedule import Plan

INVERTERS: dict[str, Callable[[DDIMScheduler, int], Plan]] = {"ddim": ddim.plan, "course": course.plan}


def make_plan(inverter: str, scheduler: DDIMScheduler, num_steps: int) -> Plan:
    """The plan of inverter ``inverter`` for ``num_steps`` sampling steps."""
    if inverter not in INVERTERS:
        raise ValueError(f"unknown inverter {inverter!r}; choose one of {sorted(INVERTERS)}")
    return INVERTERS[inverter](scheduler, num_steps)
