"""Grid labels: each reconstruct/edit tile's PSNR is printed under it, and the report still reads such grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ddim_lab.report.saved_grids import grid_geometry, image_bands
from ddim_lab.study import runner as experiment
from ddim_lab.study.loggers import LocalLogger
from ddim_lab.study.records import VAE_COLUMN, psnr_caption, save_grid, tile_captions
from tests.conftest import DIGITS, lab_config


def _rows(images: int, points: int) -> list[dict]:
    return [{"psnr": 20.0 + i + 0.25 * j, "vae_psnr": 40.0 + i} for i in range(images) for j in range(points)]


def test_tile_captions_give_each_result_and_the_vae_column_its_psnr():
    rows = _rows(2, 3)
    headers = ["input", VAE_COLUMN, "control: canny", "g=1 k=0 recon", "g=1 k=2 recon", "g=4 k=0 a dog"]
    captions = tile_captions(headers, rows, 2)
    assert captions[0] is None and captions[2] is None  # the input and the control have no PSNR
    assert captions[1] == [psnr_caption(rows[0]["vae_psnr"]), psnr_caption(rows[3]["vae_psnr"])]
    for j in range(3):
        assert captions[3 + j] == [psnr_caption(rows[j]["psnr"]), psnr_caption(rows[3 + j]["psnr"])]
    assert psnr_caption(21.25) == "PSNR 21.2 dB" and psnr_caption(float("nan")) == "PSNR n/a"
    with pytest.raises(ValueError, match="do not fit"):
        tile_captions(headers, rows[:5], 2)


def test_save_grid_checks_its_captions():
    tiles = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="captions"):
        save_grid("unused.png", [("a", tiles)], ["r0", "r1"], captions=[["only one"]])


def _captioned_grids(run_dir, images: list[str], group: int, points: int) -> None:
    """Grids as the engine saves them, with captions; image i's tiles hold gray level (i + 1) / (n + 1)."""
    for n, first in enumerate(range(0, len(images), group)):
        part = images[first : first + group]
        level = torch.tensor([(first + k + 1) / (len(images) + 1) for k in range(len(part))])
        tile = level[:, None, None, None].expand(len(part), 3, 16, 16)
        headers = ["input", VAE_COLUMN] + [f"g=1 k={j}" for j in range(points)]
        captions = tile_captions(headers, _rows(len(part), points), len(part))
        save_grid(run_dir / f"grid_{n:03d}.png", [(h, tile) for h in headers], part, captions=captions)


def test_the_report_finds_the_layout_of_captioned_grids_and_cuts_one_image_row(tmp_path):
    images = [f"img{i}.png" for i in range(5)]
    _captioned_grids(tmp_path, images, group=2, points=2)
    with Image.open(tmp_path / "grid_000.png") as grid:
        rows, _, cell, cols = grid_geometry(grid.width, grid.height, 4)
    assert (rows, cell, cols) == (2, 128, 4)
    table = pd.DataFrame({"image": images, "run_dir": ".", "psnr": 30.0, "ssim": 0.9})
    ((_, _, band, _),) = image_bands(table, tmp_path, "img3.png", [])
    gray = np.asarray(band.convert("L"), dtype=float)
    assert np.sum(np.abs(gray - 255 * 4 / 6) < 1.5) >= 4 * 128 * 128 * 0.9  # img3's four tiles
    for other in (1, 2, 3, 5):
        assert np.sum(np.abs(gray - 255 * other / 6) < 1.5) < 128 * 16


def test_captioned_grids_are_one_caption_line_per_row_taller(tmp_path):
    tiles = torch.rand(3, 3, 16, 16)
    plain = save_grid(tmp_path / "plain.png", [("a", tiles), ("b", tiles)], ["0", "1", "2"])
    captioned = save_grid(
        tmp_path / "captioned.png",
        [("a", tiles), ("b", tiles)],
        ["0", "1", "2"],
        captions=[None, ["x", "y", "z"]],
    )
    with Image.open(plain) as p, Image.open(captioned) as c:
        assert c.width == p.width and (c.height - p.height) % 3 == 0 and c.height > p.height
        assert grid_geometry(p.width, p.height, 2)[0] == grid_geometry(c.width, c.height, 2)[0] == 3


def test_the_engine_prints_each_tiles_psnr_under_it(tiny, tmp_path, monkeypatch):
    saved = []
    real = experiment.save_grid
    monkeypatch.setattr(experiment, "save_grid", lambda *a, **k: saved.append((a, k)) or real(*a, **k))
    cfg = lab_config(f"data.path={DIGITS / 'digit0_0.png'}", "guidance_scale=[1,3]", steps=3)
    table = experiment.reconstruct_or_edit(cfg, tiny, tmp_path, LocalLogger())
    ((args, kwargs),) = saved
    headers = [h for h, _ in args[1]]
    captions = kwargs["captions"]
    assert captions[headers.index("input")] is None
    assert captions[headers.index(VAE_COLUMN)] == [psnr_caption(table["vae_psnr"].iloc[0])]
    assert [c[0] for c in captions[-2:]] == [psnr_caption(v) for v in table["psnr"]]
