"""The grids a run saved, read back: their layout, and each image's tiles and row cut out of them.

A run's grids are found where the engine saves them (:func:`ddim_lab.study.records.save_grid`): one per image
group, ``parts/<part>.png`` beside the group's rows (``grids=sheet``) or ``grid_NNN.png`` (``grids=groups``,
and older runs). An image's tile sits at its row of its group's grid; the layout is recovered from the grid's
pixel size (:func:`grid_geometry`). :class:`RunGrids` finds an image's row and cuts its tiles
(:meth:`RunGrids.tiles`, for the report's grids in :mod:`ddim_lab.report.grids`) or its whole row under the
grid's header (:meth:`RunGrids.band`, :func:`image_bands`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ddim_lab.report.analysis import by_construction
from ddim_lab.report.text import MARK, config_label

logger = logging.getLogger(__name__)

_GROUP_GRID = (re.compile(r"^grid_(\d+)\.png$"), re.compile(r"^g(\d+)-[^.]*\.png$"))


def grid_geometry(width: int, height: int, columns_hint: int | None = None):
    """(rows, header height, cell size, columns) of a grid saved by ``records.save_grid``, from its pixel size;
    None when no layout fits. ``columns_hint`` picks among several fitting layouts. A grid with tile captions
    has ``GRID_CAPTION_LINES`` text lines under each row of tiles (its row pitch is (height − header − pad) /
    rows)."""
    from ddim_lab.study.records import GRID_CAPTION_LINES, GRID_HEADER_LINES, GRID_PAD

    fits = []
    for cols in range(1, 65):
        for cell in {(width - 96 - GRID_PAD * (cols + 1)) / cols, (width - GRID_PAD * (cols + 1)) / (cols + 1)}:
            if cell < 1 or cell != int(cell):
                continue
            cell = int(cell)
            if max(cell, 96) + cols * (cell + GRID_PAD) + GRID_PAD != width:
                continue
            font = min(16, max(10, cell // 10))
            header = GRID_HEADER_LINES * (font + 2) + 2 * GRID_PAD
            for caption in (0, GRID_CAPTION_LINES * (font + 2)):
                rows = (height - header - GRID_PAD) / (cell + caption + GRID_PAD)
                if rows >= 1 and rows == int(rows):
                    fits.append((int(rows), header, cell, cols))
    if not fits:
        return None
    if columns_hint is not None:
        fits.sort(key=lambda f: abs(f[3] - columns_hint))
    return fits[0]


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


@dataclass
class RunGrids:
    """The saved grids of one run and how to find an image's row in them."""

    run_dir: str
    rows: pd.DataFrame  # the run's rows, in table order
    grids: dict[int, Path]  # image group → its grid
    parts: dict[int, Path]  # image group → its rows (parts/*.parquet), when the run kept them
    geometry: tuple[int, int, int, int]  # (images per grid, header px, cell px, columns)
    pitch: int  # pixels from one image row of a grid to the next
    _images: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, run_dir: str, rows: pd.DataFrame) -> RunGrids | None:
        """The run's grids (None when it saved none, or their layout is not recognised)."""
        from PIL import Image

        from ddim_lab.study.records import GRID_PAD, PARTS_DIR

        base = Path(root) / run_dir
        grids: dict[int, Path] = {}
        for folder in (base / PARTS_DIR, base):  # grid_NNN.png wins when both exist
            for path in folder.glob("*.png"):
                hit = next((m for p in _GROUP_GRID if (m := p.match(path.name))), None)
                if hit:
                    grids[int(hit.group(1))] = path
        if not grids:
            return None
        parts = {}
        for path in (base / PARTS_DIR).glob("g*.parquet"):
            hit = re.match(r"^g(\d+)-", path.name)
            if hit:
                parts[int(hit.group(1))] = path
        points = rows.groupby(rows["image"].astype(str), sort=False).size().max()
        control = "control" in rows and rows["control"].astype(object).fillna("none").ne("none").any()
        first = grids[min(grids)]
        with Image.open(first) as img:
            geometry = grid_geometry(img.width, img.height, 2 + int(points) + int(control))
            height = img.height
        if geometry is None:
            logger.warning("run %s: grid layout of %s not recognised: no tiles from it", run_dir, first.name)
            return None
        pitch = (height - geometry[1] - GRID_PAD) // geometry[0]
        return cls(run_dir, rows, grids, parts, geometry, pitch)

    def group_images(self, n: int) -> list[str] | None:
        """The images of group ``n`` in grid order, from its part (None when the run kept no parts)."""
        if n not in self.parts:
            return None
        if n not in self._images:
            names = pd.read_parquet(self.parts[n], columns=["image"])["image"].astype(str)
            self._images[n] = list(dict.fromkeys(names))
        return self._images[n]

    def locate(self, image: str) -> tuple[Path, int] | None:
        """(grid, row) of ``image``: from its position in the run's table (groups of equal size), checked
        against the groups' own rows when the run kept them."""
        order = list(dict.fromkeys(self.rows["image"].astype(str)))
        if image not in order:
            return None
        n, row = divmod(order.index(image), self.geometry[0])
        held = self.group_images(n)
        if self.parts and (
            held is None or row >= len(held) or held[row] != image
        ):  # a failed group shifts them
            n = next((m for m in sorted(self.parts) if image in (self.group_images(m) or [])), None)
            if n is None:
                return None
            row = self.group_images(n).index(image)
        return (self.grids[n], row) if n in self.grids else None

    def tiles(self, image: str, cache: dict) -> list | None:
        """Every column's tile of ``image`` (PIL images, cell × cell, captions left out); None when absent.
        ``cache``: opened grids by path, shared by the calls of one drawing."""
        from PIL import Image

        from ddim_lab.study.records import GRID_PAD

        found = self.locate(image)
        if found is None:
            return None
        path, row = found
        if path not in cache:
            with Image.open(path) as img:
                cache[path] = img.convert("RGB")
        grid = cache[path]
        _, header, cell, cols = self.geometry
        top = header + row * self.pitch
        if top + cell > grid.height:
            logger.warning("run %s: %s is not in its saved grid %s", self.run_dir, image, path.name)
            return None
        left = max(cell, 96) + GRID_PAD
        return [
            grid.crop((left + j * (cell + GRID_PAD), top, left + j * (cell + GRID_PAD) + cell, top + cell))
            for j in range(cols)
        ]

    def band(self, image: str, cache: dict):
        """(header band, row band) of ``image``: its whole row of the saved grid, with the grid's header."""
        from ddim_lab.study.records import GRID_PAD

        found = self.locate(image)
        if found is None:
            return None
        path, row = found
        tiles = self.tiles(image, cache)
        if tiles is None:
            return None
        grid, header = cache[path], self.geometry[1]
        top = header + row * self.pitch
        return grid.crop((0, 0, grid.width, header)), grid.crop(
            (0, top, grid.width, top + self.pitch - GRID_PAD)
        )


def run_grids(df: pd.DataFrame, root: Path) -> list[RunGrids]:
    """The runs of ``df`` (by ``run_dir``) that saved grids, in natural order of their directories."""
    runs, without = [], []
    if "run_dir" not in df.columns or "image" not in df.columns:
        return runs
    for run_dir, rows in sorted(df.groupby("run_dir", sort=False), key=lambda item: _natural(item[0])):
        run = RunGrids.open(root, str(run_dir), rows)
        (runs if run is not None else without).append(run or str(run_dir))
    if without:
        shown = ", ".join(without[:5]) + (", …" if len(without) > 5 else "")
        logger.info("%d run(s) saved no grid (%s): no tiles from them", len(without), shown)
    return runs


def run_caption(rows: pd.DataFrame, keys: list[str]) -> str:
    """The settings of one run: each of ``keys`` with a single value in it; marked when its rows score by
    construction (Direct inversion's reconstructions)."""
    single = [k for k in keys if k in rows and rows[k].nunique(dropna=False) == 1]
    text = config_label(single, tuple(rows[k].iloc[0] for k in single))
    return f"{text} {MARK}" if len(rows) and by_construction(rows).all() else text


def image_bands(df: pd.DataFrame, root: Path, image: str, keys: list[str]):
    """(caption, header band, row band, None) of ``image`` in every run under ``root`` that has its grid: its
    whole row of each run's saved grid, under the grid's own column headers."""
    bands = []
    for run in run_grids(df, root):
        cut = run.band(image, {})
        if cut is not None:
            config = run_caption(run.rows, keys)
            bands.append((f"{run.run_dir}: {config}" if config else run.run_dir, *cut, None))
    return bands
