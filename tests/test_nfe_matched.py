"""``+experiment=nfe_matched``: both inverter families at equal budgets of model evaluations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from ddim_lab.config.budget import budget_steps, explicit_num_steps
from ddim_lab.config.compose import config_dir
from ddim_lab.config.report_spec import ReportSpecError
from ddim_lab.methods.inversion import INVERTERS
from ddim_lab.report.main import collect_results
from ddim_lab.report.stats import Bootstrap
from ddim_lab.report.studies import study_rows, typed_report
from ddim_lab.report.study_tables import study_table
from tests.studies import draw, preset_report, save_job


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_the_preset_sweeps_every_arm_at_every_budget_and_every_arm_meets_them():
    cfg = _compose("+experiment=nfe_matched")
    params = cfg.hydra.sweeper.params
    arms = [a.strip() for a in params["+nfe_arm"].split(",")]
    assert sorted(arms) == sorted(p.stem for p in (config_dir() / "nfe_arm").glob("*.yaml"))
    assert cfg.cache.enabled is False and cfg.task == "reconstruct" and cfg.guidance_scale == 1.0
    assert params["data.captions"] == "true,false" and "num_steps" not in params
    budgets = [int(b) for b in params["budget.nfe"].split(",")]
    assert min(budgets) <= 10 and max(budgets) >= 100
    families = set()
    for arm in arms:
        one = _compose("+experiment=nfe_matched", f"+nfe_arm={arm}")
        assert arm == f"{one.model.name}-{one.inverter.name}" and one.inverter.name in INVERTERS
        assert not explicit_num_steps(one)  # the budget picks every arm's step count
        families.add(one.model.name)
        for budget in budgets:  # no job of the sweep fails for too small a budget
            one.budget.nfe = budget
            assert budget_steps(one) >= 1
    assert families == {"digits", "digits-flow"}


def _rows(model: str, inverter: str, budget: int, steps: int, nfe: int, psnr: float, rng) -> list[dict]:
    return [
        {
            "image": f"img{i}",
            "prompt": "",
            "edit_prompt": "",
            "model": model,
            "inverter": inverter,
            "num_steps": steps,
            "budget_nfe": budget,
            "nfe": nfe,
            "start_step": 0,
            "guidance_scale": 1.0,
            "psnr": psnr + 0.5 * i + rng.normal(0, 0.05),
            "lpips": float("nan"),
            "vae_psnr": 41.0,
        }
        for i in range(6)
    ]


def _sweep(root, rng):
    # at each budget, Euler (2N) runs twice the steps of rf_solver (4N); rf_solver is 3 dB better at 20 only
    arms = [
        ("euler", "flow_euler", 20, 10, 20, 30.0),
        ("euler", "flow_euler", 50, 25, 50, 33.0),
        ("rf", "rf_solver", 20, 5, 20, 33.0),
        ("rf", "rf_solver", 50, 12, 48, 33.0),
    ]
    for job, inverter, budget, steps, nfe, psnr in arms:
        rows = _rows("digits-flow", inverter, budget, steps, nfe, psnr, rng)
        save_job(root / f"{job}{budget}", rows, preset_report("nfe_matched"))
    return root


def test_the_preset_groups_by_budget_and_pairs_arms_on_the_same_images(tmp_path):
    sweep = _sweep(tmp_path / "sweep", np.random.default_rng(0))
    report = typed_report(preset_report("nfe_matched"), "nfe_matched")
    rows = study_rows(collect_results(sweep), report["rows"])
    settings = Bootstrap()
    tables = [study_table(rows, t, settings, f"t{i}") for i, t in enumerate(report["tables"])]
    summary = tables[0][1]
    assert list(summary["budget_nfe"]) == [20, 20, 50, 50]
    assert list(summary["num_steps"]) == [10, 5, 25, 12] and list(summary["nfe_mean"]) == [20, 20, 50, 48]
    assert (summary["psnr_low"] < summary["psnr_mean"]).all()
    assert (summary["psnr_mean"] < summary["psnr_high"]).all()
    across = tables[1][0].set_index("inverter")
    assert across.loc["rf_solver", "PSNR ≤50"].endswith("(48 @ 12)")
    pairs = tables[2][1].set_index("budget_nfe")  # rf_solver − flow_euler, paired over different N
    assert list(pairs["other"]) == ["rf_solver", "rf_solver"] and (pairs["pairs"] == 6).all()
    assert pairs.loc[20, "diff_low"] > 2.5 and pairs.loc[50, "diff_low"] < 0 < pairs.loc[50, "diff_high"]
    assert draw(sweep, tmp_path / "docs") == 0  # `ddim-lab-report DIR` writes what the preset declares
    text = (tmp_path / "docs" / "nfe_matched_table.md").read_text()
    assert text.count("| prompt_kind |") == 3 and "Paired differences from each model's first-order arm" in text
    assert "| psnr | empty prompt | 20 | digits-flow | rf_solver − flow_euler |" in text
    assert (tmp_path / "docs" / "figures" / "nfe_matched.png").stat().st_size > 10_000
    assert pd.read_parquet(next(sweep.glob("*/results.parquet")))["prompt"].eq("").all()


def test_the_preset_refuses_tables_without_a_budget(tmp_path):
    rows = _rows("digits-flow", "flow_euler", 20, 10, 20, 30.0, np.random.default_rng(0))
    save_job(tmp_path / "old" / "0", [{**r, "budget_nfe": None} for r in rows], preset_report("nfe_matched"))
    report = typed_report(preset_report("nfe_matched"), "nfe_matched")
    with pytest.raises(ReportSpecError, match="no row carries budget_nfe"):
        study_rows(collect_results(tmp_path / "old"), report["rows"])
    assert (
        draw(tmp_path / "old", tmp_path / "out") == 2
        and not (tmp_path / "out" / "nfe_matched_table.md").exists()
    )
