"""Editors on the digits mini-benchmark: does prompt-to-prompt Pareto-dominate prompt swap?

    python scripts/benchmark_editors.py                       # defaults below (about 15 min on 2 CPU cores)
    python scripts/benchmark_editors.py --images 6 --starts 15 --guidance 4 --p2p 0.4:0.6   # a quick look

Every image of ``data=digits-pie`` (held-out digits edited into "eight", "eight" into "three") is inverted
once with DDIM (the inversion cache is shared by every setting), then edited with each editor setting over a
grid of start step × guidance, through the lab's engine (``Runner.run_group``), 50 steps:

- ``prompt_swap``: sample with the target prompt;
- ``p2p`` for each ``cross:self`` pair of ``--p2p`` (cross_replace_steps : self_replace_steps), the other knobs
  at their defaults (refine, target word × 2, local blend at 0.3).

Per setting: the edit success rate (the digit classifier reads the target digit) and the mean SSIM to the
input. A setting A dominates B when A's success ≥ B's and A's SSIM > B's. Verdict: PASS when every prompt
swap setting with nonzero success is dominated by some p2p setting.

Writes ``table.csv``, ``table.md``, ``summary.md`` and ``pareto.png`` under ``--out`` (and the figure to
``--figure``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ddim_lab.config.compose import compose_config  # noqa: E402
from ddim_lab.config.validate import validate  # noqa: E402
from ddim_lab.models.latent import LatentModel  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402
from ddim_lab.study.runner import Runner, load_items  # noqa: E402

log = logging.getLogger("benchmark_editors")

KEYS = ["editor", "cross_replace_steps", "self_replace_steps", "guidance_scale", "start_step"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20, help="first N images of digits-pie (20 = all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", default="4,7.5", help="comma-separated guidance scales")
    p.add_argument("--starts", default="5,10,15,20", help="comma-separated start steps")
    p.add_argument("--p2p", default="0.4:0.6,0.2:0.3,0.8:0.2", help="cross:self pairs of editor=p2p")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/editors"))
    p.add_argument("--figure", type=Path, default=Path("docs/figures/editors_pareto.png"))
    p.add_argument("--cache", type=Path, default=Path(".cache/ddim_lab"))
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> list[list[str]]:
    """The overrides of each editor setting."""
    out = [["editor=prompt_swap"]]
    for pair in args.p2p.split(","):
        cross, self_ = pair.split(":")
        out.append(["editor=p2p", f"editor.cross_replace_steps={cross}", f"editor.self_replace_steps={self_}"])
    return out


def run_setting(model: LatentModel, args: argparse.Namespace, overrides: list[str]) -> pd.DataFrame:
    """Rows of one editor setting over every image and grid point."""
    cfg = compose_config(
        [
            "data=digits-pie",
            "task=edit",
            f"num_steps={args.steps}",
            f"guidance_scale=[{args.guidance}]",
            f"start_step=[{args.starts}]",
            "batch_size=64",
            "metrics.lpips=off",
            "runtime.device=cpu",
            "runtime.progress=false",
            f"cache.dir='{args.cache}'",
            *overrides,
        ]
    )
    validate(cfg)
    runner = Runner(cfg, model)
    items = load_items(cfg, model.resolution)[: args.images]
    runner.set_protocol(items)
    rows, _ = runner.run_group(items)
    assert runner.denoiser.unet_evals == runner.minimum.forwards, "accounting: evaluations ≠ minimum"
    df = pd.DataFrame(rows)
    knobs = runner.editor.knobs()
    df["cross_replace_steps"] = knobs.get("cross_replace_steps", float("nan"))
    df["self_replace_steps"] = knobs.get("self_replace_steps", float("nan"))
    return df


def dominated(point: pd.Series, others: pd.DataFrame) -> bool:
    """Some row of ``others`` has success ≥ point's and SSIM > point's."""
    return bool(((others["success"] >= point["success"]) & (others["ssim"] > point["ssim"])).any())


def label(row: pd.Series) -> str:
    if row["editor"] == "prompt_swap":
        return "prompt_swap"
    return f"p2p cross {row['cross_replace_steps']:g} self {row['self_replace_steps']:g}"


def figure(table: pd.DataFrame, paths: list[Path]) -> None:
    """Edit success against SSIM to the input, one series per editor setting, points labelled by (g, k)."""
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.subplots()
    for name, part in table.groupby("setting", sort=False):
        marker = "s" if name == "prompt_swap" else "o"
        ax.scatter(part["ssim"], 100 * part["success"], label=name, marker=marker, s=28)
        for _, r in part.iterrows():
            where = (r["ssim"], 100 * r["success"])
            ax.annotate(f"{r['guidance_scale']:g}/{r['start_step']}", where, fontsize=6)
    ax.set_xlabel("SSIM to the input ([0, 1], higher = more faithful)")
    ax.set_ylabel("edit success (%, digit classifier)")
    ax.set_title("Editors on digits-pie: fidelity vs edit success (labels: guidance/start step)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)


def markdown(df: pd.DataFrame) -> str:
    """A pipe table (floats to 3 decimals)."""
    rows = df.itertuples(index=False)
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def summarize(table: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    swap = table[table["editor"] == "prompt_swap"]
    p2p = table[table["editor"] == "p2p"]
    judged = swap[swap["success"] > 0]
    beaten = [dominated(r, p2p) for _, r in judged.iterrows()]
    verdict = "PASS" if beaten and all(beaten) else "MISS"
    lines = [
        f"# Editors on digits-pie ({args.images} images, {args.steps} steps, DDIM inversion, CPU)",
        "",
        f"Verdict: **{verdict}** — {sum(beaten)} of {len(beaten)} prompt-swap settings with nonzero success are"
        " dominated by a p2p setting (success ≥ and SSIM >).",
        "",
        "Best SSIM at a success level (each editor's settings with success ≥ the level):",
        "",
        "| success ≥ | prompt_swap SSIM | p2p SSIM | p2p setting |",
        "|---|---|---|---|",
    ]
    for level in (0.3, 0.5, 0.7, 0.9):
        a = swap[swap["success"] >= level]
        b = p2p[p2p["success"] >= level]
        best = b.loc[b["ssim"].idxmax()] if len(b) else None
        where = "" if best is None else f"{label(best)}, g {best.guidance_scale:g}, k {best.start_step}"
        lines.append(
            f"| {level:.0%} | {a['ssim'].max() if len(a) else float('nan'):.3f} |"
            f" {best['ssim'] if best is not None else float('nan'):.3f} | {where} |"
        )
    lines += ["", f"Wall time: {seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    started = time.perf_counter()
    model = load_model(compose_config([]).model, {"device": "cpu"}, args.cache)
    frames = []
    for overrides in settings(args):
        t = time.perf_counter()
        frames.append(run_setting(model, args, overrides))
        log.info("%s: %.0f s", " ".join(overrides), time.perf_counter() - t)
    rows = pd.concat(frames, ignore_index=True)
    table = (
        rows.groupby(KEYS, dropna=False, sort=False)
        .agg(success=("edit_success", "mean"), ssim=("ssim", "mean"), psnr=("psnr", "mean"))
        .reset_index()
    )
    table["setting"] = [label(r) for _, r in table.iterrows()]
    table["dominated_by_p2p"] = [
        dominated(r, table[table["editor"] == "p2p"]) if r["editor"] == "prompt_swap" else None
        for _, r in table.iterrows()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out / "rows.csv", index=False)
    table.to_csv(args.out / "table.csv", index=False)
    (args.out / "table.md").write_text(markdown(table.drop(columns=["setting"])))
    figure(table, [args.out / "pareto.png", args.figure])
    summary = summarize(table, args, time.perf_counter() - started)
    (args.out / "summary.md").write_text(summary)
    log.info("\n%s\n%s", table.drop(columns=["setting"]).to_string(index=False), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
