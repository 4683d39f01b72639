"""A job's contact sheet: its image groups' grids under one header, as save_grid would draw all rows at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_lab.report.saved_grids import grid_geometry
from ddim_lab.study.loggers import LocalLogger
from ddim_lab.study.records import save_grid, stack_grids
from ddim_lab.study.runner import reconstruct_or_edit
from tests.conftest import lab_config

HEADERS = ["input", "VAE round-trip", "g=1 k=0 recon", "g=7.5 k=0 recon"]


def _columns(images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(h, (images + 0.2 * j).clamp(0, 1)) for j, h in enumerate(HEADERS)]


def _captions(labels: list[str]) -> list[list[str] | None]:
    """A caption under every tile but the inputs', as reconstruct/edit grids have (their PSNR)."""
    return [None, *([f"PSNR {j}{label[-1]}" for label in labels] for j in range(1, len(HEADERS)))]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _save(path, images, labels):
    return save_grid(path, _columns(images), labels, captions=_captions(labels))


def test_stacked_groups_equal_one_grid_of_every_row(tmp_path, images):
    labels = [f"digit{i}.png: a handwritten digit" for i in range(5)]
    bounds = [(0, 2), (2, 4), (4, 5)]  # a job's image groups
    groups = [_save(tmp_path / f"g{n}.png", images[lo:hi], labels[lo:hi]) for n, (lo, hi) in enumerate(bounds)]
    whole = _save(tmp_path / "whole.png", images, labels)
    path, shown, total = stack_grids(groups, tmp_path / "sheet.png")
    assert (shown, total) == (5, 5)
    with Image.open(path) as sheet, Image.open(whole) as expected:
        assert sheet.size == expected.size
        assert np.array_equal(np.asarray(sheet.convert("RGB")), np.asarray(expected.convert("RGB")))
        rows, _, cell, cols = grid_geometry(*sheet.size, len(HEADERS))  # the report reads it like any grid
    assert (rows, cols) == (5, len(HEADERS)) and cell == 128


def test_the_sheet_ends_at_the_first_group_that_does_not_fit(tmp_path, images):
    labels = [f"img{i}" for i in range(5)]
    groups = [
        _save(tmp_path / f"g{n}.png", images[i : i + 1], labels[i : i + 1]) for n, i in enumerate(range(5))
    ]
    with Image.open(groups[0]) as one:
        height = one.height
    path, shown, total = stack_grids(groups, tmp_path / "sheet.png", max_height=2 * height)
    assert (shown, total) == (2, 5)  # header + 2 rows fit under twice one grid's height, 3 do not
    with Image.open(path) as sheet:
        assert sheet.height <= 2 * height and grid_geometry(*sheet.size, len(HEADERS))[0] == 2
    path, shown, _ = stack_grids(groups, tmp_path / "tiny.png", max_pixels=1)
    assert shown == 1  # the first group always makes it


def test_grids_without_their_layout_record_make_no_sheet(tmp_path, images):
    grid = _save(tmp_path / "g0.png", images[:2], ["a", "b"])
    Image.open(grid).save(tmp_path / "old.png")  # re-saved without the PNG text: a grid from before
    assert stack_grids([grid, tmp_path / "old.png"], tmp_path / "sheet.png") is None
    assert not (tmp_path / "sheet.png").exists()
    assert stack_grids([], tmp_path / "sheet.png") is None


@pytest.mark.parametrize("grids", ["sheet", "groups"])
def test_a_job_writes_one_contact_sheet_and_group_grids_on_request(tiny, tmp_path, grids):
    cfg = lab_config("data=photos", "prompt=a photograph", "batch_size=2", f"grids={grids}", steps=2)
    table = reconstruct_or_edit(cfg, tiny, tmp_path, LocalLogger())  # 5 images, 2 per group: 3 groups
    assert len(table) == 5
    top = sorted(p.name for p in tmp_path.glob("grid_*.png"))
    hidden = sorted(p.name for p in (tmp_path / "parts").glob("*.png"))
    if grids == "sheet":
        assert top == ["grid_sheet.png"] and len(hidden) == 3  # the groups' grids stay beside their rows
    else:
        assert top == ["grid_000.png", "grid_001.png", "grid_002.png", "grid_sheet.png"] and not hidden
    with Image.open(tmp_path / "grid_sheet.png") as sheet:
        assert grid_geometry(*sheet.size, 3)[0] == 5  # every image, one row each
