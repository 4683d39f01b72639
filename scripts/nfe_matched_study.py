"""The NFE-matched study: both inverter families in one table and one figure, matched by model evaluations.

    ddim-lab -m +experiment=nfe_matched hydra.sweep.dir=outputs/sweeps/nfe_matched
    python scripts/nfe_matched_study.py outputs/sweeps/nfe_matched \
        --figure docs/figures/nfe_matched.png --table docs/nfe_matched_table.md

Reads only the saved result tables. Every job is one arm (a model and an inverter: the DDIM family on the
digits UNet, the flow family and plain DDIM on the digits flow model) at one step count, reconstructing the
held-out digits with their captions or with the empty prompt. A row's cost is the model evaluations one
image spent (inversion plus sampling, forwards), so arms whose methods spend one, two or more evaluations
per step sit on one axis. The table gives each arm's mean PSNR and LPIPS with 95% bootstrap intervals per
step count, and, per evaluation budget, the best each arm reaches within it; the figure draws PSNR and LPIPS
against evaluations, one line per arm with its interval band, one column per prompt.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report import collect_results, markdown_table
from ddim_lab.stats import group_intervals

log = logging.getLogger("nfe_matched_study")

METRICS = ("psnr", "lpips")
BUDGETS = (10, 20, 50, 100)  # model evaluations per image
KEYS = ["prompt_kind", "model", "inverter", "num_steps"]


def load(dirs: list[Path]) -> pd.DataFrame:
    """Reconstruction rows under ``dirs`` with ``prompt_kind`` (caption / empty) and ``evals`` per image."""
    df = pd.concat([collect_results(d) for d in dirs], ignore_index=True)
    recon = df["edit_prompt"].isna() | (df["edit_prompt"] == "") | (df["edit_prompt"] == df["prompt"])
    df = df[recon & (df["start_step"] == 0)].copy()
    df["prompt_kind"] = np.where(df["prompt"].fillna("") == "", "empty prompt", "caption")
    df["evals"] = df["inversion_unet_evals"].astype("float64") + df["unet_evals"].astype("float64")
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Per arm, prompt kind and step count: evaluations per image, PSNR and LPIPS with intervals."""
    out = group_intervals(df, KEYS, [*METRICS, "evals"])
    return out.sort_values(KEYS).reset_index(drop=True)


def matched(summary: pd.DataFrame, budgets: tuple[int, ...] = BUDGETS) -> pd.DataFrame:
    """Per arm and budget: the best mean PSNR among its step counts that spend at most the budget."""
    records = []
    for (kind, model, inverter), arm in summary.groupby(KEYS[:3], sort=True):
        record = {"prompt_kind": kind, "model": model, "inverter": inverter}
        for budget in budgets:
            within = arm[arm["evals_mean"] <= budget]
            best = within.loc[within["psnr_mean"].idxmax()] if len(within) else None
            record[f"PSNR ≤{budget}"] = (
                "–"
                if best is None
                else f"{best['psnr_mean']:.2f} ({best['evals_mean']:.0f} @ {best['num_steps']})"
            )
        records.append(record)
    return pd.DataFrame.from_records(records)


def markdown(summary: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            **{k: summary[k] for k in KEYS},
            "evals / image": summary["evals_mean"].map("{:.0f}".format),
            "PSNR (dB) [95% CI]": [
                f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
                for m, lo, hi in zip(
                    summary["psnr_mean"], summary["psnr_low"], summary["psnr_high"], strict=True
                )
            ],
            "LPIPS [95% CI]": [
                "n/a" if pd.isna(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
                for m, lo, hi in zip(
                    summary["lpips_mean"], summary["lpips_low"], summary["lpips_high"], strict=True
                )
            ],
            "n": summary["n"],
        }
    )
    return markdown_table(shown)


def figure(summary: pd.DataFrame, path: Path, vae_psnr: float | None = None) -> None:
    """PSNR (top) and LPIPS (bottom, when measured: without its backbone LPIPS is NaN) against evaluations per
    image; a column per prompt kind; solid lines for UNet-model arms, dashed for flow-model arms (a model whose
    name says flow)."""
    import matplotlib
    from matplotlib.figure import Figure

    kinds = sorted(summary["prompt_kind"].unique())
    shown = [(m, u) for m, u in (("psnr", "dB"), ("lpips", "distance")) if summary[f"{m}_mean"].notna().any()]
    fig = Figure(figsize=(6.5 * len(kinds), 4.5 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), len(kinds), squeeze=False)
    arms = sorted({(m, i) for m, i in zip(summary["model"], summary["inverter"], strict=True)})
    palette = matplotlib.colormaps["tab20"]  # 14 arms: distinct colours
    colors = {arm: palette(n % 20) for n, arm in enumerate(arms)}
    for col, kind in enumerate(kinds):
        part = summary[summary["prompt_kind"] == kind]
        for row, (metric, unit) in enumerate(shown):
            ax = axes[row, col]
            for (model, inverter), arm in part.groupby(["model", "inverter"], sort=True):
                arm = arm[arm["evals_mean"] > 0].sort_values("evals_mean")  # a cached inversion cost nothing
                style = "--" if "flow" in str(model) else "-"
                color = colors[model, inverter]
                ax.plot(
                    arm["evals_mean"],
                    arm[f"{metric}_mean"],
                    style,
                    marker="o",
                    ms=3,
                    color=color,
                    label=f"{model} / {inverter}",
                )
                ax.fill_between(
                    arm["evals_mean"],
                    arm[f"{metric}_low"],
                    arm[f"{metric}_high"],
                    color=color,
                    alpha=0.15,
                    lw=0,
                )
            if metric == "psnr" and vae_psnr is not None:
                ax.axhline(vae_psnr, color="0.4", ls=":", lw=1, label="VAE ceiling")
            ax.set_xscale("log")
            ax.set(
                xlabel="model evaluations per image (inversion + sampling)",
                ylabel=f"reconstruction {metric.upper()} ({unit})",
                title=f"{kind}: {metric.upper()}",
            )
            ax.grid(True, alpha=0.3)
    axes[0, -1].legend(fontsize="x-small", loc="lower right")
    fig.suptitle("Reconstruction against model evaluations (bands: 95% bootstrap intervals over images)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+", help="sweep directories of +experiment=nfe_matched")
    parser.add_argument("--figure", type=Path, default=None, help="where to write the figure (PNG)")
    parser.add_argument("--table", type=Path, default=None, help="where to write the markdown tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    df = load(args.dirs)
    summary = table(df)
    text = "\n\n".join(
        [
            markdown(summary),
            "Best PSNR within each evaluation budget (evals @ steps):",
            markdown_table(matched(summary)),
        ]
    )
    if args.table:
        args.table.write_text(text + "\n")
        log.info("wrote %s", args.table)
    else:
        sys.stdout.write(text + "\n")
    if args.figure:
        vae = df.loc[df["model"] == df["model"].iloc[0], "vae_psnr"].mean() if "vae_psnr" in df else None
        figure(summary, args.figure, None if pd.isna(vae) else float(vae))
        log.info("wrote %s", args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
