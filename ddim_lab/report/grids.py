"""Qualitative grids for the report: the result tiles of several runs side by side, cut out of the grids the
runs saved (:mod:`ddim_lab.report.saved_grids`); nothing is re-rendered from a model.

:func:`qualitative_grids` draws one grid per subset of images (default: the first :data:`PER_GRID`), rows the
images: the input and VAE round-trip columns once, shared by every run whose tiles are identical (a run of
another model brings its own VAE column), then each run, an *arm* named ``A``, ``B``, …, with its result
columns under its letter. Under each result tile is its PSNR from the run's table. Arms whose columns do not
fit one picture (:data:`MAX_COLUMNS`) continue in a second picture of the same images. The page lists each
arm's run and settings (:class:`QualGrid`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report.saved_grids import RunGrids, run_caption, run_grids
from ddim_lab.report.text import MARK

logger = logging.getLogger(__name__)

PER_GRID = 8  # images per grid, and the images the page shows when none are chosen
MAX_COLUMNS = 32  # result columns per picture; more arms continue in the next picture
CELL = 128  # tile size in the report's grids (saved tiles are resized to it)
LABEL_W = 150  # the left column of image names
ARM_GAP = 14  # pixels between arms
FONT = 12
LINE = FONT + 3
ARM_LINES, HEADER_LINES, CAPTION_LINES, ROW_LINES = 2, 3, 1, 6
PRE_NAMES = ("input", "VAE round-trip", "control")  # the columns a saved grid has before its grid points


def match_images(df: pd.DataFrame, wanted: list[str]) -> dict[str, str]:
    """Requested id → the ``image`` value it names (exact, or the file name / stem of the path)."""
    images = df["image"].dropna().astype(str).unique()
    found = {}
    for w in wanted:
        exact = [i for i in images if i == w]
        loose = [i for i in images if Path(i).name == w or Path(i).stem == w]
        hit = exact or loose
        if hit:
            found[w] = hit[0]
        else:
            logger.warning("image %r is in no row: no qualitative grid", w)
    return found


def arm_name(i: int) -> str:
    """A, B, …, Z, AA, AB, …"""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


def point_label(row: pd.Series) -> str:
    """A result column's header from its row: guidance, start step, and the edit target or ``recon``."""
    parts = []
    if "guidance_scale" in row and pd.notna(row["guidance_scale"]):
        parts.append(f"g={float(row['guidance_scale']):g}")
    if "start_step" in row and pd.notna(row["start_step"]):
        parts.append(f"k={int(row['start_step'])}")
    target = row.get("edit_prompt")
    parts.append(
        "recon" if target is None or pd.isna(target) or target in ("", row.get("prompt")) else str(target)
    )
    return " ".join(parts)


def _caption(value: object, name: str = "PSNR") -> str:
    return f"{name} {float(value):.1f}" if value is not None and pd.notna(value) else f"{name} n/a"


@dataclass
class Arm:
    """One run's result columns in a report grid."""

    name: str
    run: RunGrids
    caption: str
    labels: list[str]  # its result columns' headers


@dataclass
class QualGrid:
    """One picture of the page: ``images`` (rows) × the shared columns and ``arms``."""

    path: Path
    images: list[str]
    arms: list[Arm]
    width: int
    height: int


def _resize(tile, cell: int = CELL):
    from PIL import Image

    if tile.size == (cell, cell):
        return tile
    filt = Image.Resampling.NEAREST if tile.width < cell else Image.Resampling.LANCZOS
    return tile.resize((cell, cell), filt)


def _shared_columns(arms: list[Arm], images: list[str], tiles: dict) -> list[tuple[str, dict, list[str]]]:
    """The columns before the grid points (input, VAE round-trip, control), each once for the arms whose tiles
    are identical: [(header, {image: tile}, arm names)]."""
    columns: list[tuple[str, int, dict, list[str]]] = []  # (kind, index, tiles by image, arm names)
    for arm in arms:
        for j in range(arm.run.geometry[3] - len(arm.labels)):
            mine = {i: tiles[arm.name, i][j] for i in images if tiles.get((arm.name, i)) is not None}
            if not mine:
                continue
            for _, index, held, names in columns:
                common = set(mine) & set(held)
                if (
                    index == j
                    and common
                    and all(np.array_equal(np.asarray(mine[i]), np.asarray(held[i])) for i in common)
                ):
                    held.update({i: t for i, t in mine.items() if i not in held})
                    names.append(arm.name)
                    break
            else:
                columns.append(
                    (PRE_NAMES[j] if j < len(PRE_NAMES) else f"column {j + 1}", j, dict(mine), [arm.name])
                )
    every = [a.name for a in arms]
    out = []
    for kind, index, held, names in columns:
        several = sum(1 for c in columns if c[1] == index) > 1
        out.append((f"{kind} ({', '.join(names)})" if several and names != every else kind, held, names))
    return out


def draw_grid(arms: list[Arm], images: list[str], path: Path) -> QualGrid:
    """Draw ``images`` × (shared columns, then each arm's result columns) and save it as ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    from ddim_lab.study.records import GRID_PAD, _wrap, atomic_write

    font = ImageFont.load_default(size=FONT)
    cache: dict = {}
    tiles = {(a.name, i): a.run.tiles(i, cache) for a in arms for i in images}
    tiles = {k: None if v is None else [_resize(t) for t in v] for k, v in tiles.items()}
    shared = _shared_columns(arms, images, tiles)
    step = CELL + GRID_PAD
    head = (ARM_LINES + HEADER_LINES) * LINE + 2 * GRID_PAD
    pitch = CELL + CAPTION_LINES * LINE + GRID_PAD
    x_shared = LABEL_W + GRID_PAD
    x_arms, x = [], x_shared + len(shared) * step
    for arm in arms:
        x += ARM_GAP
        x_arms.append(x)
        x += len(arm.labels) * step
    width, height = x + GRID_PAD, head + len(images) * pitch + GRID_PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def text(xy, lines):
        for n, line in enumerate(lines):
            draw.text((xy[0], xy[1] + n * LINE), line, fill=(0, 0, 0), font=font)

    y_head = GRID_PAD + ARM_LINES * LINE
    by_name = {a.name: a for a in arms}
    for j, (name, _, _) in enumerate(shared):
        text((x_shared + j * step, y_head), _wrap(name, font, CELL, HEADER_LINES))
    for arm, x0 in zip(arms, x_arms, strict=True):
        span = len(arm.labels) * step - GRID_PAD
        draw.rectangle(
            (x0 - ARM_GAP // 2 - 1, GRID_PAD, x0 - ARM_GAP // 2, height - GRID_PAD), fill=(190, 190, 190)
        )
        title = f"{arm.name}: {arm.caption}" if arm.caption else arm.name
        title = title.replace(MARK, "(input by construction)")  # the bitmap font has no dagger
        text((x0, GRID_PAD), _wrap(title, font, span, ARM_LINES))
        for j, name in enumerate(arm.labels):
            text((x0 + j * step, y_head), _wrap(name, font, CELL, HEADER_LINES))
    for r, image in enumerate(images):
        y0 = head + r * pitch
        text((GRID_PAD, y0), _wrap(image, font, LABEL_W - 2 * GRID_PAD, ROW_LINES))
        for j, (name, held, names) in enumerate(shared):
            if image in held:
                canvas.paste(held[image], (x_shared + j * step, y0))
            if name.startswith(PRE_NAMES[1]) and image in held:  # the VAE ceiling of this image, this model
                rows = next(
                    r for r in (by_name[n].run.rows for n in names) if image in set(r["image"].astype(str))
                )
                value = rows.loc[rows["image"].astype(str) == image, "vae_psnr"] if "vae_psnr" in rows else []
                text((x_shared + j * step, y0 + CELL), [_caption(value.iloc[0] if len(value) else None)])
        for arm, x0 in zip(arms, x_arms, strict=True):
            got = tiles[arm.name, image]
            mine = arm.run.rows[arm.run.rows["image"].astype(str) == image]
            first = arm.run.geometry[3] - len(arm.labels)
            for j in range(len(arm.labels)):
                xy = (x0 + j * step, y0)
                if got is None or j >= len(mine):
                    draw.rectangle((*xy, xy[0] + CELL - 1, xy[1] + CELL - 1), fill=(235, 235, 235))
                    text((xy[0] + 4, xy[1] + 4), ["not in this run"])
                    continue
                canvas.paste(got[first + j], xy)
                text((xy[0], xy[1] + CELL), [_caption(mine["psnr"].iloc[j] if "psnr" in mine else None)])
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", optimize=False))
    return QualGrid(path, images, arms, width, height)


def qualitative_grids(
    df: pd.DataFrame,
    root: Path,
    image_ids: list[str] | None,
    out_dir: Path,
    keys: list[str],
    per_grid: int = PER_GRID,
) -> list[QualGrid]:
    """``qual_NN.png`` per subset of ``per_grid`` images (``image_ids``, or the first ``per_grid`` images of
    ``df`` when None): every run's tiles of them side by side. [] when no run saved grids."""
    if "image" not in df.columns:
        return []
    if image_ids is None:
        images = list(dict.fromkeys(df["image"].dropna().astype(str)))[:per_grid]
    else:
        images = list(dict.fromkeys(match_images(df, image_ids).values()))
    runs = run_grids(df, root)
    if not images or not runs:
        return []
    arms = []
    for i, run in enumerate(runs):  # an arm's result columns: the grid points of its first image's rows
        names = run.rows["image"].astype(str)
        labels = [point_label(r) for _, r in run.rows[names == names.iloc[0]].iterrows()]
        arms.append(Arm(arm_name(i), run, run_caption(run.rows, keys), labels[: max(0, run.geometry[3] - 2)]))
    chunks: list[list[Arm]] = [[]]
    for arm in arms:  # arms in order, as many per picture as MAX_COLUMNS allows (at least one)
        if chunks[-1] and sum(len(a.labels) for a in chunks[-1]) + len(arm.labels) > MAX_COLUMNS:
            chunks.append([])
        chunks[-1].append(arm)
    out = []
    for s, first in enumerate(range(0, len(images), per_grid)):
        subset = images[first : first + per_grid]
        for c, chunk in enumerate(chunks):
            suffix = f"_{c + 1}" if len(chunks) > 1 else ""
            out.append(draw_grid(chunk, subset, Path(out_dir) / f"qual_{s + 1:02d}{suffix}.png"))
    logger.info("%d qualitative grid(s) of %d image(s) from %d run(s)", len(out), len(images), len(runs))
    return out
