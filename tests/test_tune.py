"""Tuning with Hydra's Optuna sweeper: each trial's objective is read from the results table it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from ddim_lab.config.compose import config_dir
from ddim_lab.config.tune import TuneError, objective
from ddim_lab.config.validate import validate
from ddim_lab.errors import ConfigError
from tests.conftest import ROOT, lab_config
from tests.test_cli import ddim_lab

TUNE = {"metric": "edit_success", "floor_metric": "psnr_unedited", "floor": 25.0, "penalty": 1.0}


def _table(success: list[float], background: list[float]) -> pd.DataFrame:
    edits = [
        {"prompt": "a three", "edit_prompt": "an eight", "edit_success": s, "psnr_unedited": b}
        for s, b in zip(success, background, strict=True)
    ]
    recon = {"prompt": "a three", "edit_prompt": "", "edit_success": None, "psnr_unedited": 10.0}
    same = {"prompt": "an eight", "edit_prompt": "an eight", "edit_success": 0.0, "psnr_unedited": 10.0}
    return pd.DataFrame([*edits, recon, same])


def test_objective_is_the_mean_success_of_the_edit_rows_above_the_floor():
    table = _table([1.0, 0.0, 1.0, 1.0], [30.0, 26.0, 24.0, 28.0])  # background mean 27 ≥ 25
    assert objective(table, TUNE) == pytest.approx(0.75)  # reconstruction rows (and edits to itself) left out


def test_objective_is_penalised_under_the_floor():
    table = _table([1.0, 1.0], [24.0, 25.0])  # background mean 24.5 < 25
    assert objective(table, TUNE) == pytest.approx(1.0 - 1.0)
    assert objective(table, {**TUNE, "penalty": 0.25}) == pytest.approx(0.75)
    assert objective(table, {**TUNE, "floor": 24.5}) == pytest.approx(1.0)


def test_objective_names_what_is_missing():
    with pytest.raises(TuneError, match="not a metric column"):
        objective(_table([1.0], [30.0]), {**TUNE, "metric": "prompt"})
    with pytest.raises(TuneError, match="no such column"):
        objective(_table([1.0], [30.0]), {**TUNE, "floor_metric": "clip_edited"})
    with pytest.raises(TuneError, match="no edit row"):
        objective(_table([1.0], [30.0]).iloc[1:], TUNE)


def test_the_preset_composes_with_the_optuna_sweeper_and_a_tune_block():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=tune_edit"], return_hydra_config=True)
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.direction == "maximize"
    searched = {"guidance_scale", "start_step", "editor.cross_replace_steps", "editor.self_replace_steps"}
    assert set(cfg.hydra.sweeper.params) == searched and cfg.editor.name == "p2p"
    assert cfg.tune.metric == "edit_success" and cfg.task == "edit" and Path(cfg.data.path).name == "digits-pie"


def test_tune_is_checked_before_any_model_loads():
    assert lab_config().tune is None  # off by default
    validate(lab_config("+experiment=tune_edit", "start_step=3"))
    with pytest.raises(ConfigError, match="task=edit"):
        validate(lab_config("+experiment=tune_edit", "task=reconstruct", "start_step=3"))
    with pytest.raises(ConfigError, match="tune.metric='psnr_typo'"):
        validate(lab_config("+experiment=tune_edit", "tune.metric=psnr_typo", "start_step=3"))


def _small_pie(dest: Path, count: int) -> Path:
    """The first ``count`` entries of the digits mini-benchmark, as a PIE-Bench-format folder."""
    source = ROOT / "ddim_lab" / "assets" / "digits-pie"
    mapping = json.loads((source / "mapping_file.json").read_text())
    keep = dict(sorted(mapping.items())[:count])
    for entry in keep.values():
        target = dest / "annotation_images" / entry["image_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "annotation_images" / entry["image_path"], target)
    (dest / "mapping_file.json").write_text(json.dumps(keep))
    return dest


def test_a_two_trial_optuna_study_reports_the_best_objective_of_its_result_tables(tmp_path):
    pie = _small_pie(tmp_path / "pie", 3)
    sweep = tmp_path / "sweep"
    floor, penalty = 30.0, 0.5
    done = ddim_lab(
        [
            "+experiment=tune_edit",
            f"data.path={pie}",
            "num_steps=6",
            "start_step=int(interval(0,3))",  # the search space, narrowed to the few steps
            "hydra.sweeper.n_trials=2",
            f"tune.floor={floor}",
            f"tune.penalty={penalty}",
            "metrics.lpips=off",
            "runtime.progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = []
    for job in sorted(p for p in sweep.iterdir() if (p / "results.parquet").exists()):
        table = pd.read_parquet(job / "results.parquet")
        edits = table[table["edit_prompt"].fillna("").ne("") & table["edit_prompt"].ne(table["prompt"])]
        assert len(edits) == 3
        below = edits["psnr_unedited"].mean() < floor
        values.append(edits["edit_success"].mean() - (penalty if below else 0.0))
    assert len(values) == 2
    assert best["best_value"] == pytest.approx(max(values))
    chosen = pd.read_parquet(sweep / str(values.index(max(values))) / "results.parquet")
    assert chosen["start_step"].iloc[0] == best["best_params"]["start_step"]
    assert chosen["guidance_scale"].iloc[0] == pytest.approx(best["best_params"]["guidance_scale"])
