"""Qualitative grids for the report: the result tiles of several runs side by side, cut out of the grids the
runs saved (:func:`ddim_lab.study.records.save_grid`); nothing is re-rendered from a model.

:func:`qualitative_grids` draws one grid per subset of images (default: the first :data:`PER_GRID`), rows the
images: the input and VAE round-trip columns once, shared by every run whose tiles are identical (a run of
another model brings its own VAE column), then each run, an *arm* named ``A``, ``B``, …, with its result
columns under its letter. Under each result tile is its PSNR from the run's table. Arms whose columns do not
fit one picture (:data:`MAX_COLUMNS`) continue in a second picture of the same images. The page lists each
arm's run and settings (:class:`QualGrid`).

A run's grids are found where the engine saves them: one per image group, ``parts/<part>.png`` beside the
group's rows (``grids=sheet``) or ``grid_NNN.png`` (``grids=groups``, and older runs). An image's tile sits at
its row of its group's grid; the layout is recovered from the grid's pixel size (:func:`grid_geometry`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report.tables import MARK, by_construction, config_label

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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
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


# -- the report's grids: arms side by side -----------------------------------------------------------------


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
