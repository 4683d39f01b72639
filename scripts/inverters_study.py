"""The inverters study: turn a `+experiment=inverters` sweep into its table and its figure.

    ddim-lab -m +experiment=inverters hydra.sweep.dir=outputs/sweeps/inverters
    python scripts/inverters_study.py outputs/sweeps/inverters --figure docs/figures/inverters_psnr_vs_evals.png

Reads only the saved result tables. Per method, inversion guidance, step count and grid point (reconstruct
at guidance 1, reconstruct at 7.5, edit at 7.5): mean PSNR / SSIM / LPIPS / latent MSE against the input,
the network passes one image costs (its inversion artifact plus that trajectory: forwards and backwards)
and the wall time per image of the whole job. The figure puts reconstruction PSNR against UNet evaluations
per image, one point per method and step count, for each method at its recommended inversion guidance (1 for
ddim, course, null_text, negative_prompt, direct, fixed_point; the sampling guidance for the exact methods
edict, bdia, edit_friendly), with the VAE ceiling as a line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from ddim_lab.report import collect_results, markdown_table

log = logging.getLogger("inverters_study")

EXACT = ("edict", "bdia", "edit_friendly")  # exact when inverting at the sampling guidance
METRICS = ("psnr", "ssim", "lpips", "latent_mse")
POINTS = ("recon g=1", "recon g=7.5", "edit g=7.5")  # the study's grid points


def load(dirs: list[Path]) -> pd.DataFrame:
    """Every result row under ``dirs`` with the study's derived columns."""
    df = pd.concat([collect_results(d) for d in dirs], ignore_index=True)
    df["point"] = [
        f"{'edit' if isinstance(e, str) and e and e != p else 'recon'} g={g:g}"
        for e, p, g in zip(df["edit_prompt"], df["prompt"], df["guidance_scale"], strict=True)
    ]
    # an edit whose target is the image's own prompt (the eights) is a reconstruction: leave it out
    same = df["edit_prompt"].notna() & (df["edit_prompt"] == df["prompt"])
    df = df[~same].copy()
    df["inverted_at"] = [
        "g" if inv == g and g != 1 else f"{inv:g}"
        for inv, g in zip(df["inversion_guidance_scale"], df["guidance_scale"], strict=True)
    ]
    df = df[df["point"].isin(POINTS)]
    # with inversion.guidance_scale=match, guidance-1 rows are the same computation as inverting at 1: keep one
    df = df.drop_duplicates(["inverter", "num_steps", "point", "inverted_at", "image"]).copy()
    df["forwards"] = df["inversion_unet_evals"].astype("float64") + df["unet_evals"].astype("float64")
    df["backwards"] = df["inversion_unet_backwards"].astype("float64").fillna(0)
    job_seconds = df.groupby("run_dir")["seconds"].transform("sum")
    df["seconds_per_image"] = job_seconds / df.groupby("run_dir")["image"].transform("nunique")
    df["recommended"] = [
        (inv == g) if m in EXACT else (inv == 1)
        for m, inv, g in zip(df["inverter"], df["inversion_guidance_scale"], df["guidance_scale"], strict=True)
    ]
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Means per (method, inversion guidance, steps, grid point)."""
    keys = ["inverter", "inverted_at", "num_steps", "point"]
    agg = {m: "mean" for m in (*METRICS, "vae_psnr", "forwards", "backwards", "seconds_per_image")}
    out = df.groupby(keys, sort=True).agg({**agg, "image": "count"}).rename(columns={"image": "n"})
    out["gap_to_vae_db"] = out["vae_psnr"] - out["psnr"]
    return out.reset_index()


def markdown(summary: pd.DataFrame) -> str:
    shown = summary.copy()
    for col, fmt in (
        ("psnr", "{:.2f}"),
        ("ssim", "{:.3f}"),
        ("lpips", "{:.3f}"),
        ("latent_mse", "{:.2e}"),
        ("vae_psnr", "{:.2f}"),
        ("gap_to_vae_db", "{:.2f}"),
        ("forwards", "{:.0f}"),
        ("backwards", "{:.0f}"),
        ("seconds_per_image", "{:.2f}"),
    ):
        shown[col] = [("n/a" if pd.isna(v) else fmt.format(v)) for v in shown[col]]
    return markdown_table(shown)


def figure(df: pd.DataFrame, path: Path) -> None:
    """Reconstruction PSNR against UNet evaluations per image, one panel per sampling guidance."""
    from matplotlib.figure import Figure

    recon = df[df["point"].str.startswith("recon") & df["recommended"]]
    guidances = sorted(recon["guidance_scale"].unique())
    fig = Figure(figsize=(6 * len(guidances), 4.5), layout="constrained")
    for n, g in enumerate(guidances):
        ax = fig.add_subplot(1, len(guidances), n + 1)
        part = recon[recon["guidance_scale"] == g]
        for method, rows in part.groupby("inverter", sort=True):
            curve = rows.groupby("num_steps")[["forwards", "psnr"]].mean().sort_index()
            ax.plot(curve["forwards"], curve["psnr"], marker="o", label=method)
            for steps, point in curve.iterrows():
                ax.annotate(str(steps), (point["forwards"], point["psnr"]), fontsize=7, alpha=0.6)
        ax.axhline(part["vae_psnr"].mean(), color="0.4", ls="--", lw=1, label="VAE ceiling")
        ax.set_xscale("log")
        ax.set(
            xlabel="UNet evaluations per image (inversion + sampling)",
            ylabel="reconstruction PSNR (dB)",
            title=f"reconstruction at guidance {g:g} (labels: steps)",
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+", help="sweep directories of +experiment=inverters")
    parser.add_argument("--figure", type=Path, default=None, help="where to write the PSNR-vs-evals figure")
    parser.add_argument("--table", type=Path, default=None, help="where to write the markdown table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    df = load(args.dirs)
    summary = table(df)
    text = markdown(summary)
    if args.table:
        args.table.write_text(text + "\n")
        log.info("wrote %s", args.table)
    else:
        sys.stdout.write(text + "\n")
    if args.figure:
        figure(df, args.figure)
        log.info("wrote %s", args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
