"""The figures a study declares (``report.figures``): metrics against a cost or a key, lines with bands.

One panel per ``y`` metric (rows of panels) and per value of ``panels`` (columns). Within a panel:

1. points: the rows grouped by ``panels``, ``lines``, ``along`` (and ``annotate``); each point's y is the
   metric's mean with its bootstrap interval (:func:`ddim_lab.report.stats.group_intervals`), its x the value of
   ``x`` when ``x`` is the key the line runs along, else the mean of column ``x`` (a cost such as ``nfe``);
2. a line per ``lines`` combination through its points in x order, its interval as a band, one colour per
   line across panels, a line style per value of ``styles``;
3. grey verticals at the values of ``marks``; the VAE ceiling (``figures.CEILINGS``) on PSNR;
4. a trade-off plot (x a metric such as ``edit_success``): ``xbars`` draws both intervals as bars (with
   ``bands: false``); ``front`` joins the panel's Pareto front (points no other point beats on both axes,
   each axis by its better direction).

The PNG carries no software or time stamp, so its bytes depend only on the rows (and the plotting library).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.config.report_spec import fill_template
from ddim_lab.report.figures import CEILINGS, LINESTYLES, pareto_front
from ddim_lab.report.protocols import mixes_protocols
from ddim_lab.report.stats import Bootstrap, group_intervals
from ddim_lab.report.text import short_value
from ddim_lab.schema import BY_NAME, PROTOCOL, label
from ddim_lab.study.records import atomic_write

logger = logging.getLogger(__name__)

DPI = 110
PANEL_SIZE = (6.5, 4.5)  # inches per panel
PNG_METADATA = {"Software": None}  # no library version in the file: the same rows give the same bytes


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically, with fixed metadata."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA))


def _line_name(keys: list[str], values: tuple) -> str:
    return " / ".join(short_value(k, v) for k, v in zip(keys, values, strict=True)) or "all"


def _better_up(column: str) -> float:
    """+1 where a larger value is better, −1 where smaller is (LPIPS); +1 for a column the schema lacks."""
    return -1.0 if column in BY_NAME and BY_NAME[column].lower_is_better else 1.0


def _draw_front(ax, part: pd.DataFrame, x_col: str, x: str, metric: str) -> None:
    """Step 4: the Pareto front of one panel's points, a dotted black line in x order."""
    pts = part.dropna(subset=[x_col, f"{metric}_mean"])
    if pts.empty:
        return
    xs, ys = pts[x_col].to_numpy(float), pts[f"{metric}_mean"].to_numpy(float)
    keep = pareto_front(_better_up(x) * xs, _better_up(metric) * ys)
    order = np.argsort(xs[keep], kind="stable")
    ax.plot(xs[keep][order], ys[keep][order], color="black", lw=1, ls=":", label="Pareto front")


def study_figure(rows: pd.DataFrame, spec: dict, settings: Bootstrap, path: Path, where: str) -> Path | None:
    """Draw one declared figure from ``rows`` into ``path``; None (with a warning) when no metric has values."""
    import matplotlib
    from matplotlib.figure import Figure

    metrics = [m for m in spec["y"] if pd.to_numeric(rows[m], errors="coerce").notna().any()]
    if not metrics:
        logger.warning("%s: no figure, none of %s has a value", where, ", ".join(spec["y"]))
        return None
    along, lines, panel_key = spec["along"] or spec["x"], list(spec["lines"]), spec["panels"]
    keys = [*([panel_key] if panel_key else []), *lines, along]
    keys += [spec["annotate"]] if spec["annotate"] and spec["annotate"] not in keys else []
    if mixes_protocols(rows) and PROTOCOL not in keys:
        keys.append(PROTOCOL)  # a point never pools protocols
    x_col = "__x" if spec["x"] == along else f"{spec['x']}_mean"
    points = group_intervals(rows, keys, [*metrics, *([] if spec["x"] == along else [spec["x"]])], settings)
    points["__x"] = pd.to_numeric(points[along], errors="coerce").astype("float64")
    panels = sorted(points[panel_key].dropna().unique().tolist()) if panel_key else [None]
    arms = sorted({tuple(r) for r in points[lines].astype(object).itertuples(index=False)}, key=str)
    palette = matplotlib.colormaps["tab10" if len(arms) <= 10 else "tab20"]
    colors = {arm: palette(n % palette.N) for n, arm in enumerate(arms)}
    style_values = sorted(rows[spec["styles"]].dropna().astype(str).unique()) if spec["styles"] else []
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1] * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(panels), squeeze=False)
    for col, panel in enumerate(panels):
        part = points[points[panel_key] == panel] if panel_key else points
        raw = rows[rows[panel_key] == panel] if panel_key else rows
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            groups = part.groupby(lines, sort=True, dropna=False) if lines else [((), part)]
            for arm, line in groups:
                arm = arm if isinstance(arm, tuple) else (arm,)
                line = line.dropna(subset=[x_col, f"{metric}_mean"]).sort_values(x_col, kind="stable")
                if line.empty:
                    continue
                style = "-"
                if spec["styles"]:
                    value = str(
                        dict(zip(lines, arm, strict=True)).get(spec["styles"], line[spec["styles"]].iloc[0])
                    )
                    style = LINESTYLES[style_values.index(value) % len(LINESTYLES)]
                color = colors.get(arm, "black")
                x = line[x_col].to_numpy()
                ax.plot(
                    x,
                    line[f"{metric}_mean"],
                    style,
                    marker="o",
                    ms=3,
                    color=color,
                    label=_line_name(lines, arm),
                )
                low, high = line[f"{metric}_low"].to_numpy(float), line[f"{metric}_high"].to_numpy(float)
                ok = np.isfinite(low) & np.isfinite(high)
                if spec["bands"] and ok.any():
                    ax.fill_between(x[ok], low[ok], high[ok], color=color, alpha=0.15, lw=0)
                if spec.get("xbars") and x_col != "__x":  # both intervals as bars
                    lo, hi = line[f"{spec['x']}_low"].to_numpy(float), line[f"{spec['x']}_high"].to_numpy(float)
                    y = line[f"{metric}_mean"].to_numpy(float)
                    xerr = np.nan_to_num(np.abs(np.vstack([x - lo, hi - x])))
                    yerr = np.nan_to_num(np.abs(np.vstack([y - low, high - y])))
                    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=color, alpha=0.5, capsize=2)
                if spec["annotate"]:
                    for xv, yv, text in zip(x, line[f"{metric}_mean"], line[spec["annotate"]], strict=True):
                        ax.annotate(short_value(spec["annotate"], text), (xv, yv), fontsize=7, alpha=0.6)
            if spec.get("front"):
                _draw_front(ax, part, x_col, spec["x"], metric)
            if spec["marks"]:
                for value in sorted(pd.to_numeric(raw[spec["marks"]], errors="coerce").dropna().unique()):
                    ax.axvline(float(value), color="0.85", lw=0.8, zorder=0)
            ceiling, name = CEILINGS.get(metric, (None, None))
            if ceiling in raw.columns and pd.to_numeric(raw[ceiling], errors="coerce").notna().any():
                level = float(pd.to_numeric(raw[ceiling], errors="coerce").mean())
                ax.axhline(level, color="0.4", ls=":", lw=1, label=f"{name} ({level:.2f})")
            fields = {"metric": metric, "label": label(metric), "panel": panel}
            ax.set_xscale(spec["xscale"])
            ax.set_xlabel(
                fill_template(spec["xlabel"], fields, f"{where}.xlabel") if spec["xlabel"] else label(spec["x"])
            )
            ax.set_ylabel(
                fill_template(spec["ylabel"], fields, f"{where}.ylabel") if spec["ylabel"] else label(metric)
            )
            default_title = f"{panel_key}={short_value(panel_key, panel)}: {metric}" if panel_key else metric
            ax.set_title(
                fill_template(spec["title"], fields, f"{where}.title") if spec["title"] else default_title
            )
            ax.grid(True, alpha=0.3)
    axes[0, -1].legend(fontsize="x-small", loc="best")
    if spec["suptitle"]:
        fig.suptitle(fill_template(spec["suptitle"], {}, f"{where}.suptitle"))
    return save_png(fig, path)
