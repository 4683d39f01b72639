"""Tests for ddim_lab.study.records: result schema, atomic table writes and labelled image grids."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ddim_lab.study import records
from ddim_lab.study.records import COLUMNS, GRID_PAD, save_grid, write_results

SPEC = (
    "image, prompt, edit_prompt, negative_prompt, task, model, scheduler, inverter, inverter_knobs, "
    "scheduler_overrides, num_steps, budget_nfe, "
    "inversion_guidance_scale, guidance_scale, start_step, eta, seed, dtype, psnr, ssim, lpips, lpips_net, "
    "latent_mse, vae_psnr, vae_lpips, unet_evals, inversion_unet_evals, inversion_unet_backwards, nfe, "
    "inversion_cached, sample_seed, seconds, peak_memory_mb"
)


def _row(i: int, **extra) -> dict:
    # keys deliberately out of schema order, some schema columns missing
    return {"psnr": 20.0 + i, "image": f"img{i}", "num_steps": 10, "lpips": float("nan"), **extra}


def test_columns_match_spec_in_order():
    assert tuple(c.strip() for c in SPEC.split(",")) == COLUMNS
    assert len(set(COLUMNS)) == len(COLUMNS)


def test_write_results_orders_columns_and_fills_missing(tmp_path):
    rows = [_row(0, note="a"), _row(1, unet_evals=40, inversion_cached=True, zeta=1)]
    df = write_results(rows, tmp_path)
    assert tuple(df.columns[: len(COLUMNS)]) == COLUMNS
    assert list(df.columns[len(COLUMNS) :]) == ["note", "zeta"]
    assert df["prompt"].isna().all() and df["seconds"].isna().all()
    assert df["psnr"].tolist() == [20.0, 21.0]
    assert str(df["unet_evals"].dtype) == "Int64" and pd.isna(df["unet_evals"][0]) and df["unet_evals"][1] == 40
    assert str(df["inversion_cached"].dtype) == "boolean"

    back = pd.read_parquet(tmp_path / "results.parquet")
    assert list(back.columns) == list(df.columns)
    assert back["lpips"].isna().all()  # missing LPIPS stays missing, not 0
    assert back["psnr"].tolist() == [20.0, 21.0]
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns) == list(df.columns) and len(csv) == 2
    assert csv["lpips"].isna().all()


def test_write_results_rewrites_without_leaving_temp_files(tmp_path):
    write_results([_row(0)], tmp_path)
    write_results([_row(0), _row(1), _row(2)], tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.parquet"]
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 3
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3


def test_failed_write_keeps_previous_table(tmp_path, monkeypatch):
    write_results([_row(0), _row(1)], tmp_path)

    def broken_to_csv(self, path, **kwargs):
        with open(path, "w") as fh:
            fh.write("image,psn")  # half a file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(OSError, match="disk full"):
        write_results([_row(0), _row(1), _row(2)], tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.parquet"]
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2  # old table intact


def _solid(batch: int, size: int, rgb: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def _grid(tmp_path, name, n_cols, batch, size=16, min_cell=64, header="col", labels=None):
    cols = [(f"{header} {j}" if header else "", _solid(batch, size, (1.0, 0.0, 0.0))) for j in range(n_cols)]
    labels = labels if labels is not None else [f"image {i}" for i in range(batch)]
    path = save_grid(tmp_path / name, cols, labels, min_cell=min_cell)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    ("size", "min_cell", "cell"), [(16, 64, 64), (16, 60, 64), (20, 128, 140), (200, 128, 200)]
)
def test_grid_cells_are_integer_nearest_upscales(tmp_path, size, min_cell, cell):
    batch, n_cols = 3, 2
    img = _grid(tmp_path, "g.png", n_cols, batch, size=size, min_cell=min_cell)
    red = np.all(img == [255, 0, 0], axis=-1)
    assert red.sum() == batch * n_cols * cell * cell  # every image pasted at exactly cell×cell px
    assert img.shape[1] >= (n_cols + 1) * cell  # label column + image columns
    assert img.shape[0] >= batch * cell


def test_grid_size_grows_by_one_cell_per_row_and_column(tmp_path):
    base = _grid(tmp_path, "a.png", 2, 2)
    wider = _grid(tmp_path, "b.png", 3, 2)
    taller = _grid(tmp_path, "c.png", 2, 3)
    assert wider.shape[1] - base.shape[1] == 64 + GRID_PAD and wider.shape[0] == base.shape[0]
    assert taller.shape[0] - base.shape[0] == 64 + GRID_PAD and taller.shape[1] == base.shape[1]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_grid_draws_labels(tmp_path):
    labelled = _grid(tmp_path, "l.png", 2, 2)
    blank = _grid(tmp_path, "u.png", 2, 2, header="", labels=["", ""])
    assert labelled.shape == blank.shape
    first_cell_y = np.argwhere(np.all(labelled == [255, 0, 0], axis=-1))[:, 0].min()
    first_cell_x = np.argwhere(np.all(labelled == [255, 0, 0], axis=-1))[:, 1].min()
    header, blank_header = labelled[:first_cell_y], blank[:first_cell_y]
    left, blank_left = labelled[first_cell_y:, :first_cell_x], blank[first_cell_y:, :first_cell_x]
    assert (blank_header == 255).all() and (blank_left == 255).all()  # nothing drawn without labels
    assert (header < 128).any() and (left < 128).any()  # dark text in the header and the label column


def test_grid_long_labels_stay_inside_their_cell(tmp_path):
    long = "inverted at guidance 7.5 then edited with a very long prompt " * 6 + "x" * 300
    short = _grid(tmp_path, "s.png", 3, 2)
    img = _grid(tmp_path, "w.png", 3, 2, header=long, labels=[long, long])
    assert img.shape == short.shape  # long text is wrapped and cut, it doesn't grow the grid
    red_x = np.argwhere(np.all(img == [255, 0, 0], axis=-1))[:, 1]
    cell, n_cols = 64, 3
    label_w = img.shape[1] - n_cols * (cell + GRID_PAD) - GRID_PAD
    gaps = [label_w + GRID_PAD + j * (cell + GRID_PAD) - GRID_PAD for j in range(n_cols)]
    assert red_x.min() == gaps[0] + GRID_PAD
    for x in gaps:  # the gutters between columns stay blank, also in the header
        assert (img[:, x : x + GRID_PAD] == 255).all()
    assert (img[:, label_w - GRID_PAD : label_w + GRID_PAD] == 255).all()  # row labels end before column 0


def test_grid_rejects_mismatched_batch(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        save_grid(tmp_path / "x.png", [("a", _solid(2, 8, (0, 0, 0)))], ["only one label"])


def test_grid_clamps_out_of_range_values(tmp_path):
    imgs = torch.full((1, 3, 8, 8), 2.0)
    imgs[:, :, :4] = -1.0
    path = records.save_grid(tmp_path / "c.png", [("x", imgs)], ["r"], min_cell=8)
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.min() == 0 and arr.max() == 255


def test_parts_are_merged_in_order_and_equal_one_table(tmp_path):
    rows = [_row(i) for i in range(5)]
    write_results(rows, tmp_path / "whole")
    whole = pd.read_parquet(tmp_path / "whole" / records.RESULTS_PARQUET)
    run = tmp_path / "parts"
    records.write_part(rows[3:], run, "g00001")  # written out of order (another rank, or a resume)
    records.write_part(rows[:3], run, "g00000")
    assert records.part_names(run) == {"g00000", "g00001"}
    pd.testing.assert_frame_equal(records.read_results(run), whole)  # readable before the merge
    records.merge_parts(run)
    pd.testing.assert_frame_equal(pd.read_parquet(run / records.RESULTS_PARQUET), whole)
    assert len(pd.read_csv(run / records.RESULTS_CSV)) == 5
    assert not [p for p in (run / records.PARTS_DIR).iterdir() if p.suffix != ".parquet"]  # no temp files


def test_read_results_without_parts_reads_the_table(tmp_path):
    assert records.read_results(tmp_path) is None
    write_results([_row(0)], tmp_path)
    assert len(records.read_results(tmp_path)) == 1
