"""Result rows carry every knob of the inverter, the editor and the control signal, so the report never pools
two settings; the inversion cache key still leaves out the knobs that only change sampling.

RF-Inversion's η (a sampling knob) on the ``tiny-flow`` model is the case that used to write identical rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ddim_lab.config.compose import CONF_DIR
from ddim_lab.data.folders import load_dataset
from ddim_lab.methods.control import control_settings
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS, lab_config

FLOW = ("flow_euler", "rf_solver", "fireflow", "uni_inv", "rf_inversion")
INVERTERS = sorted(p.stem for p in (Path(CONF_DIR) / "inverter").glob("*.yaml"))


def yaml_knobs(group: str, name: str) -> set[str]:
    """The knobs a ``conf/GROUP/NAME.yaml`` declares (every key but ``name``)."""
    return set(OmegaConf.load(Path(CONF_DIR) / group / f"{name}.yaml")) - {"name"}


def test_rf_inversion_eta_changes_the_rows_not_the_cache_key(tiny_flow, tmp_path):
    item = load_dataset(DIGITS, tiny_flow.resolution, "")[0]
    rows, keys = {}, {}
    for eta in (0.0, 0.9):
        cfg = lab_config("inverter=rf_inversion", f"inverter.eta={eta}", model="tiny-flow", steps=4)
        runner = Runner(cfg, tiny_flow)
        rows[eta], _ = runner.run_group([item])
        keys[eta] = runner.inversion_key(item)
    knobs = {eta: {r["inverter_knobs"] for r in rs} for eta, rs in rows.items()}
    assert all(len(k) == 1 for k in knobs.values())
    (zero,), (high,) = knobs[0.0], knobs[0.9]
    assert zero != high
    assert json.loads(zero)["eta"] == 0.0 and json.loads(high)["eta"] == 0.9
    assert set(json.loads(zero)) == yaml_knobs("inverter", "rf_inversion")  # every knob, sampling ones too
    assert keys[0.0] == keys[0.9]  # the artifact is the same: the key leaves η out
    assert rows[0.0][0]["latent_mse"] != rows[0.9][0]["latent_mse"]  # and η does change what sampling gives


@pytest.mark.parametrize("name", INVERTERS)
def test_every_inverter_writes_every_knob_of_its_config(tiny, tiny_flow, name):
    model, family = (tiny_flow, "tiny-flow") if name in FLOW else (tiny, "tiny")
    runner = Runner(lab_config(f"inverter={name}", model=family, steps=4), model)
    assert set(json.loads(runner.knobs_json)) == yaml_knobs("inverter", name)
    assert runner.summary(0)["inverter_knobs"] == json.loads(runner.knobs_json)


def test_editor_knobs_reach_the_rows_and_stay_out_of_the_key(tiny):
    item = load_dataset(DIGITS, tiny.resolution, "")[0]
    runners = [
        Runner(lab_config("editor=p2p", f"editor.cross_replace_steps={c}", steps=4), tiny) for c in (0.4, 0.8)
    ]
    fields = [r.editor.row_fields() for r in runners]
    assert fields[0]["editor_knobs"] != fields[1]["editor_knobs"]
    assert set(json.loads(fields[0]["editor_knobs"])) == yaml_knobs("editor", "p2p")
    assert runners[0].inversion_key(item) == runners[1].inversion_key(item)


def test_control_knobs_reach_the_rows():
    settings = [
        control_settings(lab_config("control=canny", f"control.low_threshold={low}")) for low in (100, 50)
    ]
    assert settings[0]["control_knobs"] != settings[1]["control_knobs"]
    for knob in yaml_knobs("control", "canny"):
        assert knob in settings[0]["control_knobs"]
