"""Studies declare their outputs: a preset's ``report:`` section, read from a sweep's saved config, drawn by
``ddim-lab-report DIR`` (ddim_lab/report/studies.py), checked in one line before any work."""

from __future__ import annotations

import copy

import pytest
import yaml
from omegaconf import OmegaConf

from ddim_lab.config.report_spec import ReportSpecError, check_columns
from ddim_lab.config.validate import validate
from ddim_lab.errors import ConfigError
from ddim_lab.report.main import collect_results
from ddim_lab.report.stats import Bootstrap
from ddim_lab.report.studies import saved_report, study_rows, typed_report
from ddim_lab.report.study_tables import study_table
from ddim_lab.report.text import markdown
from ddim_lab.study.sweep import config_hash
from tests.conftest import lab_config
from tests.studies import draw, preset_report, save_job

EIGHT = "a handwritten digit eight"


def _row(image: str, inverter: str, inv: float, g: float, edit: str | None, psnr: float, **over) -> dict:
    prompt = EIGHT if image == "eight" else f"a handwritten digit {image}"
    return {
        "image": image,
        "prompt": prompt,
        "edit_prompt": edit or "",
        "inverter": inverter,
        "num_steps": 10,
        "inversion_guidance_scale": inv,
        "guidance_scale": g,
        "start_step": 0,
        "psnr": psnr,
        "ssim": 0.9,
        "vae_psnr": 41.0,
        "unet_evals": 10 if g == 1 else 20,
        "inversion_unet_evals": 10 if inv == 1 else 20,
        "nfe": (10 if inv == 1 else 20) + (10 if g == 1 else 20),  # by formula: inversion + trajectory
        "inversion_unet_backwards": None,
        "seconds": 1.0,
        **over,
    }


def _job(inverter: str, inv: float | None) -> list[dict]:
    """One job of the inverters preset: three images (one an eight) at recon g=1, recon g=7.5, edit g=7.5;
    ``inv=None`` is inversion.guidance_scale=match."""
    rows = []
    for n, image in enumerate(("one", "two", "eight")):
        for g, edit in ((1.0, None), (7.5, None), (7.5, EIGHT)):
            psnr = 30.0 + n + (g if inv is None else 0.0) + (-10.0 if edit else 0.0)
            rows.append(_row(image, inverter, g if inv is None else inv, g, edit, psnr))
    return rows


@pytest.fixture
def inverters_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for n, (inverter, inv) in enumerate((("ddim", 1.0), ("ddim", None), ("edict", None))):
        save_job(sweep / str(n), _job(inverter, inv), preset_report("inverters"), inverter={"name": inverter})
    return sweep


def test_the_inverters_preset_derives_points_drops_repeats_and_draws_its_table_and_figure(
    inverters_sweep, tmp_path
):
    report = saved_report(inverters_sweep)  # from the jobs' saved config.yaml
    assert report == typed_report(preset_report("inverters"), "preset")
    rows = study_rows(collect_results(inverters_sweep), report["rows"])
    # the eight's edit into an eight is a reconstruction: left out; match at g=1 repeats inverting at 1: once
    assert len(rows[(rows["inverter"] == "ddim")]) == 3 + 3 + 2 + 3 + 2
    shown, numbers = study_table(rows, report["tables"][0], Bootstrap(), "t")
    table = shown.set_index(["inverter", "inverted_at", "point"])
    assert list(table.index.get_level_values("inverted_at").unique()) == ["1", "g"]
    assert ("ddim", "g", "recon g=1") not in table.index and ("edict", "1", "recon g=1") in table.index
    assert (
        table.loc[("ddim", "1", "recon g=1"), "psnr"] == "31.00"
        and table.loc[("ddim", "1", "recon g=1"), "n"] == "3"
    )
    assert table.loc[("ddim", "g", "recon g=7.5"), "psnr"] == "38.50"  # 30 + 1 + 7.5 on average
    assert table.loc[("ddim", "1", "edit g=7.5"), "n"] == "2"
    assert table.loc[("ddim", "g", "recon g=7.5"), "forwards"] == "40"  # inversion 20 + sampling 20
    assert table.loc[("ddim", "1", "recon g=1"), "backwards"] == "0"  # missing counts as 0 (fill)
    assert table.loc[("ddim", "1", "recon g=1"), "gap_to_vae_db"] == "10.00"
    assert table.loc[("ddim", "1", "recon g=1"), "seconds_per_image"] == "3.00"  # 9 rows of 1 s, 3 images
    assert draw(inverters_sweep, tmp_path / "docs") == 0
    assert (tmp_path / "docs" / "inverters_study_table.md").read_text() == markdown(shown) + "\n"
    assert (tmp_path / "docs" / "figures" / "inverters_psnr_vs_evals.png").stat().st_size > 5_000
    recommended = rows[rows["recommended"] == "yes"].groupby("inverter")["inverted_at"].unique()
    assert set(recommended["ddim"]) == {"1"} and set(recommended["edict"]) == {"1", "g"}  # g=1: inverted at g


def test_figures_are_the_same_bytes_on_every_render(inverters_sweep, tmp_path):
    assert draw(inverters_sweep, tmp_path / "a") == 0 and draw(inverters_sweep, tmp_path / "b") == 0
    first, second = ((tmp_path / d / "figures" / "inverters_psnr_vs_evals.png").read_bytes() for d in "ab")
    assert first == second and first.startswith(b"\x89PNG") and b"matplotlib" not in first


def _broken(path: list, value, preset: str = "nfe_matched") -> dict:
    report = copy.deepcopy(preset_report(preset))
    node = report
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return report


BAD = [
    (
        ["tables", 0, "columns", 0, "show"],
        "median",
        r"report\.tables\[0\]\.columns\[0\]\.show='median' must be one of",
    ),
    (
        ["tables", 0, "columns", 0, "format"],
        ".2z",
        r"report\.tables\[0\]\.columns\[0\]\.format='\.2z' is not a number",
    ),
    (
        ["tables", 0, "file"],
        "../escape.md",
        r"report\.tables\[0\]\.file='\.\./escape\.md' must be a relative path",
    ),
    (["tables", 2, "kind"], "pivot", r"report\.tables\[2\]\.kind='pivot' must be one of groups, paired"),
    (["tables", 2, "baseline"], "ddim", r"report\.tables\[2\]: give baseline \(one\) or per \+ baselines"),
    (["rows", "derive", "prompt_kind", "format"], "{prompt}", r"derive\.prompt_kind needs exactly one of"),
    (
        ["rows", "where", "start_step"],
        {"below": 3},
        r"report\.rows\.where\.start_step: unknown test \['below'\]",
    ),
    (
        ["figures", 0, "file"],
        "nfe_matched_table.md",
        r"report\.figures\[0\]\.file='nfe_matched_table\.md' must end",
    ),
    (["figures", 0, "xscale"], "symlog", r"report\.figures\[0\]\.xscale='symlog' must be one of linear, log"),
    (
        ["tables", 0, "columns"],
        3,
        r"report \(test\): .*not a ListConfig.* \(key columns of a StudyTableSchema\)$",
    ),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_a_bad_report_section_fails_in_one_line(path, value, message):
    with pytest.raises(ReportSpecError, match=message) as err:
        typed_report(_broken(path, value), "test")
    assert "\n" not in str(err.value)


def test_ddim_lab_refuses_a_bad_report_section_before_any_work():
    cfg = lab_config("+experiment=inverters", model="digits", steps=10)
    validate(cfg)
    cfg.report.tables[0].columns[0].show = "median"
    with pytest.raises(ConfigError, match=r"^report\.tables\[0\]\.columns\[0\]\.show='median'"):
        validate(cfg)


def test_a_column_the_rows_lack_is_named_before_any_table_is_drawn(inverters_sweep, tmp_path):
    report = typed_report(_broken(["tables", 0, "group_by", 0], "invertr", "inverters"), "test")
    with pytest.raises(
        ReportSpecError, match=r"report\.tables\[0\]: no column 'invertr' .*did you mean inverter"
    ):
        check_columns(collect_results(inverters_sweep).columns, report)
    for job in inverters_sweep.iterdir():  # the same section saved with the runs: exit code 2, nothing written
        config = yaml.safe_load((job / "config.yaml").read_text())
        config["report"]["tables"][0]["group_by"][0] = "inverter_typo"
        (job / "config.yaml").write_text(yaml.safe_dump(config))
    assert draw(inverters_sweep, tmp_path / "out") == 2 and not (tmp_path / "out").exists()


def test_the_report_section_changes_no_job_config_hash():
    cfg = lab_config("+experiment=nfe_matched", "+nfe_arm=digits-ddim", model="digits")
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["report"]["tables"]
    without = {k: v for k, v in plain.items() if k != "report"}  # a run saved before `report:` existed
    assert config_hash(plain) == config_hash(without) == config_hash({**plain, "report": None})
    assert config_hash(plain) != config_hash({**plain, "num_steps": 7})


def test_runs_saved_before_report_sections_take_their_presets_section(tmp_path):
    rows = _job("ddim", 1.0)
    for n in range(2):
        save_job(tmp_path / "old" / str(n), rows, None)
        config = yaml.safe_load((tmp_path / "old" / str(n) / "config.yaml").read_text())
        config.pop("report")  # written before LabConfig had it
        (tmp_path / "old" / str(n) / "config.yaml").write_text(yaml.safe_dump(config))
    assert saved_report(tmp_path / "old") is None  # no preset recorded
    hydra = {"hydra": {"runtime": {"choices": {"experiment": "inverters", "model": "digits"}}}}
    (tmp_path / "old" / "multirun.yaml").write_text(yaml.safe_dump(hydra))
    assert saved_report(tmp_path / "old") == typed_report(preset_report("inverters"), "preset")
    save_job(tmp_path / "plain" / "0", rows, None)  # report: null, an ordinary run: nothing declared
    (tmp_path / "plain" / "multirun.yaml").write_text(yaml.safe_dump(hydra))
    assert saved_report(tmp_path / "plain") is None


def test_runs_that_declare_different_sections_are_refused(tmp_path):
    rows = _job("ddim", 1.0)
    save_job(tmp_path / "mixed" / "0", rows, preset_report("inverters"))
    save_job(tmp_path / "mixed" / "1", rows, preset_report("reconstruction"))
    with pytest.raises(
        ReportSpecError, match=r"declare 2 different report sections \(0/config\.yaml, 1/config"
    ):
        saved_report(tmp_path / "mixed")


def _edit_row(image: str, editor: str, knobs: str, start: int, success: float, unedited: float, **over) -> dict:
    return {
        **_row(image, "rf_solver" if editor == "prompt_swap" else "none", 1.0, 3.0, EIGHT, 20.0),
        "editor": editor,
        "editor_knobs": knobs,
        "start_step": start,
        "edit_success": success,
        "psnr_unedited": unedited,
        "ssim_unedited": unedited / 50,
        "nfe": 90 if editor == "prompt_swap" else 32,
        **over,
    }


def test_the_flow_editing_preset_nests_seeds_pairs_on_images_and_draws_a_trade_off(tmp_path):
    """Prompt swap (one seed) against FlowEdit (two seeds per image, in one job): the table counts rows, the
    paired difference pairs each image's seed mean with its prompt-swap row, the figure is drawn; KV-Edit
    given the masks (another protocol) is shown apart and never paired."""
    sweep, images = tmp_path / "sweep", ("one", "two", "three")
    swap = [_edit_row(im, "prompt_swap", "{}", 0, 1.0, 20.0 + n) for n, im in enumerate(images)]
    knobs = '{"n_max": 8}'
    flow = [
        _edit_row(im, "flowedit", knobs, 0, float(seed == 0), 30.0 + n + 2 * seed, seed=seed)
        for n, im in enumerate(images)
        for seed in (0, 1)
    ]
    masked = [  # the benchmark's masks as an input: another protocol, never paired with prompt swap
        _edit_row(im, "kv_edit", '{"mask": "data"}', 0, 1.0, 40.0, protocol="input-masks") for im in images
    ]
    report = preset_report("flow_editing")
    save_job(
        sweep / "0", [{**r, "protocol": "score-only"} for r in swap], report, editor={"name": "prompt_swap"}
    )
    save_job(sweep / "1", [{**r, "protocol": "score-only"} for r in flow], report, editor={"name": "flowedit"})
    save_job(sweep / "2", masked, report, editor={"name": "kv_edit"})
    report = saved_report(sweep)
    rows = study_rows(collect_results(sweep), report["rows"])
    assert set(rows["setting"]) >= {"prompt_swap {} k=0 g=3", 'flowedit {"n_max": 8} k=0 g=3'}
    shown, _ = study_table(rows, report["tables"][0], Bootstrap(resamples=200), "t")
    assert shown.set_index("editor").loc["flowedit", "n"] == "6"  # three images × two seeds
    assert shown.set_index("editor").loc["kv_edit", "protocol"] == "input-masks"  # shown apart
    paired, _ = study_table(rows, report["tables"][1], Bootstrap(resamples=200), "p")
    assert not paired["arm − baseline"].str.startswith("kv_edit").any()  # no pair across protocols
    psnr = paired[paired["metric"] == "psnr_unedited"].iloc[0]
    assert psnr["pairs"] == "3" and psnr["difference [95% CI]"].startswith("11.000")  # 30 + 1 (seed mean) − 20
    success = paired[paired["metric"] == "edit_success"].iloc[0]
    assert success["difference [95% CI]"].startswith("-0.500")  # half the seeds succeed
    assert draw(sweep, tmp_path / "docs") == 0
    assert (tmp_path / "docs" / "figures" / "flow_editing_pareto.png").stat().st_size > 5_000
