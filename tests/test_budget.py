"""``budget.nfe=K``: each method runs at the largest step count whose rows cost at most K evaluations."""

from __future__ import annotations

import copy

import pytest

from ddim_lab.cli.main import precheck
from ddim_lab.config.budget import (
    RowPoint,
    budget_steps,
    chosen_steps,
    grid_rows,
    image_cost,
    is_flow_model,
    stand_in_plans,
)
from ddim_lab.config.compose import compose_config
from ddim_lab.config.validate import validate
from ddim_lab.data.folders import load_dataset
from ddim_lab.errors import ConfigError
from ddim_lab.methods.editing import make_editor
from ddim_lab.methods.inversion import INVERTERS, make_inverter
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS

# evaluations per image at guidance 1, start 0, written from each method's paper (the list), not from
# the lab's formulas: a budget K must give the largest N with cost(N) <= K
FLOW_COSTS = {
    "flow_euler": lambda n: 2 * n,  # N Euler steps up, N down
    "rf_solver": lambda n: 4 * n,  # two evaluations a step (midpoint), both ways
    "fireflow": lambda n: 2 * n + 2,  # one a step, the first step of each walk two
    "uni_inv": lambda n: 2 * n + 1,  # inversion reuses its last velocity: N + 1 up, N down
}
FLOW_ONLY = (*FLOW_COSTS, "rf_inversion")
FLOW_INVERTERS = tuple(n for n in INVERTERS if n != "course")  # the DDIM family runs on flow models too
UNET_INVERTERS = tuple(n for n in INVERTERS if n not in FLOW_ONLY)


def budget_config(*overrides: str, model: str = "digits-flow"):
    """The lab's config with a budget and no num_steps, CPU, no LPIPS, no cache."""
    base = [
        f"model={model}",
        "metrics.lpips=off",
        "runtime.device=cpu",
        "runtime.progress=false",
        "cache.enabled=false",
    ]
    return compose_config([*base, *overrides])


def largest(cost, budget: int) -> int:
    return max(n for n in range(1, 1001) if cost(n) <= budget)


@pytest.mark.parametrize("name", sorted(FLOW_COSTS))
def test_each_flow_method_gets_the_largest_step_count_it_can_afford(name):
    cfg = budget_config(f"inverter={name}", "budget.nfe=20")
    for budget in (10, 20, 21, 50, 100):
        cfg.budget.nfe = budget
        assert budget_steps(cfg) == largest(FLOW_COSTS[name], budget), budget


def test_a_grid_is_held_to_its_dearest_point():
    # inversion at guidance 1 (N) + sampling at 7.5 (2N): 3N; the guidance-1 rows of the same job spend 2N
    cfg = budget_config("model=digits", "guidance_scale=[1,7.5]", "budget.nfe=20", model="digits")
    assert budget_steps(cfg) == 6
    # a later start step samples fewer steps, so start 0 is the dearest; a start beyond N needs more steps
    cfg = budget_config("inverter=flow_euler", "start_step=[0,3]", "budget.nfe=20")
    assert budget_steps(cfg) == 10
    # prompt-to-prompt's edits sample their source branch too: N + 2N
    cfg = budget_config("task=edit", "edit_prompt=a digit", "editor=p2p", "budget.nfe=20", model="digits")
    assert budget_steps(cfg) == 6


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_every_cost_grows_with_the_step_count_and_the_choice_is_the_last_that_fits(guidance):
    # chosen_steps stops at the first N over the budget: sound only if no formula ever falls as N grows
    for flow, names in ((True, FLOW_INVERTERS), (False, UNET_INVERTERS)):
        for name in names:
            inverter, editor = make_inverter(name), make_editor(None)
            plan_of = stand_in_plans(inverter, flow)
            rows = [RowPoint(guidance, 1.0, 0, False)]
            costs = [image_cost(inverter, editor, plan_of(n), rows) for n in range(3, 40)]
            assert costs == sorted(costs) and costs[-1] > costs[0], name
            steps = chosen_steps(37, inverter, editor, plan_of, rows)
            fits, over = (image_cost(inverter, editor, plan_of(n), rows) for n in (steps, steps + 1))
            assert fits <= 37 < over, name


def test_null_text_is_budgeted_at_its_worst_case():
    # per step at guidance 7.5: pivot 1, conditional 1, at most 10 Adam forwards, final null 1, sampling 2
    cfg = budget_config("inverter=null_text", "guidance_scale=7.5", "budget.nfe=45", model="digits")
    assert budget_steps(cfg) == 3
    cfg.inverter.inner_steps = 2
    assert budget_steps(cfg) == 6  # 7 a step


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_the_stand_in_plans_cost_what_each_model_plan_costs(digits, digits_flow, guidance):
    # the choice is made before any model loads, on a default scheduler of the model's kind
    for model, names in ((digits_flow, FLOW_INVERTERS), (digits, UNET_INVERTERS)):
        assert is_flow_model(budget_config(model=model.name).model) == (model is digits_flow)
        real = model.scheduler()
        for name in names:
            inverter, editor = make_inverter(name), make_editor(None)
            stand_in = stand_in_plans(inverter, model is digits_flow)
            rows = [RowPoint(guidance, 1.0, 0, False), RowPoint(guidance, 1.0, 0, True)]
            for n in (3, 7, 20):
                own = inverter.plan(real, n)
                assert image_cost(inverter, editor, stand_in(n), rows) == image_cost(
                    inverter, editor, own, rows
                )


def _rows(cfg, model, images: int = 1) -> tuple[list[dict], Runner]:
    items = load_dataset(DIGITS, model.resolution, "")[:images]
    runner = Runner(cfg, model)  # applies the budget to the composed config, then checks it on the model
    rows, _ = runner.run_group(items)
    return rows, runner


def test_budget_20_on_the_flow_model_spends_at_most_20_and_at_least_20_less_one_step(digits_flow):
    composed = budget_config("budget.nfe=20", "data=folder", f"data.path='{DIGITS}'")
    for name, cost in FLOW_COSTS.items():
        cfg = copy.deepcopy(composed)  # num_steps still the default: the Runner applies the budget
        cfg.inverter = {"name": name}
        rows, runner = _rows(cfg, digits_flow)
        step = cost(runner.cfg.num_steps + 1) - cost(runner.cfg.num_steps)
        for row in rows:
            assert row["budget_nfe"] == 20 and row["num_steps"] == runner.cfg.num_steps
            assert 20 - step < row["nfe"] <= 20, name
        # what the denoiser counted is what the rows say (one image, one grid point, nothing cached)
        assert runner.evals["inversion"] + runner.evals["sampling"] == sum(r["nfe"] for r in rows)


@pytest.mark.parametrize(
    "overrides, budget",
    [
        (["inverter=null_text", "guidance_scale=7.5"], 30),  # the pivot and the Adam steps it really used
        (["task=edit", "edit_prompt=a handwritten digit seven", "editor=p2p"], 20),  # and the source branch
    ],
)
def test_a_rows_nfe_is_what_it_spent(digits, overrides, budget):
    cfg = budget_config(
        *overrides, f"budget.nfe={budget}", "data=folder", f"data.path='{DIGITS}'", model="digits"
    )
    rows, runner = _rows(cfg, digits)
    spent = runner.evals["inversion"] + runner.evals["sampling"]
    assert len(rows) == 1 and rows[0]["nfe"] == spent <= budget and rows[0]["budget_nfe"] == budget


def test_the_run_refuses_a_step_count_the_model_would_not_give(digits_flow):
    cfg = budget_config("inverter=flow_euler", "budget.nfe=20", "data=folder", f"data.path='{DIGITS}'")
    cfg.num_steps = 7  # as if the config had named the wrong family
    with pytest.raises(ValueError, match="num_steps=10, the config gave num_steps=7"):
        Runner(cfg, digits_flow)


# -- bad input: one line, before any model loads -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["budget.nfe=20", "num_steps=10"], "budget.nfe=20 picks num_steps for each method; drop num_steps=10"),
        (["-m", "num_steps=10,20", "budget.nfe=20"], "drop num_steps=10"),
        (
            ["num_steps=[10,20]", "budget.nfe=20"],
            "budget.nfe picks num_steps for each method: leave num_steps out",
        ),
        (["task=sample", "budget.nfe=20"], "budget.nfe applies to task=reconstruct and task=edit"),
        (["budget.nfe=0"], "budget.nfe=0 must be an integer >= 1"),
    ],
)
def test_a_budget_beside_num_steps_is_refused_before_the_sweep_starts(argv, message):
    line = precheck(argv)
    assert line is not None and message in line and "\n" not in line


def test_a_sweep_of_inverters_under_one_budget_passes_the_precheck():
    assert (
        precheck(["model=digits-flow", "-m", "inverter=flow_euler,rf_solver,fireflow,uni_inv", "budget.nfe=20"])
        is None
    )


@pytest.mark.parametrize(
    "overrides, smallest",
    [
        (["inverter=rf_solver", "budget.nfe=3"], 4),
        (["inverter=fireflow", "budget.nfe=3"], 4),
        (["inverter=flow_euler", "start_step=[0,4]", "budget.nfe=9"], 10),  # start 4 needs N >= 5
    ],
)
def test_a_budget_below_the_fewest_steps_names_the_smallest_it_can_meet(overrides, smallest):
    cfg = budget_config(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert f"the smallest budget it can meet is {smallest}" in str(err.value) and "\n" not in str(err.value)
    cfg.budget.nfe = smallest - 1
    with pytest.raises(ConfigError, match=f"smallest budget it can meet is {smallest}"):
        budget_steps(cfg)
    cfg.budget.nfe = smallest  # and that budget it meets
    budget_steps(cfg)


def test_grid_rows_cover_every_guidance_and_start_step():
    cfg = budget_config("guidance_scale=[1,7.5]", "start_step=[0,2]", "inversion.guidance_scale=match")
    rows = grid_rows(cfg)
    assert {(r.guidance, r.inversion_guidance, r.start) for r in rows} == {
        (1.0, 1.0, 0),
        (1.0, 1.0, 2),
        (7.5, 7.5, 0),
        (7.5, 7.5, 2),
    }
    assert not any(r.edit for r in rows)


def test_the_cli_stops_a_budget_too_small_with_one_line_before_loading_the_model(tmp_path):
    from tests.test_cli import ddim_lab

    proc = ddim_lab(
        ["model=digits-flow", "inverter=rf_solver", "budget.nfe=3", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path
    )
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "budget.nfe=3 is below what inverter=rf_solver spends" in errors[0] and "meet is 4" in errors[0]
    assert "loading" not in proc.stderr


TRAILING = {"timestep_spacing": "trailing", "steps_offset": 0}  # conf/scheduler/ddim-trailing.yaml


def test_the_stand_in_plans_follow_the_configs_scheduler_overrides(digits):
    """renoise's cost counts the plan's timesteps below 250, so the spacing matters: with the config's overrides
    the stand-in costs what the model's own plan costs; on the default spacing it would not."""
    inverter, editor = make_inverter("renoise"), make_editor(None)
    rows = [RowPoint(7.5, 1.0, 0, False)]
    real = digits.scheduler(**TRAILING)
    followed, default = stand_in_plans(inverter, False, TRAILING), stand_in_plans(inverter, False)
    own = {n: image_cost(inverter, editor, inverter.plan(real, n), rows) for n in (2, 3, 4, 7)}
    assert own == {n: image_cost(inverter, editor, followed(n), rows) for n in own}
    assert own != {n: image_cost(inverter, editor, default(n), rows) for n in own}
