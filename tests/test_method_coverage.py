"""Every registered method has the tests CONTRIBUTING.md asks of it.

- each inverter (``INVERTERS``): a reference-parity test (its name, quoted, in a
  ``tests/test_reference_parity_*.py`` file), and the cost-formula and cache-key tests parametrized over it:
  ``tests/test_inverters.py`` for the UNet methods, ``tests/test_flow_inverters.py`` for the flow methods,
  ``tests/test_sdedit.py`` for ``none`` (read from those tests' own ``parametrize`` marks);
- each editor (``EDITORS``): a reference-parity test, and the cost-formula and cache-key test below, which
  runs over every registered editor: the evaluations the engine counts equal the editor's
  ``trajectory_cost`` over its rows, and a knob changes the rows' ``editor_knobs`` but never a cache key.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from ddim_lab.data.folders import load_dataset
from ddim_lab.methods.editing import EDITORS
from ddim_lab.methods.inversion import INVERTERS
from ddim_lab.study.runner import Runner
from tests import test_flow_inverters, test_inverters, test_sdedit
from tests.conftest import DIGITS, lab_config

TESTS = Path(__file__).resolve().parent

# what each test proves → the tests that prove it, each parametrized over ``name``
COST_TESTS = (
    test_inverters.test_engine_spends_each_methods_formula_and_batches_exactly,
    test_flow_inverters.test_costs_equal_counted_evaluations_and_mixed_starts_batch_exactly,
    test_sdedit.test_sdedit_spends_its_formula_and_replicates_over_a_seed_list,  # inverter=none
)
KEY_TESTS = (
    test_inverters.test_the_key_holds_the_knobs_and_no_sampling_setting,
    test_flow_inverters.test_every_flow_inverter_runs_through_the_engine,
)


def parametrized(test: Callable, argname: str = "name") -> set:
    """The values a test's ``@pytest.mark.parametrize`` marks give ``argname``."""
    values: set = set()
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if argname in names:
            at = names.index(argname)
            values |= {v[at] if len(names) > 1 else v for v in mark.args[1]}
    return values


def parity_names(folder: Path = TESTS) -> set[str]:
    """Every quoted identifier in the reference-parity test files: the method names they run."""
    text = "\n".join(p.read_text() for p in sorted(folder.glob("test_reference_parity_*.py")))
    return set(re.findall(r"[\"'](\w+)[\"']", text))


def missing_tests(name: str, cost: tuple[Callable, ...], key: tuple[Callable, ...]) -> list[str]:
    """The kinds of test ``name`` lacks: reference parity, cost formula, cache key."""
    has = {
        "reference parity": name in parity_names(),
        "cost formula": any(name in parametrized(t) for t in cost),
        "cache key": any(name in parametrized(t) for t in key),
    }
    return [kind for kind, ok in has.items() if not ok]


def test_parametrized_reads_the_marks():
    assert parametrized(
        test_flow_inverters.test_costs_equal_counted_evaluations_and_mixed_starts_batch_exactly
    ) == set(test_flow_inverters.FLOW)  # the test stacks a second mark (guidance) on top
    assert parametrized(test_parametrized_reads_the_marks) == set()


@pytest.mark.parametrize("name", sorted(INVERTERS))
def test_every_inverter_has_its_parity_cost_and_key_tests(name):
    missing = missing_tests(name, COST_TESTS, KEY_TESTS)
    assert not missing, f"inverter={name} has no {', '.join(missing)} test (CONTRIBUTING.md, 1. An inverter)"


# -- editors: the cost-formula and cache-key test runs over the registry itself ---------------------------

GRID = ["task=edit", "edit_prompt=[null,a handwritten digit eight]", "guidance_scale=[1,3]", "start_step=[0,2]"]


@functools.lru_cache(maxsize=1)
def digits_flow(cache: str):
    """The shipped digits flow model, loaded once (for flow-only editors)."""
    from ddim_lab.models.loading import load_model
    from tests.conftest import model_spec

    return load_model(model_spec("digits-flow"), {"device": "cpu"}, cache)


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_every_editor_spends_its_formula_and_stays_out_of_the_key(digits, name):
    cls = editor_class(name)
    model = "digits-flow" if cls.flow_only else "digits"  # flow-only editors run on the digits flow model
    digits = digits_flow(os.environ["DDIM_LAB_CACHE"]) if cls.flow_only else digits
    items = load_dataset(DIGITS, digits.resolution, "")[:1]
    inverter = () if cls.needs_inversion else ("inverter=none",)  # sdedit, flowedit: the clean latent
    cfg = lab_config(f"editor={name}", *GRID, *inverter, model=model, steps=4)
    runner = Runner(cfg, digits)
    rows, _ = runner.run_group(items)
    assert {r["editor"] for r in rows} == {name}
    assert runner.evals["sampling"] == sum(r["unet_evals"] for r in rows) > 0  # counted == trajectory_cost
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    plain = {"name": "sdedit" if inverter else "prompt_swap"}  # a knob-free editor on the same inverter
    key = Runner(with_editor(cfg, plain), digits).inversion_key(items[0])
    assert runner.inversion_key(items[0]) == key
    knobs = runner.editor.knobs()
    for knob, value in knobs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        other = value + 1 if isinstance(value, int) else value * 0.5 if value else 1  # int knobs stay ints
        changed = Runner(with_editor(cfg, {"name": name, **knobs, knob: other}), digits)
        assert changed.inversion_key(items[0]) == key, knob
        assert changed.editor.row_fields()["editor_knobs"] != rows[0]["editor_knobs"], knob


def editor_class(name: str) -> type:
    """The class ``EDITORS`` registers as ``name``."""
    module, cls = EDITORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def with_editor(cfg: DictConfig, spec: dict) -> DictConfig:
    """A copy of a composed config with another ``editor`` (composing again costs a Hydra call)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.editor = spec
    return out


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_every_editor_has_a_reference_parity_test(name):
    assert name in parity_names(), f"editor={name} has no reference parity test (CONTRIBUTING.md, 2. An editor)"


def test_a_method_without_tests_is_caught(monkeypatch):
    monkeypatch.setitem(INVERTERS, "untested", "ddim_lab.methods.inversion.ddim:DDIMInversion")
    assert missing_tests("untested", COST_TESTS, KEY_TESTS) == ["reference parity", "cost formula", "cache key"]
    assert missing_tests("ddim", COST_TESTS, KEY_TESTS) == []
