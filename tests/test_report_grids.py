"""The report's qualitative grids: arms side by side, shared input/VAE columns, tiles found in either place
the engine saves group grids (``parts/<part>.png`` or ``grid_NNN.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ddim_lab.report import grids as report_grids
from ddim_lab.report.grids import arm_name, point_label, qualitative_grids
from ddim_lab.report.main import collect_results
from ddim_lab.study import records

N_IMAGES = 6


def _level(i: int) -> float:
    return (i + 1) / (N_IMAGES + 1)


def _run(run_dir: Path, inverter: str, group: int, where: str, vae_shift: float = 0.0, skip=()) -> None:
    """One run as the engine writes it: rows and a grid per image group (``where``: ``parts`` beside the
    group's rows, ``groups`` as grid_NNN.png); image i's tiles hold gray level (i + 1) / (N + 1), its VAE
    tile that plus ``vae_shift``; the groups in ``skip`` failed (no rows, no grid)."""
    images = [f"img{i}.png" for i in range(N_IMAGES)]
    for n, first in enumerate(range(0, N_IMAGES, group)):
        if n in skip:
            continue
        part = images[first : first + group]
        level = torch.tensor([_level(first + k) for k in range(len(part))])
        tile = level[:, None, None, None].expand(len(part), 3, 16, 16)
        points = [("g=1 k=0 recon", tile), ("g=1 k=2 recon", tile)]
        columns = [("input", tile), ("VAE round-trip", (tile + vae_shift).clamp(0, 1)), *points]
        rows = [
            {"image": name, "inverter": inverter, "start_step": k, "guidance_scale": 1.0, "psnr": 30.0 + k}
            for name in part
            for k in (0, 2)
        ]
        name = records.part_name(n, part)
        records.write_part(rows, run_dir, name)
        path = records.parts_dir(run_dir) / f"{name}.png" if where == "parts" else run_dir / f"grid_{n:03d}.png"
        records.save_grid(path, columns, part)


def _count(img: np.ndarray, level: float) -> int:
    return int(np.sum(np.abs(img - 255 * level) < 1.5))


def test_tiles_are_found_beside_the_parts_even_after_a_failed_group(tmp_path):
    root = tmp_path / "sweep"
    _run(root / "a", "ddim", group=2, where="parts", skip={1})  # img2, img3 failed: img4 moves up in the table
    _run(root / "b", "edict", group=2, where="groups")
    df = collect_results(root)
    (grid,) = qualitative_grids(df, root, ["img4", "img1"], tmp_path / "out", ["inverter"])
    assert [a.name for a in grid.arms] == ["A", "B"] and grid.images == ["img4.png", "img1.png"]
    img = np.asarray(Image.open(grid.path).convert("L"), dtype=float)
    tile = 128 * 128
    for i in (4, 1):  # input and VAE once (identical in both runs), then two arms × two points
        assert 6 * tile * 0.95 <= _count(img, _level(i)) <= 6 * tile * 1.05, i
    for i in (0, 2, 3, 5):
        assert _count(img, _level(i)) < tile * 0.05


def test_a_run_with_other_vae_tiles_gets_its_own_vae_column(tmp_path):
    root = tmp_path / "sweep"
    _run(root / "a", "ddim", group=3, where="groups")
    _run(root / "b", "ddim", group=3, where="groups", vae_shift=0.05)  # another model's VAE
    df = collect_results(root).assign(model=lambda d: np.where(d["run_dir"] == "a", "m1", "m2"))
    (grid,) = qualitative_grids(df, root, ["img0"], tmp_path / "out", ["model"])
    img = np.asarray(Image.open(grid.path).convert("L"), dtype=float)
    tile = 128 * 128
    assert 6 * tile * 0.95 <= _count(img, _level(0)) <= 6 * tile * 1.05  # input once, A's VAE, 2 × 2 points
    assert tile * 0.95 <= _count(img, _level(0) + 0.05) <= tile * 1.05  # B's VAE, its own column
    assert [a.caption for a in grid.arms] == ["model=m1", "model=m2"]


def test_arms_beyond_one_picture_continue_in_the_next(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    for name in ("a", "b", "c"):
        _run(root / name, "ddim", group=3, where="parts")
    monkeypatch.setattr(report_grids, "MAX_COLUMNS", 4)  # two arms of two points per picture
    every = [f"img{i}" for i in range(N_IMAGES)]
    grids = qualitative_grids(collect_results(root), root, every, tmp_path / "out", [], per_grid=4)
    names = [(g.path.name, [a.name for a in g.arms], len(g.images)) for g in grids]
    assert names == [
        ("qual_01_1.png", ["A", "B"], 4),
        ("qual_01_2.png", ["C"], 4),
        ("qual_02_1.png", ["A", "B"], 2),
        ("qual_02_2.png", ["C"], 2),
    ]


def test_arm_names_and_column_labels():
    assert [arm_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == ["A", "B", "Z", "AA", "AB", "ZZ", "AAA"]
    row = pd.Series({"guidance_scale": 7.5, "start_step": 10, "edit_prompt": "", "prompt": "a cat"})
    assert point_label(row) == "g=7.5 k=10 recon"
    assert point_label(row.copy().replace({"": "a dog"})) == "g=7.5 k=10 a dog"
    own = pd.Series({"guidance_scale": 1.0, "start_step": 0, "edit_prompt": "a cat", "prompt": "a cat"})
    assert point_label(own) == "g=1 k=0 recon"  # its own prompt: a reconstruction
