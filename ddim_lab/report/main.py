"""``ddim-lab-report DIR``: merge the results.parquet of every run under DIR into a table, summary, figures."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from ddim_lab.report.replicates import without_seed
from ddim_lab.schema import CONFIG_KEYS, grouping_keys, normalize
from ddim_lab.study.records import PARTS_DIR, RESULTS_PARQUET, atomic_write, read_results

logger = logging.getLogger(__name__)

CONFIG_COLUMNS = CONFIG_KEYS  # every config key of the schema (ddim_lab/schema.py)
SUMMARY_METRICS = ("psnr", "ssim", "lpips", "latent_mse", "vae_psnr", "unet_evals", "seconds")
MISSING = "n/a"

REPORT_PARQUET = "report.parquet"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"


class NoResultsError(FileNotFoundError):
    """The directory holds no results.parquet."""


def run_dirs(root: Path) -> list[Path]:
    """Run directories under ``root``: those with a ``results.parquet`` or row parts (unfinished runs)."""
    root = Path(root)
    found = {p.parent for p in root.rglob(RESULTS_PARQUET)}
    found |= {p.parent.parent for p in root.rglob(f"{PARTS_DIR}/*.parquet")}
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def collect_results(root: Path) -> pd.DataFrame:
    """Concatenate the rows of every run under ``root`` (parts merged for unfinished runs), adding
    ``run_dir`` (relative path)."""
    root = Path(root)
    frames = []
    for run_dir in run_dirs(root):
        finished = (run_dir / "done.json").exists() and (run_dir / RESULTS_PARQUET).exists()
        df = pd.read_parquet(run_dir / RESULTS_PARQUET) if finished else read_results(run_dir)
        if df is None:
            continue
        df.insert(0, "run_dir", run_dir.relative_to(root).as_posix())
        frames.append(df)
        logger.info("read %d rows from %s", len(df), run_dir)
    if not frames:
        raise NoResultsError(f"no {RESULTS_PARQUET} found under {root}")
    frames = [f for f in frames if len(f)] or frames[:1]  # concat with empty frames would blur the dtypes
    return pd.concat(frames, ignore_index=True)


def job_problems(root: Path) -> list[str]:
    """One line per job of the sweep under ``root`` that failed or is missing (never ran, or unfinished)."""
    from ddim_lab.study.sweep import failure_line, sweep_jobs

    lines = []
    for job in sweep_jobs(root):
        if job["status"] == "failed":
            lines.append(failure_line(job))
        elif job["status"] != "done":
            what = "unfinished (running or killed)" if job["status"] == "running" else "missing (never ran)"
            lines.append(f"job {job['dir']} [{' '.join(job.get('overrides', []))}] {what}")
    return lines


def varying_columns(df: pd.DataFrame, candidates: tuple[str, ...] | None = None) -> list[str]:
    """The candidate columns present in ``df`` that take more than one value (missing counts as a value).

    By default the schema's grouping keys: every config column that varies (undeclared text columns too),
    except those with one value per image, which vary only with the image (``schema.grouping_keys``)."""
    if candidates is None:
        return without_seed(grouping_keys(normalize(df))[0], df)
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
    df = normalize(df)  # an empty edit_prompt and a null one are both a reconstruction
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


def render_markdown(df: pd.DataFrame, problems: list[str] | None = None) -> str:
    """The report: counts, the varying config columns, the summary table, then failed and missing jobs."""
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
    if problems:
        lines += [f"## Failed or missing jobs ({len(problems)})", "", *[f"- {p}" for p in problems], ""]
    return "\n".join(lines)


def make_figures(out_dir: Path, settings=None) -> list[Path]:
    """Figures from ``out_dir/report.parquet`` only: each metric against num_steps (or start_step) with
    bootstrap bands and the VAE ceiling (``fig_<metric>.png``), and Pareto plots when rows carry
    ``edit_success``."""
    from ddim_lab.report.analysis import analyze
    from ddim_lab.report.figures import metric_figures, pareto_figures

    out_dir = Path(out_dir)
    df = pd.read_parquet(out_dir / REPORT_PARQUET)
    analysis = analyze(df, settings) if settings is not None else analyze(df)
    return metric_figures(analysis, out_dir) + pareto_figures(analysis, out_dir)


def write_report(root: Path, out_dir: Path, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Merge the results under ``root`` (or take them, ``df``) and write report.parquet, report.csv and
    report.md into ``out_dir``."""
    problems = job_problems(root)
    for line in problems:
        logger.warning("%s", line)
    df = collect_results(root) if df is None else df
    out_dir = Path(out_dir)
    atomic_write(out_dir / REPORT_PARQUET, lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(out_dir / REPORT_CSV, lambda tmp: df.to_csv(tmp, index=False))
    text = render_markdown(df, problems)
    atomic_write(out_dir / REPORT_MD, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.info("report of %d rows written to %s", len(df), out_dir)
    return df


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (2 when DIR holds no results)."""
    parser = argparse.ArgumentParser(prog="ddim-lab-report", description=__doc__)
    parser.add_argument("dir", type=Path, help="a run directory or a Hydra multirun directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    parser.add_argument(
        "--figures", action="store_true", help="also plot metrics with interval bands (fig_*.png, pareto_*.png)"
    )
    parser.add_argument(
        "--html",
        action="store_true",
        help="also write report.html, a static page; its image grids are PNG files beside it (qual_NN.png)",
    )
    parser.add_argument(
        "--images",
        default="",
        help="image ids for the qualitative grids, comma-separated (default with --html: the first 8 images)",
    )
    parser.add_argument(
        "--compare", default=None, help="config key to pair on the same images (default: inverter)"
    )
    parser.add_argument("--baseline", default=None, help="the --compare value the others are compared with")
    parser.add_argument(
        "--study-out",
        type=Path,
        default=None,
        help="where the tables and figures declared by the sweep's report: section go (default: the report's"
        " folder); their paths inside it are the section's",
    )
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument(
        "--ci-method", choices=("percentile", "bca"), default="percentile", help="interval method"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    out_dir = args.out if args.out is not None else args.dir
    from ddim_lab.config.report_spec import check_columns
    from ddim_lab.report.studies import saved_report, write_study

    try:
        study = saved_report(args.dir)  # a study preset's tables and figures, checked before any work
        df = collect_results(args.dir)
        if study is not None:
            check_columns(df.columns, study)
        df = write_report(args.dir, out_dir, df)
    except NoResultsError as err:
        logger.error("ddim-lab-report: %s", err)
        return 2
    except ValueError as err:  # a report: section that cannot be drawn: one line
        logger.error("ddim-lab-report: %s", err)
        return 2
    from ddim_lab.report.html import write_outputs
    from ddim_lab.report.stats import Bootstrap

    try:
        settings = Bootstrap(args.resamples, args.seed, args.confidence, args.ci_method)
        analysis, written = write_outputs(
            df,
            args.dir,
            out_dir,
            settings,
            compare=args.compare,
            baseline=args.baseline,
            figures=args.figures,
            page=args.html,
            images=[i.strip() for i in args.images.split(",") if i.strip()],
            problems=job_problems(args.dir),
            append_markdown=Path(out_dir) / REPORT_MD,
        )
        if study is not None:
            written += write_study(df, study, args.study_out or out_dir, settings)
    except ValueError as err:  # a bad --baseline or bootstrap setting: one line
        logger.error("ddim-lab-report: %s", err)
        return 2
    for note in analysis.notes:
        logger.warning("%s", note)
    for path in written:
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
