"""One row schema: rows are built by ``schema.row`` from ``SCHEMA``, run-wide settings by ``config_values``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ddim_lab import schema
from ddim_lab.data.folders import load_dataset
from ddim_lab.study import tasks
from ddim_lab.study.loggers import LocalLogger
from ddim_lab.study.records import write_results
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS, lab_config

CORE = [c.name for c in schema.SCHEMA if c.core]
CORE_CONFIG = [c.name for c in schema.SCHEMA if c.core and c.role == schema.CONFIG]


def _configs(**values) -> dict:
    return {c: values.get(c) for c in CORE_CONFIG}


def test_row_has_every_core_column_in_schema_order_and_optional_ones_only_when_given():
    plain = schema.row(**_configs(task="reconstruct"), psnr=30.0)
    assert list(plain) == CORE and plain["psnr"] == 30.0 and plain["ssim"] is None
    with_protocol = schema.row(**_configs(), protocol="abc", edit_success=1.0)
    assert list(with_protocol) == [
        c.name for c in schema.SCHEMA if c.core or c.name in ("protocol", "edit_success")
    ]


def test_row_refuses_undeclared_columns_and_left_out_settings():
    with pytest.raises(ValueError, match="undeclared columns \\['psnr_typo'\\]"):
        schema.row(**_configs(), psnr_typo=1.0)
    left_out = _configs()
    del left_out["dtype"]
    with pytest.raises(ValueError, match="dtype"):
        schema.row(**left_out)


def test_config_values_reads_every_run_wide_setting_from_the_config():
    cfg = lab_config(
        "runtime.dtype=bf16",
        "seed=3",
        "eta=0.5",
        "negative_prompt=blurry",
        "metrics.lpips_net=squeeze",
        "inverter=edict",
        "+scheduler.overrides.timestep_spacing=trailing",
    )
    values = schema.config_values(cfg)
    assert set(values) == set(schema.RUN_CONFIG) and set(values) <= set(CORE_CONFIG)
    assert values["dtype"] == "bf16" and values["seed"] == 3 and values["eta"] == 0.5
    assert values["negative_prompt"] == "blurry" and values["lpips_net"] == "squeeze"
    assert values["inverter"] == "edict" and values["model"] == cfg.model.name
    assert json.loads(values["scheduler_overrides"]) == {"timestep_spacing": "trailing"}


@pytest.fixture(scope="module")
def two(tiny):
    return load_dataset(DIGITS, tiny.resolution, "")[:2]


def test_engine_rows_are_schema_rows_and_reconstructions_store_an_empty_edit_prompt(tiny, two, tmp_path):
    cfg = lab_config(
        "task=edit", "edit_prompt=[null,a dog]", "runtime.dtype=fp32", "negative_prompt=blurry", steps=4
    )
    rows, _ = Runner(cfg, tiny).run_group(two)
    assert all(list(r) == list(schema.row(**r)) for r in rows)  # exactly the schema's columns, in its order
    assert [r["edit_prompt"] for r in rows] == ["", "a dog", "", "a dog"]
    assert {r["negative_prompt"] for r in rows} == {"blurry"}
    write_results(rows, tmp_path)
    table = pd.read_parquet(tmp_path / "results.parquet")
    sizes = table.groupby("edit_prompt").size()  # dropna=True by default: a null would vanish here
    assert sizes.sum() == len(rows) and sizes[""] == 2


def test_sample_rows_carry_the_run_settings_and_grids_say_eta_guidance_and_steps(tiny, tmp_path, monkeypatch):
    grids: list[tuple[Path, list]] = []
    real = tasks.save_grid
    monkeypatch.setattr(
        tasks,
        "save_grid",
        lambda path, columns, *a, **k: grids.append((path, columns)) or real(path, columns, *a, **k),
    )
    cfg = lab_config(
        "task=sample",
        "prompt=a dog",
        "num_images=2",
        "eta=0.5",
        "guidance_scale=3",
        "negative_prompt=blurry",
        steps=3,
    )
    table = tasks.text_to_image(cfg, tiny, tmp_path, LocalLogger())
    assert list(table.columns[: len(CORE)]) == CORE
    assert set(table["negative_prompt"]) == {"blurry"} and set(table["scheduler_overrides"]) == {"{}"}
    assert table["inverter"].isna().all() and table["edit_prompt"].isna().all()  # not a reconstruction: n/a
    headers = [header for path, columns in grids if path.name == "samples.png" for header, _ in columns]
    assert headers == [tasks.sample_label(cfg.seed + j, 0.5, 3.0, 3) for j in range(2)]
    assert all("eta=0.5" in h and "guidance=3" in h and "3 steps" in h for h in headers)
