"""Report figures from the saved tables: metric curves with interval bands, Pareto plots, qualitative grids.

- :func:`metric_figures`: each metric against ``num_steps`` (or ``start_step``), one line per combination of
  the other varying keys, with its bootstrap band, a title, units, and the VAE ceiling (``vae_psnr``) on PSNR
  (``vae_lpips``, the floor, on LPIPS).
- :func:`pareto_figures`: fidelity (SSIM, PSNR, LPIPS) against ``edit_success`` per configuration, the Pareto
  front marked, when rows carry ``edit_success``.
- :func:`qualitative_grids`: for chosen image ids, that image's row cut out of each run's saved
  ``grid_NNN.png`` (layout recomputed from :func:`ddim_lab.records.save_grid`'s geometry), stacked with the
  run's config above each band: one ``qual_<id>.png`` per image. Nothing is re-rendered from the model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report_tables import Analysis, fmt, key_text
from ddim_lab.schema import BY_NAME, label

logger = logging.getLogger(__name__)

FIGURE_METRICS = (
    "psnr",
    "ssim",
    "lpips",
    "edit_success",
    "psnr_unedited",
    "ssim_unedited",
    "lpips_unedited",
    "clip_whole",
    "clip_edited",
    "structure_distance",
)
CEILINGS = {"psnr": ("vae_psnr", "VAE ceiling"), "lpips": ("vae_lpips", "VAE floor")}
FIDELITY = ("ssim", "psnr", "lpips", "ssim_unedited", "psnr_unedited", "lpips_unedited")
X_LABELS = {"num_steps": "DDIM steps N", "start_step": "start step k (steps skipped)"}
LEGEND_CHARS = 70
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _save(fig, path: Path) -> Path:
    from ddim_lab.records import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _series_label(keys: list[str], values: tuple) -> str:
    text = ", ".join(f"{k}={key_text(k, v)}" for k, v in zip(keys, values, strict=True))
    return text if len(text) <= LEGEND_CHARS else text[: LEGEND_CHARS - 1] + "…"


def figure_x(keys: list[str]) -> str | None:
    """The x axis of the metric figures: num_steps when it varies, else start_step, else None."""
    return next((c for c in ("num_steps", "start_step") if c in keys), None)


def metric_figures(analysis: Analysis, out_dir: Path, metrics=FIGURE_METRICS) -> list[Path]:
    """``fig_<metric>.png`` for each measured metric against the step key; [] when no step key varies."""
    from matplotlib.figure import Figure

    x = figure_x(analysis.keys)
    if x is None:
        logger.warning("no metric figures: neither num_steps nor start_step varies")
        return []
    series = [k for k in analysis.keys if k != x]
    table = analysis.intervals.copy()
    table["__x"] = pd.to_numeric(table[x], errors="coerce").astype("float64")
    written = []
    for metric in metrics:
        if metric not in analysis.metrics:
            logger.info("no figure for %s: no values", metric)
            continue
        data = table.dropna(subset=["__x", f"{metric}_mean"])
        if data.empty:
            continue
        n_series = data.groupby(series, dropna=False).ngroups if series else 1
        fig = Figure(figsize=(7.5, 4.5 + 0.2 * n_series), layout="constrained")
        ax = fig.add_subplot()
        lines = data.groupby(series, dropna=False, sort=True) if series else [((), data)]
        ceiling_col, ceiling_name = CEILINGS.get(metric, (None, None))
        ceilings = []
        for key, group in lines:
            key = key if isinstance(key, tuple) else (key,)
            group = group.sort_values("__x")
            name = _series_label(series, key) or metric
            (line,) = ax.plot(group["__x"], group[f"{metric}_mean"], marker="o", label=name)
            low, high = group[f"{metric}_low"].to_numpy(), group[f"{metric}_high"].to_numpy()
            ok = np.isfinite(low) & np.isfinite(high)
            if ok.any():
                ax.fill_between(group["__x"][ok], low[ok], high[ok], color=line.get_color(), alpha=0.2, lw=0)
            if ceiling_col and ceiling_col in analysis.metrics:
                value = group[f"{ceiling_col}_mean"].mean()
                if np.isfinite(value):
                    ceilings.append((value, line.get_color(), name))
        if ceilings:
            values = np.array([c[0] for c in ceilings])
            if np.ptp(values) <= 0.01 * abs(values).max() or len(ceilings) == 1:
                ax.axhline(
                    values.mean(),
                    color="black",
                    ls="--",
                    lw=1,
                    label=f"{ceiling_name} ({ceiling_col}, mean {values.mean():.4g})",
                )
            else:
                for value, color, name in ceilings:
                    ax.axhline(value, color=color, ls="--", lw=1, label=f"{ceiling_name}: {name}")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(label(metric))
        better = (
            "lower is better" if BY_NAME.get(metric) and BY_NAME[metric].lower_is_better else "higher is better"
        )
        ax.set_title(
            f"{metric} against {X_LABELS.get(x, x)} ({better})\nmean and {analysis.settings.describe()}",
            fontsize="medium",
        )
        if x == "num_steps" and data["__x"].max() / max(data["__x"].min(), 1e-9) >= 10:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        fig.legend(loc="outside lower center", fontsize="small", ncols=1 if n_series > 4 else 2)
        written.append(_save(fig, Path(out_dir) / f"fig_{metric}.png"))
    return written


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points not dominated when both x and y are to be maximised."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep


def pareto_figures(analysis: Analysis, out_dir: Path) -> list[Path]:
    """``pareto_<fidelity>.png``: fidelity against edit success per configuration (with intervals), the
    Pareto front drawn; [] when no row has ``edit_success``."""
    from matplotlib.figure import Figure

    if "edit_success" not in analysis.metrics:
        return []
    color_key = analysis.compare or (analysis.keys[0] if analysis.keys else None)
    written = []
    for fidelity in FIDELITY:
        if fidelity not in analysis.metrics:
            continue
        t = analysis.intervals.dropna(subset=["edit_success_mean", f"{fidelity}_mean"])
        if t.empty:
            continue
        fig = Figure(figsize=(7, 5), layout="constrained")
        ax = fig.add_subplot()
        groups = t.groupby(color_key, dropna=False, sort=True) if color_key else [("all", t)]
        for value, g in groups:
            xerr = np.abs(
                np.vstack(
                    [
                        g["edit_success_mean"] - g["edit_success_low"],
                        g["edit_success_high"] - g["edit_success_mean"],
                    ]
                )
            )
            yerr = np.abs(
                np.vstack(
                    [
                        g[f"{fidelity}_mean"] - g[f"{fidelity}_low"],
                        g[f"{fidelity}_high"] - g[f"{fidelity}_mean"],
                    ]
                )
            )
            ax.errorbar(
                g["edit_success_mean"],
                g[f"{fidelity}_mean"],
                xerr=np.nan_to_num(xerr),
                yerr=np.nan_to_num(yerr),
                fmt="o",
                capsize=2,
                label=f"{color_key}={fmt(value)}" if color_key else "configs",
            )
        sign = -1.0 if BY_NAME[fidelity].lower_is_better else 1.0
        xs, ys = t["edit_success_mean"].to_numpy(), t[f"{fidelity}_mean"].to_numpy()
        front = pareto_front(xs, sign * ys)
        order = np.argsort(xs[front])
        ax.plot(xs[front][order], ys[front][order], color="black", lw=1, ls=":", label="Pareto front")
        label_keys = [k for k in analysis.keys if k != color_key] if color_key else analysis.keys
        for (_, row), on_front in zip(t.iterrows(), front, strict=True):  # name the front's configurations
            if on_front and label_keys:
                ax.annotate(
                    _series_label(label_keys, tuple(row[k] for k in label_keys)),
                    (row["edit_success_mean"], row[f"{fidelity}_mean"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel(label("edit_success"))
        ax.set_ylabel(label(fidelity))
        ax.set_title(
            f"{fidelity} against edit success per configuration\nmean and {analysis.settings.describe()}",
            fontsize="medium",
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        written.append(_save(fig, Path(out_dir) / f"pareto_{fidelity}.png"))
    return written


# -- qualitative grids ------------------------------------------------------------------------------------


def grid_geometry(width: int, height: int, columns_hint: int | None = None):
    """(rows, header height, cell size, columns) of a grid saved by ``records.save_grid``, from its pixel size;
    None when no layout fits. ``columns_hint`` picks among several fitting layouts. A grid with tile captions
    has ``GRID_CAPTION_LINES`` text lines under each row of tiles (its row pitch is (height − header − pad) /
    rows)."""
    from ddim_lab.records import GRID_CAPTION_LINES, GRID_HEADER_LINES, GRID_PAD

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


def _match_images(df: pd.DataFrame, wanted: list[str]) -> dict[str, str]:
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


def _text_strip(text: str, width: int):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    strip = Image.new("RGB", (width, 22), (235, 235, 235))
    ImageDraw.Draw(strip).text((4, 3), text, fill=(0, 0, 0), font=font)
    return strip


def _metric_strip(rows: pd.DataFrame, width: int, cell: int, columns: int):
    """A strip with each result tile's PSNR and SSIM under it (the image's rows are in the grid's column order,
    after the input and VAE columns); None when the rows do not match the grid's columns."""
    from PIL import Image, ImageDraw, ImageFont

    from ddim_lab.records import GRID_PAD

    offset = columns - len(rows)  # input, VAE round-trip (and a control column)
    if len(rows) == 0 or offset < 2 or not {"psnr", "ssim"} & set(rows.columns):
        return None
    font = ImageFont.load_default(size=11)
    strip = Image.new("RGB", (width, 30), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    label_w = max(cell, 96)
    for j, (_, row) in enumerate(rows.iterrows()):
        x0 = label_w + GRID_PAD + (offset + j) * (cell + GRID_PAD)
        lines = [f"{m.upper()} {fmt(float(row[m]))}" for m in ("psnr", "ssim") if m in row and pd.notna(row[m])]
        for i, line in enumerate(lines):
            draw.text((x0, 2 + 13 * i), line, fill=(0, 0, 0), font=font)
    return strip


def image_bands(df: pd.DataFrame, root: Path, image: str, keys: list[str]):
    """(caption, header band, row band, metric strip or None) of ``image`` in every run under ``root`` that has
    its grid."""
    from PIL import Image

    bands = []
    without_grid = []
    natural = lambda item: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(item[0]))]  # noqa: E731
    for run_dir, rows in sorted(df.groupby("run_dir", sort=False), key=natural):
        if image not in set(rows["image"].astype(str)):
            continue
        grids = sorted((Path(root) / run_dir).glob("grid_*.png"))
        if not grids:
            without_grid.append(str(run_dir))
            continue
        order = list(dict.fromkeys(rows["image"].astype(str)))
        points = rows[
            [c for c in ("guidance_scale", "start_step", "edit_prompt") if c in rows]
        ].drop_duplicates()
        hint = 2 + len(points) + (1 if "control" in rows and rows["control"].ne("none").any() else 0)
        with Image.open(grids[0]) as first:
            geometry = grid_geometry(first.width, first.height, hint)
            first_height = first.height
        if geometry is None:
            logger.warning("run %s: grid layout not recognised: no tile for %s", run_dir, image)
            continue
        per_grid, header, cell, _ = geometry
        position = order.index(image)
        index, row = divmod(position, per_grid)
        if index >= len(grids):
            logger.warning("run %s: %s is not in its saved grids", run_dir, image)
            continue
        from ddim_lab.records import GRID_PAD

        with Image.open(grids[index]) as grid:
            grid = grid.convert("RGB")
            pitch = (first_height - header - GRID_PAD) // per_grid  # tiles, their captions if any, padding
            top = header + row * pitch
            if top + cell > grid.height:
                logger.warning("run %s: %s is not in its saved grids", run_dir, image)
                continue
            head = grid.crop((0, 0, grid.width, header))
            band = grid.crop((0, top, grid.width, top + pitch - GRID_PAD))
        strip = _metric_strip(rows[rows["image"].astype(str) == image], grid.width, cell, geometry[3])
        config = ", ".join(
            f"{k}={key_text(k, rows[k].iloc[0])}"
            for k in keys
            if k in rows and rows[k].nunique(dropna=False) == 1
        )
        bands.append((f"{run_dir}: {config}" if config else str(run_dir), head, band, strip))
    if without_grid:
        shown = ", ".join(without_grid[:5]) + (", …" if len(without_grid) > 5 else "")
        logger.warning(
            "no grid_*.png in %d run(s) with %s (%s): no tile from them", len(without_grid), image, shown
        )
    return bands


def qualitative_grids(df: pd.DataFrame, root: Path, image_ids: list[str], out_dir: Path, keys: list[str]):
    """``qual_<id>.png`` per requested image: its row of every run's saved grid, each under its run's config
    (the grid's own column headers kept). Returns {id: path}."""
    from PIL import Image

    from ddim_lab.records import atomic_write

    written = {}
    if "run_dir" not in df.columns:
        return written
    for wanted, image in _match_images(df, image_ids).items():
        bands = image_bands(df, root, image, keys)
        if not bands:
            continue
        width = max(b[2].width for b in bands)  # bands of runs with fewer grid points are narrower
        parts = []
        for caption, head, band, strip in bands:
            parts += [_text_strip(caption, width), head, band] + ([strip] if strip is not None else [])
        canvas = Image.new("RGB", (width, sum(p.height for p in parts)), (255, 255, 255))
        y = 0
        for p in parts:
            canvas.paste(p, (0, y))
            y += p.height
        stem = wanted[: -len(Path(wanted).suffix)] if Path(wanted).suffix.lower() in IMAGE_SUFFIXES else wanted
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "image"
        path = Path(out_dir) / f"qual_{safe}.png"
        written[wanted] = atomic_write(path, lambda tmp, c=canvas: c.save(tmp, format="PNG"))
    return written
