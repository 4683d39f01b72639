"""``+experiment=reconstruction``: each inverter with the source and the empty prompt, at guidance 1 and 7.5."""

from __future__ import annotations

import pandas as pd
from hydra import compose, initialize_config_dir

from ddim_lab.config.compose import config_dir
from ddim_lab.config.validate import validate
from ddim_lab.methods.inversion import INVERTERS
from ddim_lab.study.records import write_results
from ddim_lab.study.runner import Runner, load_items
from tests.conftest import lab_config
from tests.studies import draw, preset_report, save_job


def _preset(name: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)


def test_the_preset_sweeps_the_studied_inverters_with_and_without_captions():
    cfg = _preset("reconstruction")
    params = cfg.hydra.sweeper.params
    studied = _preset("inverters").hydra.sweeper.params.inverter.split(",")  # the inverters study's methods
    assert sorted(params.inverter.split(",")) == sorted(studied) and set(studied) <= set(INVERTERS)
    assert params["data.captions"] == "true,false" and params["inversion.guidance_scale"] == "1.0,match"
    assert cfg.task == "reconstruct" and list(cfg.guidance_scale) == [1.0, 7.5] and cfg.prompt == ""
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_without_captions_the_rows_use_the_empty_prompt(digits, tmp_path):
    rows = {}
    for captions in ("true", "false"):
        cfg = lab_config("+experiment=reconstruction", f"data.captions={captions}", model="digits", steps=3)
        validate(cfg)
        items = load_items(cfg, digits.resolution)[:2]
        rows[captions], _ = Runner(cfg, digits).run_group(items)
        write_results(rows[captions], tmp_path / captions)
    table = pd.read_parquet(tmp_path / "false" / "results.parquet")
    assert set(table["prompt"]) == {""} and len(table) == 4  # 2 images × guidance 1 and 7.5
    assert set(table["guidance_scale"]) == {1.0, 7.5} and set(table["edit_prompt"]) == {""}
    assert all(r["prompt"].startswith("a handwritten digit") for r in rows["true"])


def test_the_preset_puts_source_and_empty_prompt_side_by_side(tmp_path):
    for j, (inverter, captions) in enumerate(
        (("ddim", True), ("ddim", False), ("edict", True), ("edict", False))
    ):
        rows = [
            {
                "image": f"img{i}",
                "prompt": f"digit {i}" if captions else "",
                "edit_prompt": "",
                "inverter": inverter,
                "inversion_guidance_scale": 1.0,
                "guidance_scale": 1.0,
                "num_steps": 25,
                "start_step": 0,
                "psnr": 30.0 + i + (0.5 if captions else 0.0),
                "ssim": 0.9,
            }
            for i in range(4)
        ]
        save_job(tmp_path / "sweep" / str(j), rows, preset_report("reconstruction"))
    out = tmp_path / "table"
    assert draw(tmp_path / "sweep", out) == 0
    table = pd.read_csv(out / "reconstruction.csv")
    assert set(table["inverter"]) == {"ddim", "edict"}
    row = table[table["inverter"] == "ddim"].iloc[0]
    assert (
        row["psnr_source prompt_mean"] == 32.0 and row["psnr_empty prompt_mean"] == 31.5
    )  # 30.5..33.5, 30..33
    assert row["psnr_empty prompt_diff_mean"] == -0.5  # empty − source, paired on the images
    assert row["psnr_empty prompt_pairs"] == 4 and row["psnr_empty prompt_p"] < 0.2
    text = (out / "reconstruction.md").read_text()
    assert "| psnr: source prompt | psnr: empty prompt | psnr: empty prompt − source prompt | psnr: p |" in text
    assert (
        "| ddim | 1 | 25 | 1 | 32 [" in text and "| -0.5 |" in text
    )  # one value (every diff equal): no bounds
