"""Speed of the context fold on the digits flow model: inversion + reconstruction per image, folded vs not.

    OMP_NUM_THREADS=1 python scripts/benchmark_token_fold.py         # N = 25, guidance 1, 1 and 16 images
    OMP_NUM_THREADS=1 python scripts/benchmark_token_fold.py --guidance 3.5 --images 1 --repeats 5   # CFG

``FlowDenoiser`` folds the 256 identical zero "T5" tokens of ``digits-flow`` into one token with a log 256
attention bias (``ddim_lab.engine.token_fold``); ``fold_context=False`` runs the full 16 + 256 tokens, as
the model ran before. For each batch size B of ``--images``:

1. encode B held-out digits (``digits.held_out_subset(B, seed)``), each with its caption;
2. per repeat, for each arm in turn (folded, unfolded; alternating, so both share the machine's load):
   ``flow_euler`` inversion with N steps at guidance 1, then sampling back at ``--guidance`` (the engine's
   ``invert`` / ``sample``, all B images in one batch, as the lab's ``batch_size`` does), timed with
   ``time.perf_counter`` around both calls; one untimed warm-up each;
3. seconds per image (a repeat's time / B): each arm's median and range, the speed-up median(unfolded) /
   median(folded), the median of the per-repeat ratios, and the largest difference between the two arms'
   reconstructed latents.

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ddim_lab.data import digits  # noqa: E402
from ddim_lab.engine.ddim import invert, sample  # noqa: E402
from ddim_lab.engine.flow_denoiser import FlowDenoiser  # noqa: E402
from ddim_lab.methods.inversion import make_plan  # noqa: E402
from ddim_lab.models.latent import LatentModel  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402

log = logging.getLogger("benchmark_token_fold")
ARMS = ("folded", "unfolded")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/token-fold"))
    p.add_argument("--steps", type=int, default=25, help="N: inversion and sampling steps")
    p.add_argument("--guidance", type=float, default=1.0, help="sampling guidance (inversion at 1)")
    p.add_argument("--images", nargs="+", type=int, default=[1, 16], help="batch sizes B (images per call)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per arm")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out digit")
    p.add_argument("--cache", type=Path, default=Path(".cache/ddim_lab"))
    return p.parse_args(argv)


def round_trip(
    model: LatentModel, denoiser: FlowDenoiser, x0: torch.Tensor, prompts: list[str], args: argparse.Namespace
) -> torch.Tensor:
    """Step 2, one arm: invert x0 (B, C, h, w) with N flow-Euler steps, sample it back → (B, C, h, w)."""
    plan = make_plan("flow_euler", model.scheduler(), args.steps)
    with torch.no_grad():
        trajectory = invert(denoiser, x0, plan, model.conditioning(prompts, [1.0] * len(prompts)))
        start = plan.valid_starts()[0]
        cond = model.conditioning(prompts, [args.guidance] * len(prompts))
        return sample(denoiser, trajectory[plan.start_index[start]], plan, cond, start_step=start)


def measure(model: LatentModel, args: argparse.Namespace, n_images: int) -> dict[str, Any]:
    """Steps 1–3 at batch size B = ``n_images``: seconds per image of both arms, their outputs' difference."""
    scans, labels = digits.held_out_subset(n_images, args.seed)
    x0 = model.encode(digits.to_rgb(scans, model.resolution))  # (B, C, h, w)
    prompts = [digits.caption(int(k)) for k in labels]
    denoisers = {arm: FlowDenoiser(model.network, model.family, fold_context=arm == "folded") for arm in ARMS}
    outputs = {arm: round_trip(model, d, x0, prompts, args) for arm, d in denoisers.items()}  # warm-up
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}  # per image
    for r in range(args.repeats):
        for arm in ARMS:
            start = time.perf_counter()
            round_trip(model, denoisers[arm], x0, prompts, args)
            seconds[arm].append((time.perf_counter() - start) / n_images)
        log.info(
            "B=%d repeat %d: folded %.3f s, unfolded %.3f s per image",
            n_images,
            r,
            seconds["folded"][-1],
            seconds["unfolded"][-1],
        )
    ratios = [u / f for f, u in zip(seconds["folded"], seconds["unfolded"], strict=True)]
    runs = args.repeats + 1  # with the warm-up
    medians = {arm: statistics.median(v) for arm, v in seconds.items()}
    return {
        "images": n_images,
        "rows_per_image": {arm: d.unet_evals // (runs * n_images) for arm, d in denoisers.items()},
        "seconds_per_image": {arm: [round(s, 4) for s in v] for arm, v in seconds.items()},
        "median_seconds_per_image": {arm: round(m, 4) for arm, m in medians.items()},
        "speedup_of_medians": round(medians["unfolded"] / medians["folded"], 2),
        "median_of_ratios": round(statistics.median(ratios), 2),
        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "max_abs_latent_difference": float((outputs["folded"] - outputs["unfolded"]).abs().max()),
    }


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    rows = [
        f"| {m['images']} | {fmt(m, 'folded')} | {fmt(m, 'unfolded')} | **{m['speedup_of_medians']}×** "
        f"({m['ratio_range'][0]}–{m['ratio_range'][1]}) | {m['max_abs_latent_difference']:.1e} |"
        for m in results["measured"]
    ]
    return "\n".join(
        [
            "# Context fold on digits-flow: inversion + reconstruction per image",
            "",
            f"N = {cfg['steps']} flow-Euler steps, inversion at guidance 1, sampling at {cfg['guidance']}; "
            f"{cfg['repeats']} repeats per arm, alternating; {cfg['threads']} torch thread(s); "
            f"{cfg['machine']}; load average {cfg['load_average_start']} → {cfg['load_average_end']}.",
            "",
            "| images per batch | folded s/image, median (range) | unfolded s/image "
            "| speed-up (per-repeat range) | max abs latent difference |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def fmt(m: dict[str, Any], arm: str) -> str:
    """One arm's median seconds per image and its range."""
    v = m["seconds_per_image"][arm]
    return f"{m['median_seconds_per_image'][arm]:.3f} ({min(v):.3f}–{max(v):.3f})"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = {"name": "digits-flow", "source": "digits-flow", "family": "sd3", "resolution": 16}
    model = load_model(spec, {"device": "cpu"}, args.cache)
    results: dict[str, Any] = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_start": round(os.getloadavg()[0], 2),
        },
    }
    results["measured"] = [measure(model, args, n) for n in args.images]
    results["config"]["load_average_end"] = round(os.getloadavg()[0], 2)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    for m in results["measured"]:
        log.info(
            "B=%d: folded %.3f s, unfolded %.3f s per image (medians): %.2f× faster; max |Δ latent| %.1e",
            m["images"],
            m["median_seconds_per_image"]["folded"],
            m["median_seconds_per_image"]["unfolded"],
            m["speedup_of_medians"],
            m["max_abs_latent_difference"],
        )


if __name__ == "__main__":
    main()
