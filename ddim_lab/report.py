"""``ddim-lab-report DIR``: merge the results.parquet of every run under DIR into a table, summary, figures."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from ddim_lab.records import RESULTS_PARQUET, atomic_write

logger = logging.getLogger(__name__)

CONFIG_COLUMNS = (
    "task",
    "model",
    "scheduler",
    "inverter",
    "num_steps",
    "inversion_guidance_scale",
    "guidance_scale",
    "start_step",
    "eta",
    "edit_prompt",
)
SUMMARY_METRICS = ("psnr", "ssim", "lpips", "latent_mse", "vae_psnr", "unet_evals", "seconds")
FIGURE_METRICS = ("psnr", "ssim", "lpips")
MISSING = "n/a"
LEGEND_CHARS = 60

REPORT_PARQUET = "report.parquet"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"


class NoResultsError(FileNotFoundError):
    """The directory holds no results.parquet."""


def collect_results(root: Path) -> pd.DataFrame:
    """Concatenate every ``results.parquet`` under ``root`` adding ``run_dir`` (relative path)."""
    root = Path(root)
    paths = sorted(root.rglob(RESULTS_PARQUET))
    if not paths:
        raise NoResultsError(f"no {RESULTS_PARQUET} found under {root}")
    frames = []
    for path in paths:
        df = pd.read_parquet(path)
        df.insert(0, "run_dir", path.parent.relative_to(root).as_posix())
        frames.append(df)
        logger.info("read %d rows from %s", len(df), path)
    frames = [f for f in frames if len(f)] or frames[:1]  # concat with empty frames would blur the dtypes
    return pd.concat(frames, ignore_index=True)


def varying_columns(df: pd.DataFrame, candidates: tuple[str, ...] = CONFIG_COLUMNS) -> list[str]:
    """The candidate columns present in ``df`` that take more than one value (missing counts as a value)."""
    return [c for c in candidates if c in df.columns and df[c].nunique(dropna=False) > 1]


def _fmt(value: object) -> str:
    """A cell value as text: missing as ``MISSING``, floats with 4 significant digits."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def measured_metrics(df: pd.DataFrame) -> list[str]:
    """The summary metrics with at least one value in ``df``."""
    present = [m for m in SUMMARY_METRICS if m in df.columns]
    return [m for m in present if pd.to_numeric(df[m], errors="coerce").notna().any()]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (± std when more than one value) of each measured metric per combination of the varying configs."""
    keys = varying_columns(df)
    metrics = measured_metrics(df)
    values = df[metrics].apply(pd.to_numeric, errors="coerce").astype("float64")
    groups = values.groupby([df[k] for k in keys], dropna=False, sort=True) if keys else [((), values)]
    records = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        record = {k: _fmt(v) for k, v in zip(keys, key, strict=True)}
        record["n"] = str(len(group))
        for m in metrics:
            col = group[m].dropna()
            if col.empty:
                record[m] = MISSING
            elif len(col) > 1:
                record[m] = f"{_fmt(float(col.mean()))} ± {_fmt(float(col.std()))}"
            else:
                record[m] = _fmt(float(col.iloc[0]))
        records.append(record)
    return pd.DataFrame.from_records(records, columns=[*keys, "n", *metrics])


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-markdown table of string cells (no tabulate dependency)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(df: pd.DataFrame) -> str:
    """The report: counts, the varying config columns, then the summary table."""
    keys = varying_columns(df)
    n_images = df["image"].nunique() if "image" in df.columns else 0
    unmeasured = [m for m in SUMMARY_METRICS if m not in measured_metrics(df)]
    lines = [
        "# ddim_lab report",
        "",
        f"- rows: {len(df)}",
        f"- runs: {df['run_dir'].nunique()}",
        f"- images: {n_images}",
        f"- varying config columns: {', '.join(keys) if keys else 'none'}",
        f"- not measured in any row: {', '.join(unmeasured) if unmeasured else 'none'}",
        "",
        f"Mean ± std over rows per config; `{MISSING}` = not measured.",
        "",
        markdown_table(summarize(df)),
        "",
    ]
    return "\n".join(lines)


def _metric_figure(df: pd.DataFrame, metric: str, x: str, series: list[str], path: Path) -> bool:
    """Plot the mean of ``metric`` vs ``x``, one line per ``series`` combination; False if no data."""
    from matplotlib.figure import Figure  # Figure without pyplot renders with Agg, no global backend state

    data = df[[x, *series]].copy()
    data[metric] = pd.to_numeric(df[metric], errors="coerce").astype("float64")
    data[x] = pd.to_numeric(data[x], errors="coerce").astype("float64")
    data = data.dropna(subset=[x, metric])
    if data.empty:
        return False
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    lines = data.groupby(series, dropna=False, sort=True) if series else [((), data)]
    for key, group in lines:
        key = key if isinstance(key, tuple) else (key,)
        curve = group.groupby(x, sort=True)[metric].mean()
        label = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(series, key, strict=True)) or metric
        label = label if len(label) <= LEGEND_CHARS else label[: LEGEND_CHARS - 1] + "…"
        ax.plot(curve.index, curve.to_numpy(), marker="o", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return True


def make_figures(out_dir: Path) -> list[Path]:
    """Plot psnr/ssim/lpips from ``out_dir/report.parquet`` vs num_steps (or start_step) as fig_<metric>.png."""
    out_dir = Path(out_dir)
    df = pd.read_parquet(out_dir / REPORT_PARQUET)
    keys = varying_columns(df)
    x = next((c for c in ("num_steps", "start_step") if c in keys), None)
    if x is None:
        logger.warning("no figures: neither num_steps nor start_step varies")
        return []
    series = [k for k in keys if k != x]
    written = []
    for metric in FIGURE_METRICS:
        path = out_dir / f"fig_{metric}.png"
        if metric in df.columns and _metric_figure(df, metric, x, series, path):
            written.append(path)
        else:
            logger.info("no figure for %s: no values", metric)
    return written


def write_report(root: Path, out_dir: Path) -> pd.DataFrame:
    """Merge the results under ``root`` and write report.parquet, report.csv and report.md into ``out_dir``."""
    df = collect_results(root)
    out_dir = Path(out_dir)
    atomic_write(out_dir / REPORT_PARQUET, lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(out_dir / REPORT_CSV, lambda tmp: df.to_csv(tmp, index=False))
    text = render_markdown(df)
    atomic_write(out_dir / REPORT_MD, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.info("report of %d rows written to %s", len(df), out_dir)
    return df


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (2 when DIR holds no results)."""
    parser = argparse.ArgumentParser(prog="ddim-lab-report", description=__doc__)
    parser.add_argument("dir", type=Path, help="a run directory or a Hydra multirun directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    parser.add_argument("--figures", action="store_true", help="also plot psnr/ssim/lpips as fig_<metric>.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    out_dir = args.out if args.out is not None else args.dir
    try:
        write_report(args.dir, out_dir)
    except NoResultsError as err:
        logger.error("ddim-lab-report: %s", err)
        return 2
    if args.figures:
        for path in make_figures(out_dir):
            logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
