"""``+experiment=nfe_matched``: both inverter families on one axis of model evaluations."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir

from ddim_lab.config import config_dir
from ddim_lab.inversion import INVERTERS
from ddim_lab.records import write_results
from tests.conftest import ROOT


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _study():
    spec = importlib.util.spec_from_file_location("nfe_study", ROOT / "scripts" / "nfe_matched_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_preset_sweeps_every_arm_and_each_arm_is_a_model_and_an_inverter():
    cfg = _compose("+experiment=nfe_matched")
    arms = [a.strip() for a in cfg.hydra.sweeper.params["+nfe_arm"].split(",")]
    assert sorted(arms) == sorted(p.stem for p in (config_dir() / "nfe_arm").glob("*.yaml"))
    assert cfg.cache.enabled is False and cfg.task == "reconstruct" and cfg.guidance_scale == 1.0
    assert cfg.hydra.sweeper.params["data.captions"] == "true,false"
    families = set()
    for arm in arms:
        one = _compose("+experiment=nfe_matched", f"+nfe_arm={arm}")
        assert arm == f"{one.model.name}-{one.inverter.name}" and one.inverter.name in INVERTERS
        families.add(one.model.name)
    assert families == {"digits", "digits-flow"}


def test_the_study_matches_arms_by_evaluations(tmp_path):
    rng = np.random.default_rng(0)
    # two arms: one spends 2 evaluations per step, the other 4; the dearer one is better per step
    for j, (model, inverter, per_step, psnr) in enumerate(
        (("digits", "ddim", 2, lambda n: 40 - 60 / n), ("digits-flow", "rf_solver", 4, lambda n: 40 - 10 / n))
    ):
        for k, steps in enumerate((5, 10, 25)):
            rows = [
                {
                    "image": f"img{i}",
                    "prompt": "",
                    "edit_prompt": "",
                    "model": model,
                    "inverter": inverter,
                    "num_steps": steps,
                    "start_step": 0,
                    "guidance_scale": 1.0,
                    "psnr": psnr(steps) + rng.normal(0, 0.1),
                    "lpips": float("nan"),
                    "vae_psnr": 41.0,
                    "unet_evals": per_step * steps // 2,
                    "inversion_unet_evals": per_step * steps // 2,
                }
                for i in range(6)
            ]
            write_results(rows, tmp_path / "sweep" / f"{j}{k}")
    study = _study()
    summary = study.table(study.load([tmp_path / "sweep"]))
    assert list(summary["evals_mean"]) == [10, 20, 50, 20, 40, 100]
    assert (summary["psnr_low"] < summary["psnr_mean"]).all() and (
        summary["psnr_mean"] < summary["psnr_high"]
    ).all()
    matched = study.matched(summary, budgets=(20, 50)).set_index("inverter")
    assert matched.loc["ddim", "PSNR ≤20"].endswith("(20 @ 10)")  # the best ddim within 20 evaluations
    assert matched.loc["rf_solver", "PSNR ≤20"].endswith("(20 @ 5)")
    assert matched.loc["rf_solver", "PSNR ≤50"].endswith("(40 @ 10)")
    study.figure(summary, tmp_path / "nfe.png", vae_psnr=41.0)
    assert (tmp_path / "nfe.png").stat().st_size > 10_000
    assert pd.read_parquet(next((tmp_path / "sweep").glob("*/results.parquet")))["prompt"].eq("").all()
