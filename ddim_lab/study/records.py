"""Result tables and image grids, written atomically so a crash never leaves a half-written file.

Rows are stored as **parts**: one parquet file per image group under ``<run dir>/parts/``, each written once
(atomically) and never rewritten, so a killed run keeps every finished group and a rerun skips them.
``results.parquet``/``results.csv`` are the parts merged in name order (:func:`merge_parts`, at the end of a
run); :func:`read_results` merges the parts of an unfinished run on the fly.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ddim_lab.schema import BOOL_COLUMNS, COLUMNS, FLOAT_COLUMNS, INT_COLUMNS

if TYPE_CHECKING:  # torch is imported where images are drawn: reading tables stays light
    import torch

logger = logging.getLogger(__name__)

# the row schema is declared once, in ddim_lab.schema: columns, order and dtypes

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
PARTS_DIR = "parts"

GRID_PAD = 4  # pixels between cells and around the grid
GRID_HEADER_LINES = 3  # most text lines in a column header
GRID_CAPTION_LINES = 1  # text lines under each tile when a grid has tile captions (e.g. its PSNR)
VAE_COLUMN = "VAE round-trip"  # the header of a reconstruct/edit grid's VAE column
GRID_HEADER_KEY, GRID_ROWS_KEY = "ddim_lab:header_px", "ddim_lab:rows"  # a grid's layout, in its PNG text
SHEET_MAX_PIXELS = 40_000_000  # a contact sheet stays a picture any viewer opens (120 MB as RGB)
SHEET_MAX_HEIGHT = 32_000  # pixels; taller images are refused by many viewers and browsers
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for others to read too
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _coerce(df: pd.DataFrame, columns: Iterable[str], dtype: str) -> None:
    """Cast ``columns`` of ``df`` in place to ``dtype``; keep (with a warning) a column that can't be."""
    for col in columns:
        try:
            df[col] = df[col].astype(dtype) if dtype != "float64" else pd.to_numeric(df[col]).astype(dtype)
        except (TypeError, ValueError) as err:
            logger.warning("column %r kept as %s: not castable to %s (%s)", col, df[col].dtype, dtype, err)


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame: the schema ``COLUMNS`` first (missing ones all NA), extra keys after, typed."""
    df = pd.DataFrame.from_records(rows) if rows else pd.DataFrame()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series([pd.NA] * len(df), index=df.index, dtype=object)
    extras = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extras].copy()
    _coerce(df, FLOAT_COLUMNS, "float64")
    _coerce(df, INT_COLUMNS, "Int64")
    _coerce(df, BOOL_COLUMNS, "boolean")
    return df


def write_results(rows: list[dict], run_dir: Path) -> pd.DataFrame:
    """Write ``rows`` to ``run_dir/results.parquet`` and ``results.csv`` (each atomically); return the table."""
    run_dir = Path(run_dir)
    df = results_frame(rows)
    atomic_write(run_dir / RESULTS_PARQUET, lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(run_dir / RESULTS_CSV, lambda tmp: df.to_csv(tmp, index=False))
    logger.debug("wrote %d result rows to %s", len(df), run_dir)
    return df


def parts_dir(run_dir: Path) -> Path:
    """Where a run's row parts live."""
    return Path(run_dir) / PARTS_DIR


def write_part(rows: list[dict], run_dir: Path, name: str) -> Path:
    """Write ``rows`` as part ``name`` (``parts/<name>.parquet``) atomically: a part is complete or absent."""
    df = results_frame(rows)
    return atomic_write(parts_dir(run_dir) / f"{name}.parquet", lambda tmp: df.to_parquet(tmp, index=False))


def part_names(run_dir: Path) -> set[str]:
    """Names of the parts a run has written (finished image groups)."""
    return {p.stem for p in parts_dir(run_dir).glob("*.parquet")}


def read_parts(run_dir: Path, names: Iterable[str] | None = None) -> pd.DataFrame | None:
    """Every part of a run (or only ``names``), concatenated in name order (None when there is none)."""
    paths = sorted(parts_dir(run_dir).glob("*.parquet"), key=lambda p: p.name)
    if names is not None:
        wanted = set(names)
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        return None
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)] or frames[:1]
    df = pd.concat(frames, ignore_index=True)
    extras = [c for c in df.columns if c not in COLUMNS]
    return df[[c for c in COLUMNS if c in df.columns] + extras]


def merge_parts(run_dir: Path, names: Iterable[str] | None = None) -> pd.DataFrame:
    """Write the merged parts (or only ``names``) as ``results.parquet`` and ``results.csv`` (each
    atomically); return the table."""
    df = read_parts(run_dir, names)
    if df is None:
        df = results_frame([])
    atomic_write(Path(run_dir) / RESULTS_PARQUET, lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(Path(run_dir) / RESULTS_CSV, lambda tmp: df.to_csv(tmp, index=False))
    return df


def read_results(run_dir: Path) -> pd.DataFrame | None:
    """A run's rows: its parts merged (also while it runs or after it was killed), else ``results.parquet``."""
    parts = read_parts(run_dir)
    if parts is not None:
        return parts
    path = Path(run_dir) / RESULTS_PARQUET
    return pd.read_parquet(path) if path.exists() else None


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """A (3, H, W) float image in [0, 1] as a PIL image, upscaled ``scale``× with nearest neighbour."""
    import torch

    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    return pil


def _wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Break ``text`` into at most ``max_lines`` lines that fit ``width`` px; mark cut text with an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:  # hard-break a word too long for a line
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], font, line_h: int) -> None:
    x, y = xy
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_h), line, fill=_TEXT, font=font)


def save_grid(
    path: Path,
    columns: list[tuple[str, torch.Tensor]],
    row_labels: list[str],
    min_cell: int = 128,
    captions: Sequence[Sequence[str] | None] | None = None,
) -> Path:
    """Save a labelled PNG grid: one column per (header, images (B,3,H,W) in [0,1]), one row per image.

    Images smaller than ``min_cell`` px are upscaled by an integer factor (nearest neighbour). Row labels sit
    in a left column, headers on top; long labels are wrapped and cut with an ellipsis. ``captions``: per
    column None or one text per row, printed under each tile (``GRID_CAPTION_LINES`` lines, e.g. its PSNR).
    """
    if not columns:
        raise ValueError("save_grid needs at least one column")
    n_rows = len(row_labels)
    if captions is not None and (
        len(captions) != len(columns) or any(c is not None and len(c) != n_rows for c in captions)
    ):
        raise ValueError(f"captions: expected None or {n_rows} texts for each of the {len(columns)} columns")
    for label, images in columns:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != n_rows:
            raise ValueError(
                f"column {label!r}: expected ({n_rows}, 3, H, W) images, got {tuple(images.shape)}"
            )

    scales = [max(1, math.ceil(min_cell / min(images.shape[-2:]))) for _, images in columns]
    cell_h = max(images.shape[-2] * s for (_, images), s in zip(columns, scales, strict=True))
    cell_w = max(images.shape[-1] * s for (_, images), s in zip(columns, scales, strict=True))
    label_w = max(cell_w, 96)
    font_size = min(16, max(10, cell_w // 10))
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 2
    header_h = GRID_HEADER_LINES * line_h + 2 * GRID_PAD
    row_lines = max(1, (cell_h - GRID_PAD) // line_h)
    captioned = captions is not None and any(c is not None for c in captions)
    caption_h = GRID_CAPTION_LINES * line_h if captioned else 0
    pitch = cell_h + caption_h + GRID_PAD  # one image row: tiles, their captions, padding

    width = label_w + len(columns) * (cell_w + GRID_PAD) + GRID_PAD
    height = header_h + n_rows * pitch + GRID_PAD
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    for j, ((label, images), scale) in enumerate(zip(columns, scales, strict=True)):
        x0 = label_w + GRID_PAD + j * (cell_w + GRID_PAD)
        lines = _wrap(str(label), font, cell_w, GRID_HEADER_LINES)
        _draw_lines(draw, (x0, GRID_PAD), lines, font, line_h)
        texts = captions[j] if captioned else None
        for i in range(n_rows):
            tile = _to_pil(images[i], scale)
            y0 = header_h + i * pitch
            canvas.paste(tile, (x0 + (cell_w - tile.width) // 2, y0 + (cell_h - tile.height) // 2))
            if texts is not None:
                lines = _wrap(str(texts[i]), font, cell_w, GRID_CAPTION_LINES)
                _draw_lines(draw, (x0, y0 + cell_h), lines, font, line_h)

    for i, label in enumerate(row_labels):
        y0 = header_h + i * pitch
        lines = _wrap(str(label), font, label_w - 2 * GRID_PAD, row_lines)
        _draw_lines(draw, (GRID_PAD, y0), lines, font, line_h)

    layout = PngInfo()  # what stack_grids needs to cut this grid into its header and image rows
    layout.add_text(GRID_HEADER_KEY, str(header_h))
    layout.add_text(GRID_ROWS_KEY, str(n_rows))
    return atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG", pnginfo=layout))


def stack_grids(
    paths: Sequence[Path], out: Path, max_pixels: int = SHEET_MAX_PIXELS, max_height: int = SHEET_MAX_HEIGHT
) -> tuple[Path, int, int] | None:
    """One contact sheet from grids of the same columns (:func:`save_grid`'s, e.g. a job's image groups): the
    first grid's header, then every grid's image rows in order, as ``save_grid`` would draw them all at once.
    Whole grids are added while the sheet stays within ``max_pixels`` and ``max_height``.

    Returns (path, image rows shown, image rows in all grids), or None (nothing written) when there is no grid
    or one lacks the layout record (a grid saved before it existed) or has other columns.
    """
    bands: list[Image.Image] = []
    header: Image.Image | None = None
    shown = total = 0
    height = GRID_PAD
    full = False
    for path in paths:
        with Image.open(path) as grid:
            header_h, rows = grid.text.get(GRID_HEADER_KEY), grid.text.get(GRID_ROWS_KEY)
            if header_h is None or rows is None or (header is not None and grid.width != header.width):
                logger.warning("no contact sheet: %s is not a grid of the same layout", path)
                return None
            total += int(rows)
            if header is None:
                header = grid.crop((0, 0, grid.width, int(header_h))).convert("RGB")
                height += header.height
            band_h = grid.height - GRID_PAD - int(header_h)
            too_big = height + band_h > max_height or grid.width * (height + band_h) > max_pixels
            full = full or (bool(bands) and too_big)
            if not full:  # image rows stay in order: once one group does not fit, the sheet ends
                bands.append(grid.crop((0, int(header_h), grid.width, int(header_h) + band_h)).convert("RGB"))
                height += band_h
                shown += int(rows)
    if header is None:
        return None
    sheet = Image.new("RGB", (header.width, height), _BACKGROUND)
    sheet.paste(header, (0, 0))
    top = header.height
    for band in bands:
        sheet.paste(band, (0, top))
        top += band.height
    atomic_write(Path(out), lambda tmp: sheet.save(tmp, format="PNG"))
    return Path(out), shown, total


def psnr_caption(value: float | None) -> str:
    """A tile's caption: its PSNR against the input."""
    return f"PSNR {value:.1f} dB" if value is not None and math.isfinite(value) else "PSNR n/a"


def tile_captions(headers: Sequence[str], rows: Sequence[dict], n_images: int) -> list[list[str] | None]:
    """Captions of a reconstruct/edit grid for :func:`save_grid`: each result tile's PSNR, the VAE round-trip's
    PSNR (the ceiling) under ``VAE_COLUMN``, none under the other columns (input, control).

    ``rows``: the grid's result rows, image-major (one per image and grid point); the grid points are the last
    columns of ``headers``, in the rows' order.
    """
    points = len(rows) // max(n_images, 1)
    if n_images < 1 or points * n_images != len(rows) or points > len(headers):
        raise ValueError(f"{len(rows)} rows do not fit a grid of {n_images} images × {len(headers)} columns")
    first = len(headers) - points
    captions: list[list[str] | None] = []
    for c, header in enumerate(headers):
        if c >= first:
            captions.append([psnr_caption(rows[i * points + c - first]["psnr"]) for i in range(n_images)])
        elif header == VAE_COLUMN:
            captions.append([psnr_caption(rows[i * points]["vae_psnr"]) for i in range(n_images)])
        else:
            captions.append(None)
    return captions


def part_name(index: int, keys: Iterable[str]) -> str:
    """The part name of image group ``index``: its position and a digest of its images (content hashes), so a
    rerun on changed data never takes an old part for a new group."""
    import hashlib

    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:10]
    return f"g{index:05d}-{digest}"
