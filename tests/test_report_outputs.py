"""Tests for the report's schema-driven grouping, interval tables, figures, qualitative grids and HTML page."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ddim_lab import records, schema
from ddim_lab.records import results_frame, write_results
from ddim_lab.report_figures import grid_geometry, metric_figures, pareto_figures, pareto_front
from ddim_lab.report_html import render_html, write_outputs
from ddim_lab.report_tables import analyze, intervals_markdown, latex, write_tables
from ddim_lab.stats import Bootstrap

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
    assert schema.BY_NAME["inversion_unet_backwards"].role == schema.METRIC
    assert schema.BY_NAME["image"].role == schema.BOOKKEEPING


@pytest.mark.parametrize(
    ("column", "a", "b"),
    [
        ("dtype", "fp32", "bf16"),
        ("seed", 0, 1),
        ("prompt", "a digit", "a number"),
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


def _sweep_with_grids(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    images = [f"img{i}.png" for i in range(5)]
    for j, inverter in enumerate(("ddim", "null_text")):
        rows = [
            _row(name, inverter=inverter, start_step=k, psnr=20.0 + i + j + k)
            for i, name in enumerate(images)
            for k in (0, 5)
        ]
        write_results(rows, root / str(j))
        _save_grids(root / str(j), images, group=2, points=2)
    return root


def test_qualitative_grid_cuts_the_image_row_from_the_saved_grids(tmp_path):
    from ddim_lab.report import collect_results

    root = _sweep_with_grids(tmp_path)
    df = collect_results(root)
    _, files = write_outputs(df, root, tmp_path / "out", FAST, figures=True, images=["img3", "missing"])
    qual = tmp_path / "out" / "qual_img3.png"
    assert qual in files and not (tmp_path / "out" / "qual_missing.png").exists()
    img = np.asarray(Image.open(qual).convert("L"), dtype=float)
    expected = 255 * 4 / 6  # img3 is the 4th of 5 images: its tiles hold gray level 4/6
    tiles = img[np.abs(img - expected) < 1.5]
    assert tiles.size >= 2 * 4 * 128 * 128 * 0.9  # two runs × four tiles of 128 px
    for other in (1, 2, 3, 5):  # no tile of another image
        assert np.sum(np.abs(img - 255 * other / 6) < 1.5) < 128 * 128


# -- HTML -----------------------------------------------------------------------------------------------


def test_html_page_is_self_contained_and_sortable(tmp_path):
    from ddim_lab.report import collect_results

    root = _sweep_with_grids(tmp_path)
    df = collect_results(root)
    write_outputs(df, root, tmp_path / "out", FAST, figures=True, page=True, images=["img1.png"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<table class='sortable'") >= 3  # intervals, paired, per-image rows
    assert "data:image/png;base64," in page and "sortTable" in page and "<style>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing to fetch
    assert "Paired comparisons of inverter" in page and "img1.png" in page
    assert "200 resamples, seed 0" in page


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


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="headless Chromium is not installed (apt-get install chromium): the page is rendered only with it",
)
def test_html_renders_and_sorts_in_headless_chromium(tmp_path):
    import re

    from ddim_lab.report import collect_results

    root = _sweep_with_grids(tmp_path)
    write_outputs(collect_results(root), root, tmp_path, FAST, figures=True, page=True, images=["img1"])
    page = (tmp_path / "report.html").as_uri()
    shot = tmp_path / "shot.png"
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    cmd = ["chromium", *CHROMIUM_FLAGS, profile, f"--screenshot={shot}", "--window-size=1200,900", page]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1200) and pixels.std() > 10  # something was drawn, not a blank page
    # the sorting script: psnr (column 3) descending, applied by the page's own JS, read back from the DOM
    dom = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, profile, "--dump-dom", page + "#sort=intervals:3:desc"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    table = dom[dom.index('id="intervals"') :]
    body = table[table.index("<tbody>") : table.index("</tbody>")]
    order = [tuple(re.findall(r"<td[^>]*>([^<]*)</td>", row)[:2]) for row in body.split("</tr>")[:-1]]
    assert order == [("null_text", "5"), ("ddim", "5"), ("null_text", "0"), ("ddim", "0")]


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


def test_metric_strip_writes_under_each_result_tile():
    from ddim_lab.report_figures import _metric_strip

    rows = pd.DataFrame({"psnr": [30.0, 20.0], "ssim": [0.9, 0.5]})
    strip = _metric_strip(rows, width=96 + 4 * (128 + 4) + 4, cell=128, columns=4)
    dark = np.asarray(strip.convert("L")) < 128
    x_tile = [96 + 4 + j * (128 + 4) for j in range(4)]
    assert not dark[:, x_tile[0] : x_tile[2]].any()  # nothing under input and VAE round-trip
    assert dark[:, x_tile[2] : x_tile[3]].any() and dark[:, x_tile[3] :].any()
    assert _metric_strip(rows, 500, 128, columns=3) is None  # rows do not match the grid's columns
