"""Budget-matched runs: ``budget.nfe=K`` gives each method the largest step count it can afford.

What a budget bounds. A result row is one output image: one image sampled at one grid point (guidance, start
step, target). Its evaluations ``nfe`` are what producing it costs by its method's own formulas, cached or not:

    nfe = inversion_cost(artifact it samples from)     (with the DDIM pivot, for a method that starts from one)
        + trajectory_cost(its sampling trajectory)     (the editor's: prompt-to-prompt's edits add the source)

in forward model evaluations (a guided step's two rows count two; the backward passes only null-text spends
are in ``inversion_unet_backwards``, not here). With a budget K a job runs at the largest N for which every
row of its grid costs at most K. A grid of several points is held to its dearest one (guidance ≠ 0, 1 costs two
evaluations a step; start step 0 samples every step; an edit under prompt-to-prompt pays its source branch),
so rows at cheaper points spend less, as their ``nfe`` says: sweep such settings across jobs
(``-m guidance_scale=1,7.5``) for rows matched at each. One inversion shared by several grid points is counted
in each of their rows: a row's cost does not depend on which other rows its job happens to hold.

A data-dependent cost takes its worst case: null-text's Adam loop counts ``inner_steps`` iterations at every
step (its early stop only ever spends less; the row's ``nfe`` counts what its artifact used).

The choice needs no weights. The cost formulas read only the lengths of a plan (N sampling steps, M inversion
steps), which depend on the method and on whether the model is a flow model, not on the schedule's values; so
the plan comes from a stand-in scheduler of the model's kind, before any model loads. When the model has
loaded, :func:`chosen_steps` is run again on its own scheduler and guidance mode, and a disagreement stops the
run (a model config whose ``family`` or ``guidance`` does not say what the weights are).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ddim_lab.config.compose import FLOW_FAMILIES, as_list, known_family
from ddim_lab.errors import ConfigError

if TYPE_CHECKING:  # torch and diffusers load when a cost is computed, not when the CLI checks its input
    from ddim_lab.engine.schedule import Plan
    from ddim_lab.methods.editing.base import Editor
    from ddim_lab.methods.inversion.base import Artifact, Cost, Inverter

MAX_STEPS = 1000  # validate's bound on num_steps
BUDGET_TASKS = ("reconstruct", "edit")


@dataclass(frozen=True)
class RowPoint:
    """What a row's cost depends on besides the plan: its grid point, and whether it is an edit."""

    guidance: float  # sampling guidance (the guidance a guidance-dependent artifact serves)
    inversion_guidance: float  # the guidance its artifact was inverted at
    start: int  # sampling start step k
    edit: bool


def uses_pivot(inverter: Inverter) -> bool:
    """Whether the method inverts from a DDIM pivot the engine computes for it (``InvertContext.pivot``):
    null-text, whose ``inversion_cost`` leaves the pivot to whoever computes it."""
    from ddim_lab.methods.inversion.null_text import NullTextInversion

    return isinstance(inverter, NullTextInversion)


def worst_case_artifact(inverter: Inverter, plan: Plan) -> Artifact:
    """The artifact fields a cost formula reads, at their dearest: null-text's ``inner_steps`` (N,) all at the
    knob's maximum (early stopping only saves)."""
    import torch

    if uses_pivot(inverter):
        return {"inner_steps": torch.full((plan.num_steps,), int(inverter.inner_steps), dtype=torch.long)}
    return {}


def row_cost(
    inverter: Inverter,
    editor: Editor,
    plan: Plan,
    artifact: Artifact,
    point: RowPoint,
    cost_guidance: Callable[[float], float] = float,
) -> Cost:
    """One row's evaluations by formula: its artifact's inversion (with the pivot it starts from) plus its
    trajectory. ``cost_guidance``: the guidance the formulas see (a model with embedded guidance spends one
    pass per row at any scale: ``Runner.cost_guidance``)."""
    from ddim_lab.methods.inversion.ddim import DDIMInversion

    inverting = cost_guidance(point.inversion_guidance)
    cost = inverter.inversion_cost(plan, artifact, point.guidance, inverting)
    if uses_pivot(inverter):
        cost += DDIMInversion().inversion_cost(plan, {}, 1.0, inverting)
    return cost + editor.charged(inverter, plan, point.start, point.guidance, point.edit, cost_guidance)


def grid_rows(cfg: DictConfig) -> list[RowPoint]:
    """The dearest row of each grid point of a reconstruct/edit job: every guidance × start step, as an edit
    when the task edits (a target equal to its source prompt is a cheaper reconstruction)."""
    match = cfg.inversion.guidance_scale == "match"
    return [
        RowPoint(
            float(g), float(g) if match else float(cfg.inversion.guidance_scale), int(k), cfg.task == "edit"
        )
        for g, k in itertools.product(as_list(cfg.guidance_scale), as_list(cfg.start_step))
    ]


def image_cost(
    inverter: Inverter,
    editor: Editor,
    plan: Plan,
    rows: list[RowPoint],
    cost_guidance: Callable[[float], float] = float,
) -> int:
    """The budget's measure of one plan: the evaluations of the dearest row, at the worst-case artifact."""
    artifact = worst_case_artifact(inverter, plan)
    return max(row_cost(inverter, editor, plan, artifact, r, cost_guidance).forwards for r in rows)


def chosen_steps(
    budget: int,
    inverter: Inverter,
    editor: Editor,
    plan_of: Callable[[int], Plan],
    rows: list[RowPoint],
    eta: float = 0.0,
    cost_guidance: Callable[[float], float] = float,
) -> int:
    """The largest N ≤ 1000 the method runs at (its own ``check``) whose dearest row costs at most ``budget``.

    Every cost formula grows with N, so the walk stops at the first N over the budget. Raises ConfigError when
    even the method's fewest steps cost more (naming the smallest budget it can meet), and the method's own
    check error when no N can run these settings.
    """
    starts = sorted({r.start for r in rows})
    refusal: ValueError | None = None
    best = None
    for n in range(1, MAX_STEPS + 1):
        try:
            inverter.check(n, starts, eta)
        except ValueError as err:
            refusal = err
            continue
        cost = image_cost(inverter, editor, plan_of(n), rows, cost_guidance)
        if cost > budget:
            if best is None:
                raise ConfigError(
                    f"budget.nfe={budget} is below what inverter={inverter.name} spends at its fewest steps"
                    f" (num_steps={n}: {cost} evaluations per image); the smallest budget it can meet is {cost}"
                )
            return best
        best = n
    if best is None:
        raise ConfigError(str(refusal).replace("\n", " "))
    return best


# -- before any model loads: the config alone -----------------------------------------------------------------
def is_flow_model(model: DictConfig) -> bool:
    """Whether ``cfg.model`` is a flow model, without loading it (``ddim_lab.config.compose.known_family``)."""
    return known_family(model) in FLOW_FAMILIES


def embedded_guidance(spec: Mapping[str, Any]) -> bool:
    """Whether the model takes guidance as an input (FLUX.1-dev: one pass per row at any scale), as the
    config says: ``model.guidance``, else a built transformer's ``guidance_embeds``."""
    arch = (spec.get("arch") or {}).get("transformer") or {}
    guidance = spec.get("guidance") or ("embedded" if arch.get("guidance_embeds") else "cfg")
    return guidance == "embedded"


def stand_in_plans(
    inverter: Inverter, flow: bool, overrides: Mapping[str, Any] | None = None
) -> Callable[[int], Plan]:
    """N → the method's plan on a default scheduler of the model's kind with the config's scheduler
    ``overrides`` (spacing decides which timesteps a plan holds; renoise's cost counts them): no weights."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    kwargs = dict(overrides or {})  # as constructor arguments: from_config would reset defaulted keys
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler(**kwargs)
    else:
        scheduler = DDIMScheduler(**{"clip_sample": False, **kwargs})

    def plan_of(n: int) -> Plan:
        try:
            return inverter.plan(scheduler, n)
        except ValueError as err:
            raise ConfigError(str(err).replace("\n", " ")) from err

    return plan_of


def explicit_num_steps(cfg: DictConfig) -> bool:
    """Whether ``num_steps`` was set (command line, sweep or preset): conf/config.yaml's default is the
    interpolation ``${unless_budget:50}``, which any setting replaces."""
    raw = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["num_steps"]), resolve=False)["num_steps"]
    return not (isinstance(raw, str) and raw.replace(" ", "").startswith("${unless_budget:"))


def check_budget_input(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for a budget that cannot be combined with the rest of the config."""
    budget = OmegaConf.select(cfg, "budget.nfe")
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget.nfe={budget!r} must be an integer >= 1 (model evaluations per image)")
    if cfg.task not in BUDGET_TASKS:
        raise ConfigError(f"budget.nfe applies to task=reconstruct and task=edit, not task={cfg.task}")
    if explicit_num_steps(cfg):
        raise ConfigError(
            f"budget.nfe={budget} picks num_steps for each method; drop num_steps={cfg.num_steps}"
            " (or drop the budget)"
        )


def budget_steps(cfg: DictConfig) -> int:
    """The step count ``budget.nfe`` gives this job's method, from the config alone (no model)."""
    from ddim_lab.methods.editing import make_editor
    from ddim_lab.methods.inversion import make_inverter

    check_budget_input(cfg)
    try:
        inverter = make_inverter(OmegaConf.to_container(cfg.inverter, resolve=True))
        editor = make_editor(OmegaConf.to_container(cfg.editor, resolve=True) if "editor" in cfg else None)
    except (ValueError, KeyError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from err
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    seen = (lambda g: 1.0) if embedded_guidance(spec) else float
    overrides = OmegaConf.to_container(cfg.scheduler.overrides, resolve=True) if "scheduler" in cfg else {}
    plan_of = stand_in_plans(inverter, is_flow_model(cfg.model), overrides)
    return chosen_steps(int(cfg.budget.nfe), inverter, editor, plan_of, grid_rows(cfg), float(cfg.eta), seen)


def apply_budget(cfg: DictConfig) -> None:
    """With ``budget.nfe`` set, write the step count it gives into ``cfg.num_steps`` (in place of the default
    interpolation; a num_steps of the user's beside a budget raises ConfigError)."""
    if OmegaConf.select(cfg, "budget.nfe") is not None:
        cfg.num_steps = budget_steps(cfg)
