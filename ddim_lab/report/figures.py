"""Report figures from the saved tables: metric curves with interval bands and Pareto plots.

- :func:`metric_figures`: each metric against the budget (``budget_nfe``), ``num_steps`` or ``start_step``,
  one line per combination of the other varying keys, with its bootstrap band, a title, units, and the VAE
  ceiling (``vae_psnr``) on PSNR (``vae_lpips``, the floor, on LPIPS). Lines that coincide get distinct hollow
  markers and line styles, and the legend names them.
- :func:`pareto_figures`: fidelity (SSIM, PSNR, LPIPS) against ``edit_success`` per configuration, the Pareto
  front marked, when rows carry ``edit_success``. Front points are labelled ``#i``, the row of the intervals
  table; the figure's caption spells out their full settings (knobs included).

Qualitative grids (the saved images side by side) are in :mod:`ddim_lab.report.grids`.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report.analysis import Analysis
from ddim_lab.report.stats import derived_keys
from ddim_lab.report.text import MARK, config_label, short_value
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
X_KEYS = ("budget_nfe", "num_steps", "start_step")  # the x axis of the metric figures, first that varies
X_LABELS = {
    "budget_nfe": "budget (model evaluations per image)",
    "num_steps": "steps N",
    "start_step": "start step k (steps skipped)",
}
LEGEND_WIDTH = 60  # characters per legend line: longer labels wrap onto more lines, never cut
NOTE_WIDTH = 90  # characters per line of a note under a figure's legend
CAPTION_WIDTH = 110  # characters per caption line of a Pareto figure
CAPTION_POINTS = 12  # front points spelled out in a caption (the intervals table has them all)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
COINCIDE = 1e-3  # lines closer than this share of the y range everywhere coincide on the plot


def _save(fig, path: Path) -> Path:
    from ddim_lab.study.records import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _series_label(keys: list[str], values: tuple, width: int = LEGEND_WIDTH) -> str:
    """:func:`config_label` wrapped onto lines of ``width`` characters (nothing is cut)."""
    return "\n".join(textwrap.wrap(config_label(keys, values), width))


def figure_x(keys: list[str], derived: list[str] = ()) -> str | None:
    """The x axis of the metric figures: the first of :data:`X_KEYS` that varies and is not ``derived`` (the
    num_steps each method picks at a budget), else None."""
    return next((c for c in X_KEYS if c in keys and c not in derived), None)


def coinciding(lines: list[tuple[np.ndarray, np.ndarray]], scale: float) -> list[list[int]]:
    """Clusters (two or more indices) of ``lines`` ((x, y) sorted by x) that lie on top of each other: the same
    x values and y within ``COINCIDE × scale`` everywhere."""
    clusters: list[list[int]] = []
    for i, (x, y) in enumerate(lines):
        for cluster in clusters:
            x0, y0 = lines[cluster[0]]
            if len(x) == len(x0) and np.array_equal(x, x0) and np.all(np.abs(y - y0) <= COINCIDE * scale):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return [c for c in clusters if len(c) > 1]


def metric_figures(analysis: Analysis, out_dir: Path, metrics=FIGURE_METRICS) -> list[Path]:
    """``fig_<metric>.png`` for each measured metric against the step key; [] when no step key varies."""
    from matplotlib.figure import Figure

    derived = derived_keys(analysis.rows)
    x = figure_x(analysis.keys, derived)
    if x is None:
        logger.warning("no metric figures: neither %s varies", ", ".join(c for c in X_KEYS if c not in derived))
        return []
    series = [k for k in analysis.keys if k != x and k not in derived]
    table = analysis.intervals.copy()
    table["__x"] = pd.to_numeric(table[x], errors="coerce").astype("float64")
    x_label = X_LABELS.get(x, x)
    written = []
    for metric in metrics:
        if metric not in analysis.metrics:
            logger.info("no figure for %s: no values", metric)
            continue
        data = table.dropna(subset=["__x", f"{metric}_mean"])
        if data.empty:
            continue
        groups = list(data.groupby(series, dropna=False, sort=True)) if series else [((), data)]
        groups = [(k if isinstance(k, tuple) else (k,), g.sort_values("__x")) for k, g in groups]
        curves = [(g["__x"].to_numpy(), g[f"{metric}_mean"].to_numpy(dtype=float)) for _, g in groups]
        values = np.concatenate([y for _, y in curves])
        scale = float(np.ptp(values)) or float(np.abs(values).max()) or 1.0
        clusters = coinciding(curves, scale)
        shared = {i: rank for c in clusters for rank, i in enumerate(c)}  # index → its place in its cluster
        n_lines = sum(_series_label(series, k).count("\n") + 1 for k, _ in groups) if series else 1
        fig = Figure(figsize=(7.5, 4.5 + 0.2 * (n_lines + 3 * len(clusters) + 1)), layout="constrained")
        ax = fig.add_subplot()
        ceiling_col, ceiling_name = CEILINGS.get(metric, (None, None))
        ceilings, names, marked = [], {}, False
        for i, (key, group) in enumerate(groups):
            name = _series_label(series, key) or metric
            if group["by_construction"].all():
                name, marked = f"{name} {MARK}", True
            names[i] = name
            style = {
                "marker": MARKERS[i % len(MARKERS)],
                "ls": LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)],
            }
            if i in shared:  # hollow markers, each smaller than the one drawn before it: every one shows
                style.update(
                    mfc="none", ms=11 - 3 * min(shared[i], 2), ls=LINESTYLES[shared[i] % len(LINESTYLES)]
                )
            (line,) = ax.plot(group["__x"], group[f"{metric}_mean"], label=name, **style)
            low, high = group[f"{metric}_low"].to_numpy(), group[f"{metric}_high"].to_numpy()
            ok = np.isfinite(low) & np.isfinite(high)
            if ok.any():
                ax.fill_between(group["__x"][ok], low[ok], high[ok], color=line.get_color(), alpha=0.2, lw=0)
            if ceiling_col and ceiling_col in analysis.references:
                value = group[f"{ceiling_col}_mean"].mean()
                if np.isfinite(value):
                    ceilings.append((value, line.get_color(), name))
        if ceilings:
            levels = np.array([c[0] for c in ceilings])
            if np.ptp(levels) <= 0.01 * abs(levels).max() or len(ceilings) == 1:
                ax.axhline(
                    levels.mean(),
                    color="black",
                    ls="--",
                    lw=1,
                    label=f"{ceiling_name} ({ceiling_col}, mean {levels.mean():.4g})",
                )
            else:
                for value, color, name in ceilings:
                    ax.axhline(value, color=color, ls="--", lw=1, label=f"{ceiling_name}: {name}")
        notes = [
            "coincide (same values, drawn with hollow markers): "
            + "; ".join(names[i].replace("\n", " ") for i in c)
            for c in clusters
        ]
        if marked:
            notes.append(f"{MARK} reconstruction returns the input by construction (scores measure the VAE)")
        for note in notes:  # a legend entry without a handle: laid out with the legend, never cut
            ax.plot([], [], " ", label="\n".join(textwrap.wrap(note, NOTE_WIDTH)))
        ax.set_xlabel(x_label)
        ax.set_ylabel(label(metric))
        better = (
            "lower is better" if BY_NAME.get(metric) and BY_NAME[metric].lower_is_better else "higher is better"
        )
        ax.set_title(
            f"{metric} against {x_label} ({better})\nmean and {analysis.settings.describe()}",
            fontsize="medium",
        )
        if x == "num_steps" and data["__x"].max() / max(data["__x"].min(), 1e-9) >= 10:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        one_column = len(groups) > 4 or bool(notes)  # notes are wide: one column keeps them inside the figure
        fig.legend(loc="outside lower center", fontsize="small", ncols=1 if one_column else 2)
        written.append(_save(fig, Path(out_dir) / f"fig_{metric}.png"))
    return written


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points not dominated when both x and y are to be maximised."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep


def pareto_caption(analysis: Analysis, rows: pd.DataFrame, keys: list[str]) -> str:
    """The settings of the front's points ``rows`` (intervals-table rows, index = position), one ``#i`` each,
    wrapped to the figure's width."""
    lines = []
    for position, row in list(rows.iterrows())[:CAPTION_POINTS]:
        text = config_label(keys, tuple(row[k] for k in keys)) or "the only configuration"
        lines += textwrap.wrap(f"#{position + 1}: {text}", CAPTION_WIDTH, subsequent_indent="    ")
    if len(rows) > CAPTION_POINTS:
        lines.append(f"… and {len(rows) - CAPTION_POINTS} more front points: rows of the intervals table")
    return "\n".join(["Pareto front (#i = row i of the intervals table):", *lines])


def pareto_figures(analysis: Analysis, out_dir: Path) -> list[Path]:
    """``pareto_<fidelity>.png``: fidelity against edit success per configuration (with intervals), the
    Pareto front drawn and its points named ``#i`` (the intervals-table row) with their settings spelled out
    in the caption under the plot; [] when no row has ``edit_success``."""
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
        sign = -1.0 if BY_NAME[fidelity].lower_is_better else 1.0
        xs, ys = t["edit_success_mean"].to_numpy(), t[f"{fidelity}_mean"].to_numpy()
        front = pareto_front(xs, sign * ys)
        caption = pareto_caption(analysis, t[front], analysis.keys)
        n_caption = caption.count("\n") + 1
        fig = Figure(figsize=(7.5, 5 + 0.17 * n_caption), layout="constrained")
        ax, below = fig.subplots(2, 1, height_ratios=[5, 0.17 * n_caption + 0.1])
        groups = t.groupby(color_key, dropna=False, sort=True) if color_key else [("all", t)]
        for n, (value, g) in enumerate(groups):
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
            name = (
                short_value(color_key, value[0] if isinstance(value, tuple) else value)
                if color_key
                else "configs"
            )
            ax.errorbar(
                g["edit_success_mean"],
                g[f"{fidelity}_mean"],
                xerr=np.nan_to_num(xerr),
                yerr=np.nan_to_num(yerr),
                fmt=MARKERS[n % len(MARKERS)],
                capsize=2,
                label="\n".join(textwrap.wrap(name, 30)),
            )
        order = np.argsort(xs[front])
        ax.plot(xs[front][order], ys[front][order], color="black", lw=1, ls=":", label="Pareto front")
        for position, row in t[front].iterrows():  # the front's points by their intervals-table row
            ax.annotate(
                f"#{position + 1}",
                (row["edit_success_mean"], row[f"{fidelity}_mean"]),
                fontsize=7,
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
        ax.legend(fontsize="small", title=color_key, title_fontsize="small", loc="best")
        below.axis("off")
        below.text(
            0, 1, caption, va="top", ha="left", fontsize=7, family="monospace", transform=below.transAxes
        )
        written.append(_save(fig, Path(out_dir) / f"pareto_{fidelity}.png"))
    return written
