"""The NFE-matched study: both inverter families at equal budgets of model evaluations.

    ddim-lab -m +experiment=nfe_matched hydra.sweep.dir=outputs/sweeps/nfe_matched
    python scripts/nfe_matched_study.py outputs/sweeps/nfe_matched \
        --figure docs/figures/nfe_matched.png --table docs/nfe_matched_table.md

Reads only the saved result tables. Every job is one arm (a model and an inverter: the DDIM family on the
digits UNet, the flow family and plain DDIM on the digits flow model) at one budget ``budget.nfe`` of model
evaluations per image, reconstructing the held-out digits with their captions or with the empty prompt. The
budget chose each method's step count N (the largest whose inversion plus sampling cost fits, by the method's
own formula; ``ddim_lab/budget.py``) and each row says what it spent (``nfe``), so arms of one budget spend
the same up to one step's cost. The tables give, per prompt kind and budget, each arm's N, evaluations, and
mean PSNR and LPIPS with 95% bootstrap intervals over images; each arm's PSNR across the budgets; and, within
each model and budget, every arm's paired difference from the model's first-order baseline (``flow_euler`` on
the flow model, ``ddim`` on the UNet) on the same images. The figure draws PSNR and LPIPS against the
evaluations spent, one line per arm with its interval band, one column per prompt kind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report import collect_results, markdown_table
from ddim_lab.stats import group_intervals, paired_comparisons

log = logging.getLogger("nfe_matched_study")

METRICS = ("psnr", "lpips")
KEYS = ["prompt_kind", "budget_nfe", "model", "inverter", "num_steps"]  # num_steps: one per arm and budget
BASELINES = {"digits-flow": "flow_euler", "digits": "ddim"}  # model → the first-order arm others pair with


def load(dirs: list[Path]) -> pd.DataFrame:
    """Budget-matched reconstruction rows under ``dirs``, with ``prompt_kind`` (caption / empty prompt).

    Raises ValueError when no row carries a budget (a sweep of the old step-count preset)."""
    df = pd.concat([collect_results(d) for d in dirs], ignore_index=True)
    if "budget_nfe" not in df.columns or df["budget_nfe"].isna().all():
        raise ValueError(
            "no row carries budget_nfe: run the budget preset (ddim-lab -m +experiment=nfe_matched)"
        )
    recon = df["edit_prompt"].isna() | (df["edit_prompt"] == "") | (df["edit_prompt"] == df["prompt"])
    df = df[recon & (df["start_step"] == 0) & df["budget_nfe"].notna()].copy()
    df["prompt_kind"] = np.where(df["prompt"].fillna("") == "", "empty prompt", "caption")
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Per prompt kind, budget and arm: its N, evaluations per image, PSNR and LPIPS with intervals."""
    out = group_intervals(df, KEYS, [*METRICS, "nfe"])
    return out.sort_values(KEYS).reset_index(drop=True)


def _interval(mean: float, low: float, high: float, digits: int) -> str:
    return "n/a" if pd.isna(mean) else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def across_budgets(summary: pd.DataFrame) -> pd.DataFrame:
    """Per prompt kind and arm, one column per budget: mean PSNR (evaluations spent @ N)."""
    records = []
    for (kind, model, inverter), arm in summary.groupby(["prompt_kind", "model", "inverter"], sort=True):
        record = {"prompt_kind": kind, "model": model, "inverter": inverter}
        for _, one in arm.sort_values("budget_nfe").iterrows():
            cell = f"{one['psnr_mean']:.2f} ({one['nfe_mean']:.0f} @ {int(one['num_steps'])})"
            record[f"PSNR ≤{int(one['budget_nfe'])}"] = cell
        records.append(record)
    return pd.DataFrame.from_records(records).fillna("–")


def paired(df: pd.DataFrame, baselines: dict[str, str] = BASELINES) -> pd.DataFrame:
    """Within each model, prompt kind and budget: each arm minus the model's baseline arm on the same images
    (mean difference, 95% bootstrap interval, Wilcoxon p), for the metrics measured."""
    metrics = [m for m in METRICS if pd.to_numeric(df[m], errors="coerce").notna().any()]
    parts = []
    for model, baseline in baselines.items():
        rows = df[df["model"] == model]
        if rows.empty or baseline not in set(rows["inverter"]):
            continue
        keys = ["prompt_kind", "budget_nfe", "inverter", "num_steps"]  # num_steps: derived from the budget
        out = paired_comparisons(rows, "inverter", keys, metrics, baseline=baseline)
        parts.append(out.assign(model=model))
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True).sort_values(
        ["metric", "prompt_kind", "budget_nfe", "model", "other"]
    )


def markdown(summary: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            **{k: summary[k] for k in KEYS},
            "evals / image": summary["nfe_mean"].map("{:.0f}".format),
            "PSNR (dB) [95% CI]": [
                _interval(m, lo, hi, 2)
                for m, lo, hi in zip(
                    summary["psnr_mean"], summary["psnr_low"], summary["psnr_high"], strict=True
                )
            ],
            "LPIPS [95% CI]": [
                _interval(m, lo, hi, 3)
                for m, lo, hi in zip(
                    summary["lpips_mean"], summary["lpips_low"], summary["lpips_high"], strict=True
                )
            ],
            "n": summary["n"],
        }
    )
    return markdown_table(shown)


def markdown_paired(pairs: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "metric": pairs["metric"],
            "prompt_kind": pairs["prompt_kind"],
            "budget_nfe": pairs["budget_nfe"],
            "model": pairs["model"],
            "arm − baseline": [f"{o} − {b}" for o, b in zip(pairs["other"], pairs["baseline"], strict=True)],
            "difference [95% CI]": [
                _interval(m, lo, hi, 3)
                for m, lo, hi in zip(pairs["diff_mean"], pairs["diff_low"], pairs["diff_high"], strict=True)
            ],
            "p (Wilcoxon)": pairs["p_wilcoxon"].map("{:.2g}".format),
            "pairs": pairs["pairs"],
        }
    )
    return markdown_table(shown)


def figure(summary: pd.DataFrame, path: Path, vae_psnr: float | None = None) -> None:
    """PSNR (top) and LPIPS (bottom, when measured: without its backbone LPIPS is NaN) against the evaluations
    each arm spent per image at each budget; a column per prompt kind; solid lines for UNet-model arms, dashed
    for flow-model arms (a model whose name says flow)."""
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
                arm = arm.sort_values("nfe_mean")
                style = "--" if "flow" in str(model) else "-"
                color = colors[model, inverter]
                ax.plot(
                    arm["nfe_mean"],
                    arm[f"{metric}_mean"],
                    style,
                    marker="o",
                    ms=3,
                    color=color,
                    label=f"{model} / {inverter}",
                )
                ax.fill_between(
                    arm["nfe_mean"], arm[f"{metric}_low"], arm[f"{metric}_high"], color=color, alpha=0.15, lw=0
                )
            for budget in sorted(part["budget_nfe"].unique()):
                ax.axvline(budget, color="0.85", lw=0.8, zorder=0)
            if metric == "psnr" and vae_psnr is not None:
                ax.axhline(vae_psnr, color="0.4", ls=":", lw=1, label="VAE ceiling")
            ax.set_xscale("log")
            ax.set(
                xlabel="model evaluations per image (inversion + sampling; grey: the budgets)",
                ylabel=f"reconstruction {metric.upper()} ({unit})",
                title=f"{kind}: {metric.upper()}",
            )
            ax.grid(True, alpha=0.3)
    axes[0, -1].legend(fontsize="x-small", loc="lower right")
    fig.suptitle("Reconstruction at equal budgets of model evaluations (bands: 95% bootstrap intervals)")
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
    pairs = paired(df)
    text = "\n\n".join(
        [
            markdown(summary),
            "PSNR at each budget (evaluations spent @ num_steps):",
            markdown_table(across_budgets(summary)),
            "Paired differences from each model's first-order arm, same images:",
            markdown_paired(pairs) if len(pairs) else "(none)",
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
