"""Tests for ddim_lab.report.main: merging run directories, the markdown summary, figures and the CLI."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ddim_lab.report.main import collect_results, main, summarize, varying_columns, write_report
from ddim_lab.study.records import write_results


def _rows(num_steps: int, psnrs: list[float], lpips: list[float], guidance: float = 1.0, start: int = 0):
    return [
        {
            "image": f"img{i}",
            "model": "digits",
            "inverter": "ddim",
            "num_steps": num_steps,
            "guidance_scale": guidance,
            "start_step": start,
            "psnr": p,
            "ssim": 0.5 + p / 100,
            "lpips": lp,
            "unet_evals": 2 * num_steps,
        }
        for i, (p, lp) in enumerate(zip(psnrs, lpips, strict=True))
    ]


@pytest.fixture
def multirun(tmp_path):
    """A fake Hydra multirun dir: job 0 at 10 steps (LPIPS not measured), job 1 at 20 steps."""
    root = tmp_path / "multirun"
    write_results(_rows(10, [20.0, 22.0], [math.nan, math.nan]), root / "0")
    write_results(_rows(20, [30.0, 34.0], [0.1, 0.3]), root / "1")
    return root


def _md_rows(text: str) -> list[dict[str, str]]:
    """Parse the first markdown table of ``text`` into dicts of header → cell."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def test_merges_runs_with_run_dir(multirun):
    df = write_report(multirun, multirun)
    assert len(df) == 4
    assert sorted(df["run_dir"].unique()) == ["0", "1"]
    assert df.loc[df["run_dir"] == "1", "psnr"].tolist() == [30.0, 34.0]
    back = pd.read_parquet(multirun / "report.parquet")
    assert len(back) == 4 and "run_dir" in back.columns
    assert varying_columns(back) == ["num_steps"]


def test_varying_columns_detects_only_what_changes(tmp_path):
    root = tmp_path / "m"
    write_results(_rows(10, [1.0], [0.1], guidance=1.0), root / "a")
    write_results(_rows(10, [2.0], [0.2], guidance=3.5), root / "b" / "nested")
    df = write_report(root, tmp_path / "out")
    assert varying_columns(df) == ["guidance_scale"]
    assert sorted(df["run_dir"]) == ["a", "b/nested"]


def test_single_run_dir(tmp_path):
    write_results(_rows(10, [1.0, 3.0], [0.1, 0.2]), tmp_path)
    df = write_report(tmp_path, tmp_path)
    assert df["run_dir"].tolist() == [".", "."]
    table = _md_rows((tmp_path / "report.md").read_text())
    assert len(table) == 1 and table[0]["n"] == "2"
    assert table[0]["psnr"].startswith("2 ± 1.414")


def test_summary_means_and_missing_lpips(multirun):
    write_report(multirun, multirun)
    text = (multirun / "report.md").read_text()
    assert "- rows: 4" in text and "- runs: 2" in text and "- images: 2" in text
    assert "- not measured in any row: latent_mse, vae_psnr, seconds" in text
    table = {r["num_steps"]: r for r in _md_rows(text)}
    assert list(table) == ["10", "20"]  # sorted by the varying column
    assert table["10"]["psnr"].startswith("21 ± 1.414")
    assert table["20"]["psnr"].startswith("32 ± 2.828")
    assert table["10"]["lpips"] == "n/a"  # never measured: missing, not 0
    assert table["20"]["lpips"].startswith("0.2 ± 0.1414")
    assert table["10"]["unet_evals"] == "20 ± 0"


def test_missing_lpips_stays_missing_in_csv(multirun):
    write_report(multirun, multirun)
    csv = pd.read_csv(multirun / "report.csv")
    lp = csv.set_index(["run_dir", "image"])["lpips"]
    assert lp.loc[(0, "img0")] != lp.loc[(0, "img0")]  # NaN
    assert lp.loc[(1, "img1")] == pytest.approx(0.3)
    raw = (multirun / "report.csv").read_text().splitlines()
    header = raw[0].split(",")
    assert raw[1].split(",")[header.index("lpips")] == ""  # written as an empty cell, not 0


def test_summarize_without_varying_columns(tmp_path):
    df = pd.DataFrame({"model": ["m", "m"], "psnr": [10.0, 14.0], "lpips": [np.nan, 0.5]})
    table = summarize(df)
    assert list(table.columns) == ["n", "psnr", "lpips"]
    assert table.iloc[0]["lpips"] == "0.5"  # one value: no ± std


def test_cli_empty_dir_exits_2(tmp_path, caplog):
    assert main([str(tmp_path)]) == 2
    assert "no results.parquet" in caplog.text
    assert not (tmp_path / "report.md").exists()


def test_cli_empty_dir_message_on_stderr(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ddim_lab.report.main", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no results.parquet" in proc.stderr and proc.stdout == ""


def test_cli_figures_vs_num_steps(multirun, tmp_path):
    out = tmp_path / "report"
    assert main([str(multirun), "--out", str(out), "--figures"]) == 0
    for name in ("report.parquet", "report.csv", "report.md", "fig_psnr.png", "fig_ssim.png", "fig_lpips.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "fig_psnr.png").size[0] > 100
    assert not (multirun / "report.md").exists()  # --out respected


def test_figures_vs_start_step_and_skip_all_missing(tmp_path):
    root = tmp_path / "m"
    for k in (0, 5, 10):
        write_results(_rows(20, [20.0 + k], [math.nan], start=k), root / str(k))
    assert main([str(root), "--figures"]) == 0
    assert (root / "fig_psnr.png").is_file() and (root / "fig_ssim.png").is_file()
    assert not (root / "fig_lpips.png").exists()  # no LPIPS values: no plot of zeros


def test_figures_read_saved_tables(multirun, tmp_path):
    from ddim_lab.report.main import make_figures

    write_report(multirun, tmp_path)
    df = pd.read_parquet(tmp_path / "report.parquet")
    df["num_steps"] = 10  # nothing varies any more in the saved table
    df.to_parquet(tmp_path / "report.parquet")
    assert make_figures(tmp_path) == []


def test_report_lists_failed_and_missing_jobs_and_reads_unfinished_parts(tmp_path):
    import json

    from ddim_lab.study.records import write_part
    from ddim_lab.study.sweep import SWEEP_JSON, claim, mark_done, record_failure

    root = tmp_path / "sweep"
    jobs = [{"num": i, "dir": str(i), "overrides": [f"num_steps={10 * (i + 1)}"]} for i in range(4)]
    root.mkdir()
    (root / SWEEP_JSON).write_text(json.dumps({"jobs": jobs}))
    claim(root / "0", "h0", jobs[0]["overrides"])
    write_results(_rows(10, [20.0], [0.1]), root / "0")
    mark_done(root / "0", "h0")
    record_failure(root / "1", MemoryError("CUDA out of memory"), None, jobs[1]["overrides"])
    claim(root / "2", "h2", jobs[2]["overrides"])  # killed after its first image group
    write_part(_rows(30, [25.0], [0.2]), root / "2", "g00000")
    # job 3 never started
    df = write_report(root, root)
    assert sorted(df.run_dir.unique()) == ["0", "2"] and len(df) == 2
    text = (root / "report.md").read_text()
    assert "Failed or missing jobs (3)" in text
    assert "job 1 [num_steps=20] failed: MemoryError: CUDA out of memory" in text
    assert "job 2 [num_steps=30] unfinished" in text and "job 3 [num_steps=40] missing" in text


def test_report_never_pools_dtypes_seeds_or_prompts(tmp_path):
    """`ddim-lab -m runtime.dtype=fp32,bf16` used to give one pooled row: the schema's config keys split it."""
    root = tmp_path / "m"
    for j, (dtype, seed) in enumerate((("fp32", 0), ("bf16", 0), ("fp32", 1))):
        rows = [{**r, "dtype": dtype, "seed": seed} for r in _rows(10, [20.0 + j, 21.0 + j], [0.1, 0.2])]
        write_results(rows, root / str(j))
    df = write_report(root, root)
    assert varying_columns(df) == ["seed", "dtype"]
    table = _md_rows((root / "report.md").read_text())
    assert len(table) == 3 and all(r["n"] == "2" for r in table)


def test_cli_intervals_paired_html_and_protocol_line(tmp_path, caplog):
    root = tmp_path / "m"
    for j, inverter in enumerate(("ddim", "null_text")):
        rows = [{**r, "inverter": inverter} for r in _rows(10, [20.0 + j, 22.0 + j, 25.0 + j], [0.1, 0.2, 0.3])]
        write_results(rows, root / inverter)
    args = [str(root), "--html", "--figures", "--resamples", "100", "--seed", "3", "--ci-method", "bca"]
    assert main(args) == 0
    text = (root / "report.md").read_text()
    assert "## Means with bootstrap intervals" in text and "100 resamples, seed 3" in text
    assert "## Paired comparisons of `inverter`" in text and "null_text − ddim" in text
    for name in ("intervals.csv", "intervals.tex", "paired.csv", "paired.tex", "report.html"):
        assert (root / name).is_file(), name
    paired = pd.read_csv(root / "paired.csv")
    assert paired.loc[paired.metric == "psnr", "diff_mean"].tolist() == [pytest.approx(1.0)]
    # rows of two protocols: grouped apart, never paired across, and the report says why in one line
    write_results([{**r, "protocol": "p2"} for r in _rows(10, [30.0], [0.1])], root / "other")
    assert main([str(root), "--resamples", "50"]) == 0
    lines = [ln for ln in (root / "report.md").read_text().splitlines() if "protocols" in ln]
    assert len(lines) == 1 and "not comparable" in lines[0]
    assert main([str(root), "--baseline", "edict"]) == 2 and "not a value of 'inverter'" in caplog.text


def test_runs_that_differ_only_in_an_inverter_knob_are_not_pooled(tmp_path):
    for n, iters in enumerate((1, 5)):
        rows = [
            {
                "image": f"{i}.png",
                "inverter": "fixed_point",
                "inverter_knobs": f'{{"iters": {iters}}}',
                "psnr": 30.0 + iters,
            }
            for i in range(3)
        ]
        write_results(rows, tmp_path / str(n))
    df = collect_results(tmp_path)
    assert "inverter_knobs" in varying_columns(df)
    assert len(summarize(df)) == 2
