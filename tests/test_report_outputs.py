"""Tests for the report's schema-driven grouping, interval tables, figures, qualitative grids and HTML page."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ddim_lab import schema
from ddim_lab.report.analysis import analyze
from ddim_lab.report.figures import metric_figures, pareto_figures, pareto_front
from ddim_lab.report.html import render_html, write_outputs
from ddim_lab.report.saved_grids import grid_geometry
from ddim_lab.report.stats import Bootstrap
from ddim_lab.report.tables import intervals_markdown, write_tables
from ddim_lab.report.text import latex
from ddim_lab.study import records
from ddim_lab.study.records import results_frame, write_results

FAST = Bootstrap(resamples=200, seed=0)


def _row(image: str, **over) -> dict:
    base = {
        "image": image,
        "prompt": "a digit",
        "edit_prompt": None,
        "negative_prompt": "",
        "task": "reconstruct",
        "model": "digits",
        "scheduler": "ddim",
        "inverter": "ddim",
        "num_steps": 10,
        "inversion_guidance_scale": 1.0,
        "guidance_scale": 1.0,
        "start_step": 0,
        "eta": 0.0,
        "seed": 0,
        "dtype": "fp32",
        "psnr": 20.0 + len(image) % 3,
        "ssim": 0.8,
        "lpips_net": "alex",
        "vae_psnr": 35.0,
        "unet_evals": 10,
        "inversion_unet_backwards": 0,
    }
    return {**base, **over}


def _frame(rows: list[dict]) -> pd.DataFrame:
    return results_frame(rows).assign(run_dir=".")


# -- schema ---------------------------------------------------------------------------------------------


def test_schema_roles_and_the_written_dtypes():
    frame = records.results_frame([{"image": "a", "num_steps": 10, "psnr": 30, "inversion_cached": True}])
    for column in schema.SCHEMA:
        if column.core and column.dtype != schema.STR:  # text columns keep pandas' own string dtype
            assert str(frame[column.name].dtype) == column.dtype, column.name
    for name in ("dtype", "seed", "prompt", "negative_prompt", "lpips_net", "protocol"):
        assert schema.BY_NAME[name].role == schema.CONFIG
    for name in ("unet_evals", "inversion_unet_evals", "inversion_unet_backwards", "seconds", "peak_memory_mb"):
        assert schema.BY_NAME[name].role == schema.COST, name
    assert schema.BY_NAME["vae_psnr"].role == schema.BY_NAME["vae_lpips"].role == schema.REFERENCE
    assert {"psnr", "ssim", "lpips", "latent_mse", "edit_success"} <= set(schema.METRICS)
    assert schema.BY_NAME["image"].role == schema.BOOKKEEPING


@pytest.mark.parametrize(
    ("column", "a", "b"),
    [
        ("dtype", "fp32", "bf16"),
        ("prompt", "a digit", "a number"),  # seed: one run's seeds are replicates (test_seed_replicates_report)
        ("negative_prompt", "", "blurry"),
        ("lpips_net", "alex", "squeeze"),
    ],
)
def test_rows_of_different_configs_are_never_pooled(column, a, b):
    rows = [_row(f"img{i}", **{column: v}) for v in (a, b) for i in range(3)]
    analysis = analyze(_frame(rows), FAST)
    assert column in analysis.keys
    assert len(analysis.intervals) == 2 and list(analysis.intervals["n"]) == [3, 3]


def test_per_image_prompts_do_not_split_groups():
    rows = [_row(f"img{i}", prompt=f"digit {i}") for i in range(4)]
    analysis = analyze(_frame(rows), FAST)
    assert analysis.keys == [] and analysis.attributes == ["prompt"] and len(analysis.intervals) == 1
    assert any("one value per image" in n for n in analysis.notes)


def test_protocols_are_never_averaged_and_the_report_says_why():
    rows = [
        _row(f"img{i}", protocol=p, inverter=inv)
        for p in ("pA", "pB")
        for inv in ("ddim", "edict")
        for i in range(3)
    ]
    df = _frame(rows)
    analysis = analyze(df, FAST)
    assert "protocol" in analysis.keys and len(analysis.intervals) == 4
    lines = [n for n in analysis.notes if "protocols" in n]
    assert len(lines) == 1 and "pA, pB" in lines[0] and "not comparable" in lines[0]
    assert analysis.compare == "inverter" and set(analysis.paired["protocol"]) == {"pA", "pB"}
    assert lines[0] in intervals_markdown(analysis)


def test_reconstruction_rows_with_null_edit_prompt_are_kept():
    rows = [_row(f"img{i}", edit_prompt=ep) for ep in (None, "an eight") for i in range(3)]
    analysis = analyze(_frame(rows), FAST)
    assert analysis.keys == ["edit_prompt"] and list(analysis.intervals["n"]) == [3, 3]
    assert "(reconstruction)" in intervals_markdown(analysis)


def test_undeclared_columns_float_is_metric_text_is_config():
    rows = [_row(f"img{i}", clip_score=0.1 * i, editor=e) for e in ("p2p", "swap") for i in range(2)]
    analysis = analyze(_frame(rows), FAST)
    assert "editor" in analysis.keys and "clip_score" in analysis.metrics


# -- tables ---------------------------------------------------------------------------------------------


def _two_inverters(images: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.normal(25, 2, images)
    rows = []
    for j, inverter in enumerate(("ddim", "null_text")):
        for steps in (10, 20):
            for i in range(images):
                rows.append(
                    _row(
                        f"img{i}",
                        inverter=inverter,
                        num_steps=steps,
                        psnr=base[i] + j + steps / 10,
                        ssim=0.7 + 0.01 * j,
                        unet_evals=steps,
                    )
                )
    return _frame(rows)


def test_tables_markdown_csv_latex(tmp_path):
    analysis = analyze(_two_inverters(), FAST)
    assert analysis.keys == ["inverter", "num_steps"] and analysis.compare == "inverter"
    names = sorted(p.name for p in write_tables(analysis, tmp_path))
    assert names == [
        "costs.csv",
        "costs.md",
        "costs.tex",
        "intervals.csv",
        "intervals.json",
        "intervals.md",
        "intervals.tex",
        "paired.csv",
        "paired.md",
        "paired.tex",
    ]
    recorded = json.loads((tmp_path / "intervals.json").read_text())
    assert recorded["bootstrap"] == {"resamples": 200, "seed": 0, "confidence": 0.95, "method": "percentile"}
    csv = pd.read_csv(tmp_path / "intervals.csv")
    assert {"psnr_mean", "psnr_low", "psnr_high", "psnr_n"} <= set(csv.columns) and len(csv) == 4
    assert (csv["psnr_low"] <= csv["psnr_mean"]).all() and (csv["psnr_mean"] <= csv["psnr_high"]).all()
    md = (tmp_path / "intervals.md").read_text()
    assert "200 resamples, seed 0" in md and "psnr (dB)" in md and " [" in md
    tex = (tmp_path / "intervals.tex").read_text()
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"null\_text", r"num\_steps"):
        assert token in tex
    paired = pd.read_csv(tmp_path / "paired.csv")
    psnr = paired[paired.metric == "psnr"].set_index("num_steps")
    assert psnr["diff_mean"].to_numpy() == pytest.approx([1.0, 1.0]) and (psnr["pairs"] == 12).all()
    assert "null_text − ddim" in (tmp_path / "paired.md").read_text()
    # costs are in their own table, never paired; the VAE ceiling is averaged, never paired
    assert set(paired["metric"]) == {"psnr", "ssim"}
    costs = pd.read_csv(tmp_path / "costs.csv")
    assert list(costs["unet_evals_mean"]) == [10, 20, 10, 20] and "psnr_mean" not in costs.columns
    assert "unet_evals (model evals)" in (tmp_path / "costs.md").read_text()
    assert "vae_psnr (dB)" in md and "unet_evals" not in md


def test_latex_escapes_specials():
    tex = latex(pd.DataFrame({"a_b": ["50% & $x#"]}), "cap_1", "tab:x")
    assert r"a\_b" in tex and r"50\% \& \$x\#" in tex and r"cap\_1" in tex


def test_outputs_are_deterministic(tmp_path):
    df = _two_inverters()
    for out in ("a", "b"):
        write_outputs(df, tmp_path, tmp_path / out, FAST)
    for name in ("intervals.csv", "paired.csv", "intervals.tex"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# -- figures --------------------------------------------------------------------------------------------


def test_metric_figures_with_bands_and_ceiling(tmp_path):
    analysis = analyze(_two_inverters(), FAST)
    paths = metric_figures(analysis, tmp_path)
    assert [p.name for p in paths] == ["fig_psnr.png", "fig_ssim.png"]  # lpips: never measured, no figure
    assert Image.open(paths[0]).size[0] >= 700


def test_pareto_front_and_figure(tmp_path):
    assert list(pareto_front(np.array([1, 2, 3, 2.0]), np.array([3, 2, 1, 1.0]))) == [True, True, True, False]
    rows = [
        _row(
            f"img{i}",
            task="edit",
            edit_prompt="an eight",
            guidance_scale=g,
            inverter=inv,
            edit_success=float((i + int(g)) % 2),
            ssim=0.9 - g / 20,
        )
        for inv in ("ddim", "null_text")
        for g in (1.0, 4.0)
        for i in range(4)
    ]
    paths = pareto_figures(analyze(_frame(rows), FAST), tmp_path)
    assert [p.name for p in paths] == ["pareto_ssim.png", "pareto_psnr.png"]
    assert pareto_figures(analyze(_two_inverters(), FAST), tmp_path) == []  # no edit_success column


def _save_grids(run_dir: Path, images: list[str], group: int, points: int, size: int = 16) -> None:
    """Grids as the experiment saves them: ``group`` images per grid, input + VAE + one column per point; each
    image's tiles are filled with a gray level from its index."""
    import torch

    for n, first in enumerate(range(0, len(images), group)):
        part = images[first : first + group]
        level = torch.tensor([(first + k + 1) / (len(images) + 1) for k in range(len(part))])
        tile = level[:, None, None, None].expand(len(part), 3, size, size)
        columns = [("input", tile), ("VAE round-trip", tile)] + [(f"g=1 k={j}", tile) for j in range(points)]
        records.save_grid(run_dir / f"grid_{n:03d}.png", columns, [f"{p}: a digit" for p in part])


def test_grid_geometry_recovers_save_grid_layout(tmp_path):
    for size, group, points in ((16, 3, 2), (64, 2, 5), (200, 1, 1)):
        _save_grids(tmp_path, [f"img{i}" for i in range(group)], group, points, size)
        img = Image.open(tmp_path / "grid_000.png")
        rows, header, cell, cols = grid_geometry(img.width, img.height, 2 + points)
        assert (rows, cols) == (group, 2 + points) and cell == max(size, 128)


def _sweep_with_grids(tmp_path: Path, n_images: int = 5, inverters=("ddim", "null_text")) -> Path:
    root = tmp_path / "sweep"
    images = [f"img{i}.png" for i in range(n_images)]
    for j, inverter in enumerate(inverters):
        rows = [
            _row(name, inverter=inverter, start_step=k, psnr=20.0 + i + j + k)
            for i, name in enumerate(images)
            for k in (0, 5)
        ]
        write_results(rows, root / str(j))
        _save_grids(root / str(j), images, group=2, points=2)
    return root


def test_qualitative_grid_puts_the_arms_side_by_side_with_one_input_and_vae_column(tmp_path):
    from ddim_lab.report.main import collect_results

    root = _sweep_with_grids(tmp_path)
    df = collect_results(root)
    _, files = write_outputs(df, root, tmp_path / "out", FAST, figures=True, images=["img3", "missing"])
    qual = tmp_path / "out" / "qual_01.png"
    assert qual in files and len(list((tmp_path / "out").glob("qual_*.png"))) == 1
    img = np.asarray(Image.open(qual).convert("L"), dtype=float)
    expected = 255 * 4 / 6  # img3 is the 4th of 5 images: its tiles hold gray level 4/6
    tiles = np.sum(np.abs(img - expected) < 1.5)
    # input and VAE once (both runs' are the same), then two runs × two grid points: 6 tiles of 128 px, not 8
    assert 6 * 128 * 128 * 0.95 <= tiles <= 6 * 128 * 128 * 1.05
    for other in (1, 2, 3, 5):  # no tile of another image
        assert np.sum(np.abs(img - 255 * other / 6) < 1.5) < 128 * 128


# -- HTML -----------------------------------------------------------------------------------------------


def test_html_page_opens_offline_sorts_and_shows_grids_by_default(tmp_path):
    from ddim_lab.report.grids import PER_GRID
    from ddim_lab.report.main import collect_results

    root = _sweep_with_grids(tmp_path, n_images=PER_GRID + 3)
    df = collect_results(root)
    _, files = write_outputs(df, root, tmp_path / "out", FAST, figures=True, page=True)  # no --images
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<table class='sortable'") >= 5  # intervals, costs, paired, arms, rows of the subset
    assert "data:image/png;base64," in page and "sortTable" in page and "<style>" in page  # figures inline
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing to fetch
    assert "Paired comparisons of inverter" in page and "200 resamples, seed 0" in page
    # one grid of the first PER_GRID images, a file beside the page that the browser loads lazily
    grids = re.findall(r"<img loading='lazy'[^>]*src='([^']+)'", page)
    assert grids == ["qual_01.png"] and tmp_path / "out" / "qual_01.png" in files
    assert f"{PER_GRID} of {PER_GRID + 3} images" in page and "img7.png" in page and "img8.png</td>" not in page
    # --images still chooses, in subsets of PER_GRID
    wanted = [f"img{i}" for i in range(PER_GRID + 2)]
    write_outputs(df, root, tmp_path / "chosen", FAST, page=True, images=wanted)
    page = (tmp_path / "chosen" / "report.html").read_text()
    assert re.findall(r"<img loading='lazy'[^>]*src='([^']+)'", page) == ["qual_01.png", "qual_02.png"]


def test_html_escapes_and_handles_no_figures():
    rows = [_row(f"img{i}", prompt="<b>x</b>", inverter=inv) for inv in ("a<", "b") for i in range(2)]
    page = render_html(analyze(_frame(rows), FAST))
    assert "a&lt;" in page and "<b>x</b>" not in page


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_html_renders_and_sorts_in_headless_chromium(tmp_path):
    if shutil.which("chromium") is None:  # CI installs it (.ci/run): there a missing browser is a failure
        message = "headless Chromium is not installed (apt-get install chromium): the page needs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from ddim_lab.report.main import collect_results

    root = _sweep_with_grids(tmp_path, inverters=("ddim", "null_text", "direct"))
    write_outputs(collect_results(root), root, tmp_path, FAST, page=True, images=["img1"])
    page = (tmp_path / "report.html").as_uri()
    shot = tmp_path / "shot.png"
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    cmd = ["chromium", *CHROMIUM_FLAGS, profile, f"--screenshot={shot}", "--window-size=1400,3000", page]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (3000, 1400) and pixels.std() > 10  # something was drawn, not a blank page
    # the grid was loaded and drawn: img1's tiles (gray 2/6) once for input and VAE, then 3 arms × 2 points
    assert np.sum(np.abs(pixels - 255 * 2 / 6) < 2) >= 8 * 128 * 128 * 0.9
    # the sorting script: psnr (column 4) descending, applied by the page's own JS, read back from the DOM;
    # Direct inversion's reconstructions (by construction) sort after every measured group
    dom = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, profile, "--dump-dom", page + "#sort=intervals:4:desc"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    table = dom[dom.index('id="intervals"') :]
    body = table[table.index("<tbody>") : table.index("</tbody>")]
    order = [tuple(re.findall(r"<td[^>]*>([^<]*)</td>", row)[1:3]) for row in body.split("</tr>")[:-1]]
    measured = [("null_text", "5"), ("ddim", "5"), ("null_text", "0"), ("ddim", "0")]
    assert order[:4] == measured and sorted(order[4:]) == [("direct", "0"), ("direct", "5")]


def test_benchmark_script_runs_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark_report.py", "--rows", "200", "--html", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report of 200 rows" in proc.stdout and (tmp_path / "report.html").is_file()


def test_empty_and_null_edit_prompt_are_one_reconstruction_group():
    rows = [_row(f"img{i}", edit_prompt=ep) for ep in (None, "") for i in range(2)]
    rows += [_row(f"img{i}", edit_prompt="an eight") for i in range(2)]
    analysis = analyze(_frame(rows), FAST)
    assert analysis.keys == ["edit_prompt"] and sorted(analysis.intervals["n"]) == [2, 4]


def test_compare_on_protocol_is_refused_with_a_note():
    rows = [_row(f"img{i}", protocol=p) for p in ("pA", "pB") for i in range(2)]
    analysis = analyze(_frame(rows), FAST, compare="protocol")
    assert analysis.compare is None and any("across protocols" in n for n in analysis.notes)


def test_per_image_edit_prompts_beside_reconstructions_group_as_two_values():
    """PIE-Bench: each image has its own target prompt, plus reconstruction rows (null)."""
    rows = [_row(f"img{i}", edit_prompt=ep) for i in range(4) for ep in (None, f"digit {i} as an eight")]
    analysis = analyze(_frame(rows), FAST)
    assert analysis.keys == ["edit_prompt"] and list(analysis.intervals["n"]) == [4, 4]
    assert any("(per image)" in n and "edit_prompt" in n for n in analysis.notes)
    one_target = [_row(f"img{i}", edit_prompt=ep) for i in range(4) for ep in (None, "an eight")]
    assert "an eight" in set(analyze(_frame(one_target), FAST).intervals["edit_prompt"])  # a plain key


def test_inverters_are_compared_with_ddim_by_default():
    rows = [
        _row(f"img{i}", inverter=inv, psnr=20.0 + i + j)
        for j, inv in enumerate(("bdia", "ddim", "edict"))
        for i in range(3)
    ]
    paired = analyze(_frame(rows), FAST).paired
    assert set(paired["baseline"]) == {"ddim"} and set(paired["other"]) == {"bdia", "edict"}


# -- outcomes, references and costs ----------------------------------------------------------------------


def test_costs_are_never_paired_and_a_cached_inversion_is_reported_at_its_cost(tmp_path):
    """Issue 16: `p2p − prompt_swap | inversion_unet_evals | 25 [25, 25] | p 7.7e-06` came from one arm
    reusing the other's cached inversion; costs now sit in their own table, the cached arm at its cost."""
    rows = [
        _row(
            f"img{i}",
            task="edit",
            edit_prompt="an eight",
            editor=editor,
            psnr=20.0 + i + (0.5 if editor == "p2p" else 0.0) * (1 + i % 3),
            unet_evals=50,
            inversion_unet_evals=25,
            inversion_cached=editor == "p2p",  # p2p read prompt_swap's inversion from the cache
            seconds=0.1 * (1 + i),
        )
        for editor in ("prompt_swap", "p2p")
        for i in range(12)
    ]
    analysis = analyze(_frame(rows), FAST, compare="editor", baseline="prompt_swap")
    assert set(analysis.paired["metric"]) == {"psnr", "ssim"}  # outcomes only
    assert analysis.references == ["vae_psnr"] and "unet_evals" in analysis.costs
    md = intervals_markdown(analysis)
    paired = md[md.index("## Paired") :]
    assert "inversion_unet_evals" not in paired and "vae_psnr" not in paired and "seconds" not in paired
    spent = md[md.index("## What each arm spent") : md.index("## Paired")]
    table = {
        line.split("|")[2].strip(): line
        for line in spent.splitlines()
        if line.startswith("| ") and "#" not in line
    }
    assert "| 25 |" in table["p2p"] and "12 of 12" in table["p2p"] and "0 of 12" in table["prompt_swap"]
    assert "0.65 [" in table["p2p"]  # seconds vary: their interval is shown; constant counts are one number


def test_tables_written_before_cached_costs_show_them_as_unrecorded():
    rows = [_row(f"img{i}", inversion_unet_evals=0, inversion_cached=True) for i in range(3)]
    rows += [
        _row(f"img{i}", inverter="edict", inversion_unet_evals=20, inversion_cached=False) for i in range(3)
    ]
    rows += [  # inverter=none (the clean latent) costs 0 by its formula, cached or not
        _row(f"img{i}", inverter="none", inversion_unet_evals=0, inversion_cached=True) for i in range(3)
    ]
    analysis = analyze(_frame(rows), FAST)
    costs = analysis.intervals.set_index("inverter")["inversion_unet_evals_mean"]
    assert np.isnan(costs["ddim"]) and costs["edict"] == 20 and costs["none"] == 0
    assert any("3 rows with a cached inversion record 0" in n for n in analysis.notes)


def test_paired_tests_refuse_costs_and_references():
    from ddim_lab.report.stats import paired_comparisons

    df = _frame([_row(f"img{i}", inverter=inv) for inv in ("ddim", "edict") for i in range(3)])
    for column in ("unet_evals", "seconds", "vae_psnr"):
        with pytest.raises(ValueError, match="outcome metrics only"):
            paired_comparisons(df, "inverter", ["inverter"], ["psnr", column], FAST)


def test_the_protocol_warning_names_real_differences_or_stays_silent(tmp_path):
    """`rows come from 2 protocols ((none), (none))`: a missing protocol written as None by one task and
    absent from another's table is one value."""
    from ddim_lab.report.main import collect_results

    write_results([_row(f"img{i}", protocol=None) for i in range(2)], tmp_path / "a")
    write_results([_row(f"img{i}", task="controlnet", inverter=None) for i in range(2)], tmp_path / "b")
    df = collect_results(tmp_path)
    assert df["protocol"].isna().all()
    analysis = analyze(df, FAST)
    assert "protocol" not in analysis.keys and not [n for n in analysis.notes if "protocol" in n]
    write_results([_row(f"img{i}", protocol="pie-v1") for i in range(2)], tmp_path / "c")
    notes = [n for n in analyze(collect_results(tmp_path), FAST).notes if "protocols" in n]
    assert len(notes) == 1 and "2 protocols (pie-v1, (none))" in notes[0]


def test_direct_reconstructions_are_marked_listed_last_and_never_paired(tmp_path):
    rows = [
        _row(
            f"img{i}",
            inverter=inv,
            edit_prompt=target,
            psnr=(60.0 if inv == "direct" and not target else 25.0) + i,
        )
        for inv in ("ddim", "direct", "edict")
        for target in (None, "an eight")
        for i in range(4)
    ]
    analysis = analyze(_frame(rows), FAST)
    t = analysis.intervals
    assert list(t["by_construction"]) == [False] * 5 + [True]
    assert t.iloc[-1]["inverter"] == "direct" and pd.isna(t.iloc[-1]["edit_prompt"])
    shown = intervals_markdown(analysis)
    marked = [line for line in shown.splitlines() if "† 6" in line]
    assert len(marked) == 1 and "| 6 | (reconstruction) | direct |" in marked[0]
    assert any("return the input by construction" in n for n in analysis.notes)
    pairs = analysis.paired
    assert not ((pairs["other"] == "direct") & pairs["edit_prompt"].isna()).any()  # the marked group: untested
    assert ((pairs["other"] == "direct") & (pairs["edit_prompt"] == "an eight")).any()  # its edits are
    write_tables(analysis, tmp_path)
    assert "by construction" in (tmp_path / "intervals.md").read_text()
    assert r"\dag{}" in (tmp_path / "intervals.tex").read_text()


def test_budget_rows_are_grouped_by_budget_and_paired_across_each_methods_steps():
    per_step = {"flow_euler": 2, "rf_solver": 4}
    rows = [
        _row(
            f"img{i}",
            inverter=inv,
            budget_nfe=budget,
            num_steps=budget // cost,
            nfe=budget // cost * cost - (1 if inv == "rf_solver" else 0),
            psnr=20.0 + budget / 10 + i + (1.0 if inv == "rf_solver" else 0.0),
        )
        for inv, cost in per_step.items()
        for budget in (10, 20)
        for i in range(4)
    ]
    analysis = analyze(_frame(rows), FAST, compare="inverter")
    assert analysis.strata == ["budget_nfe"]  # num_steps follows from the budget: not a stratum
    psnr = analysis.paired[analysis.paired["metric"] == "psnr"].set_index("budget_nfe")
    assert list(psnr.index) == [10, 20] and psnr["diff_mean"].to_numpy() == pytest.approx([1.0, 1.0])
    lines = intervals_markdown(analysis).splitlines()
    header = next(line for line in lines if line.startswith("| # |"))
    assert "nfe (model evals)" in header and header.index("nfe") < header.index("psnr")
    cells = [[c.strip() for c in line.split("|")] for line in lines if line.startswith("| 1 |")]
    assert cells[0][1:7] == ["1", "flow_euler", "5", "10", "4", "10"]  # #, inverter, N, budget, n, nfe
    one = analyze(_frame([r for r in rows if r["budget_nfe"] == 20]), FAST)
    assert "budget_nfe" not in one.keys and any("every row at budget_nfe=20" in n for n in one.notes)
    assert len(one.paired) == 2 and one.strata == []  # psnr and ssim, flow_euler against rf_solver


def test_figures_plot_budgets_name_steps_and_tell_coinciding_lines_apart(tmp_path):
    from ddim_lab.report.figures import X_LABELS, coinciding, figure_x

    assert figure_x(["inverter", "num_steps", "budget_nfe"], ["num_steps"]) == "budget_nfe"
    assert figure_x(["inverter", "num_steps"], ["num_steps"]) is None  # one budget: N is each method's
    assert figure_x(["num_steps", "start_step"]) == "num_steps" and X_LABELS["num_steps"] == "steps N"
    x = np.array([5.0, 10.0, 20.0])
    lines = [(x, np.array([30.0, 31, 32])), (x, np.array([26.0, 28, 29])), (x, np.array([30.0, 31, 32.001]))]
    lines.append((x, np.array([30.0, 31, 32])))
    assert coinciding(lines, scale=6.0) == [[0, 2, 3]]
    assert coinciding([(x, x), (x[:2], x[:2])], scale=1.0) == []  # other x values never coincide
    rows = [
        _row(f"img{i}", inverter=inv, num_steps=n, psnr=25.0 + i)
        for inv in ("edict", "bdia", "ddim")
        for n in (5, 10)
        for i in range(3)
    ]
    assert [p.name for p in metric_figures(analyze(_frame(rows), FAST), tmp_path)] == [
        "fig_psnr.png",
        "fig_ssim.png",
    ]


def test_legends_and_captions_name_knobs_without_cutting_them():
    from ddim_lab.report.figures import _series_label, pareto_caption
    from ddim_lab.report.text import config_label

    knobs = '{"blend_threshold": 0.3, "blend_words": null, "cross_replace": 0.8, "self_replace": 0.4}'
    assert config_label(["editor", "editor_knobs", "guidance_scale"], ("p2p", knobs, 7.5)) == (
        "editor=p2p (blend_threshold=0.3, blend_words=null, cross_replace=0.8, self_replace=0.4), "
        "guidance_scale=7.5"
    )
    assert config_label(["inverter", "inverter_knobs"], ("ddim", "{}")) == "inverter=ddim"
    label = _series_label(["editor", "editor_knobs", "guidance_scale"], ("p2p", knobs, 7.5))
    assert "…" not in label and max(len(line) for line in label.splitlines()) <= 60
    assert label.replace("\n", " ").endswith("self_replace=0.4), guidance_scale=7.5")
    rows = [
        _row(
            f"img{i}",
            task="edit",
            edit_prompt="an eight",
            editor="p2p",
            editor_knobs=knobs.replace("0.3", str(t)),
            edit_success=float(i < 2 + 2 * t),
            ssim=0.9 - t / 2,
        )
        for t in (0.1, 0.5)
        for i in range(4)
    ]
    analysis = analyze(_frame(rows), FAST)
    caption = pareto_caption(analysis, analysis.intervals, analysis.keys)
    assert "#1: editor_knobs=blend_threshold=0.1, blend_words=null" in caption and "#2:" in caption
    assert "…" not in caption
