"""The reconstruction study: turn a `+experiment=reconstruction` sweep into its prompt-free fidelity table.

    ddim-lab +experiment=reconstruction hydra.sweep.dir=outputs/sweeps/reconstruction
    python scripts/reconstruction_study.py outputs/sweeps/reconstruction --out docs/reconstruction

Reads only the saved result tables. One row per method, inversion guidance, step count and sampling guidance;
per metric the mean with the source prompt (each image's caption) and with the empty prompt, each with its
bootstrap interval, and the paired difference empty − source on the same images with its interval and the
Wilcoxon signed-rank p-value: the same statistics as `ddim-lab-report` (ddim_lab/stats.py). With
`inversion.guidance_scale=match`, guidance-1 rows repeat the inversion at 1: one copy is kept. Writes
`reconstruction.csv` (numbers) and `reconstruction.md` (the table with intervals).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from ddim_lab.report import collect_results
from ddim_lab.report_tables import interval_cell, markdown
from ddim_lab.stats import Bootstrap, group_intervals, paired_comparisons

log = logging.getLogger("reconstruction_study")

KEYS = ["inverter", "inversion_guidance_scale", "num_steps", "guidance_scale"]
PROMPT = "prompt_source"  # source: each image's caption; empty: the empty prompt
SOURCE, EMPTY = "source", "empty"
METRICS = ("psnr", "ssim", "lpips")


def load(root: Path) -> pd.DataFrame:
    """The reconstruction rows under ``root`` with ``prompt_source``; one copy of each repeated computation."""
    df = collect_results(root)
    edit = df["edit_prompt"].map(lambda t: isinstance(t, str) and t != "")
    df = df[~edit.astype(bool)].copy()
    df[PROMPT] = [EMPTY if p == "" else SOURCE for p in df["prompt"].fillna("")]
    return df.drop_duplicates([*KEYS, PROMPT, "image"]).reset_index(drop=True)


def study(df: pd.DataFrame, settings: Bootstrap, metrics: list[str]) -> pd.DataFrame:
    """Source and empty prompt side by side per key combination: ``<m>_<source|empty>_<mean|low|high>``,
    the paired difference ``<m>_diff_<mean|low|high>``, ``<m>_p`` and ``<m>_pairs``."""
    metrics = [m for m in metrics if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any()]
    intervals = group_intervals(df, [*KEYS, PROMPT], metrics, settings)
    wide = None
    for level in (SOURCE, EMPTY):
        part = intervals[intervals[PROMPT] == level].drop(columns=[PROMPT])
        part = part.rename(
            columns={f"{m}_{s}": f"{m}_{level}_{s}" for m in metrics for s in ("mean", "low", "high")}
        )
        part = part.rename(columns={"n": f"n_{level}"}).drop(columns=[f"{m}_n" for m in metrics])
        wide = part if wide is None else wide.merge(part, on=KEYS, how="outer")
    paired = paired_comparisons(df, PROMPT, [*KEYS, PROMPT], metrics, settings, baseline=SOURCE)
    for m in metrics:
        diff = paired[paired["metric"] == m][
            [*KEYS, "diff_mean", "diff_low", "diff_high", "p_wilcoxon", "pairs"]
        ]
        diff = diff.rename(
            columns={
                "diff_mean": f"{m}_diff_mean",
                "diff_low": f"{m}_diff_low",
                "diff_high": f"{m}_diff_high",
                "p_wilcoxon": f"{m}_p",
                "pairs": f"{m}_pairs",
            }
        )
        wide = wide.merge(diff, on=KEYS, how="left")
    return wide.sort_values(KEYS).reset_index(drop=True)


def display(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The study as text cells: ``mean [low, high]`` for source, empty and their paired difference."""
    out = table[KEYS].astype(str)
    for m in metrics:
        if f"{m}_source_mean" not in table:
            continue
        for level, title in ((SOURCE, "source prompt"), (EMPTY, "empty prompt"), ("diff", "empty − source")):
            cells = table[[f"{m}_{level}_mean", f"{m}_{level}_low", f"{m}_{level}_high"]].itertuples(
                index=False
            )
            out[f"{m}: {title}"] = [interval_cell(*c) for c in cells]
        out[f"{m}: p"] = table[f"{m}_p"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the sweep directory of +experiment=reconstruction")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep directory)")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    settings = Bootstrap(resamples=args.resamples, seed=args.seed, confidence=args.confidence)
    metrics = [m for m in args.metrics.split(",") if m]
    table = study(load(args.root), settings, metrics)
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "reconstruction.csv", index=False)
    text = f"Reconstruction with the source prompt and the empty prompt ({settings.describe()})\n\n"
    (out / "reconstruction.md").write_text(text + markdown(display(table, metrics)) + "\n", encoding="utf-8")
    log.info("wrote %s and %s", out / "reconstruction.csv", out / "reconstruction.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
