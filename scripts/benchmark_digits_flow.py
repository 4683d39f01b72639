"""Quality benchmark of the digits flow model: prompt following and reconstruction, judged by a classifier.

    python scripts/benchmark_digits_flow.py                  # the shipped model, defaults below
    python scripts/benchmark_digits_flow.py --model-dir /tmp/f --held-out 10 --samples-per-digit 2   # quick

The same judge and the same engine calls as ``scripts/benchmark_digits.py`` (``ddim_lab.data.judge``; the
model's ``FlowDenoiser`` behind the lab's sampler and ``Runner``):

a. samples: "digit {name}" at several guidance scales and two other phrasings, ``--sample-steps`` Euler
   steps of the model's own schedule, one batched call of the engine's sampler; how often the judge agrees
   with the prompted digit. A few samples also go through diffusers' own ``StableDiffusion3Pipeline.__call__``
   as a cross-check of the engine;
b. reconstruction: ``task=reconstruct`` through the engine (``Runner``, composed as the CLI composes it):
   held-out digits inverted at guidance 1 with their caption and sampled back at guidance 1, per inverter and
   step count; PSNR/SSIM against the input and the VAE ceiling (the engine's encode → decode).

Writes ``results.json``, ``results.md`` and PNG figures into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchmark_digits import (  # noqa: E402  (the sibling script: the same engine calls)
    engine_config,
    generate,
    held_out_items,
    model_overrides,
    noise,
    run_engine,
)
from matplotlib.figure import Figure  # noqa: E402

from ddim_lab.data import digits  # noqa: E402
from ddim_lab.data.judge import Judge, held_out_accuracies, train_judge  # noqa: E402
from ddim_lab.metrics.image import psnr, ssim  # noqa: E402
from ddim_lab.models.latent import LatentModel  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402
from ddim_lab.study.records import VAE_COLUMN, save_grid  # noqa: E402

log = logging.getLogger("benchmark_digits_flow")

MAIN_TEMPLATE = 1  # "digit {name}", as in the UNet model's benchmark
OTHER_TEMPLATES = (0, 3)  # "a handwritten digit {name}", "digit {k}"
TARGET_ACCURACY = 0.80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="diffusers directory (default: shipped model)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/digits-flow"))
    p.add_argument("--samples-per-digit", type=int, default=20, help="at the main guidance")
    p.add_argument("--sweep-per-digit", type=int, default=5, help="at the other guidance scales and phrasings")
    p.add_argument("--guidance", type=float, default=4.0, help="main sampling guidance")
    p.add_argument("--sweep-guidance", nargs="*", type=float, default=[1.0, 2.0, 7.0])
    p.add_argument("--sample-steps", type=int, default=28, help="SD3's default")
    p.add_argument("--pipeline-per-digit", type=int, default=2, help="samples through StableDiffusion3Pipeline")
    p.add_argument("--held-out", type=int, default=50, help="held-out images to reconstruct (stratified)")
    p.add_argument("--recon-steps", nargs="+", type=int, default=[10, 25, 50])
    p.add_argument("--inverters", nargs="+", default=["flow_euler"])
    p.add_argument("--batch-size", type=int, default=256, help="transformer rows per call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample_configs(args: argparse.Namespace) -> list[tuple[int, float, int]]:
    """(template, guidance, samples per digit): the main one first."""
    configs = [(MAIN_TEMPLATE, args.guidance, args.samples_per_digit)]
    configs += [(MAIN_TEMPLATE, g, args.sweep_per_digit) for g in args.sweep_guidance if g != args.guidance]
    return configs + [(t, args.guidance, args.sweep_per_digit) for t in OTHER_TEMPLATES]


def measure_samples(
    model: LatentModel, judge: Judge, args: argparse.Namespace
) -> tuple[dict[str, Any], torch.Tensor]:
    """Judge agreement of prompted samples per (template, guidance); also the main configuration's images."""
    configs = sample_configs(args)
    labels = [np.repeat(np.arange(10), n) for _, _, n in configs]  # digit-major
    prompts = [digits.caption(int(k), t) for (t, _, _), ls in zip(configs, labels, strict=True) for k in ls]
    guidance = [g for (_, g, _), ls in zip(configs, labels, strict=True) for _ in ls]
    # each configuration starts from the same noise (its first rows), so they differ in prompt and guidance
    x = torch.cat([noise(len(ls), args.seed, model.latent_shape) for ls in labels])
    images, _ = generate(model, x, prompts, guidance, args.sample_steps, args.batch_size)
    predicted = judge.predict(images)
    results, offset = [], 0
    for (t, g, _), ls in zip(configs, labels, strict=True):
        agree = predicted[offset : offset + len(ls)] == ls
        offset += len(ls)
        results.append(
            {
                "template": digits.TEMPLATES[t],
                "guidance": g,
                "samples": len(ls),
                "accuracy": float(agree.mean()),
                "per_digit": [float(agree[ls == k].mean()) for k in range(10)],
            }
        )
    return {"steps": args.sample_steps, "configs": results}, images[: len(labels[0])]


def measure_pipeline(model: LatentModel, judge: Judge, args: argparse.Namespace) -> dict[str, Any]:
    """The same model through diffusers' ``StableDiffusion3Pipeline.__call__`` (canonical captions)."""
    labels = np.repeat(np.arange(10), args.pipeline_per_digit)
    prompts = [digits.caption(int(k)) for k in labels]
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompts,
        num_inference_steps=args.sample_steps,
        guidance_scale=args.guidance,
        height=model.resolution,
        width=model.resolution,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    ).images
    return {
        "template": digits.TEMPLATES[0],
        "guidance": args.guidance,
        "steps": args.sample_steps,
        "samples": len(labels),
        "accuracy": judge.accuracy(out.float(), labels),
    }


def measure_reconstruction(model: LatentModel, judge: Judge, args: argparse.Namespace) -> dict[str, Any]:
    """PSNR/SSIM of guidance-1 inversion + reconstruction per inverter and step count, and the VAE ceiling."""
    scans, labels = digits.held_out_subset(args.held_out, args.seed)
    items = held_out_items(scans, labels, model.resolution)
    images = torch.stack([it.image for it in items])
    results: dict[str, Any] = {"images": len(items)}
    for inverter in args.inverters:
        rows = {}
        for steps in args.recon_steps:
            t0 = time.perf_counter()
            cfg = engine_config(args.model, args.batch_size, f"inverter={inverter}", f"num_steps={steps}")
            runner, _, grid = run_engine(model, cfg, items)
            recon = grid[runner.points[0].label]
            rows[str(steps)] = {
                "psnr": float(psnr(recon, images).mean()),
                "psnr_sem": float(psnr(recon, images).std() / np.sqrt(len(labels))),
                "ssim": float(ssim(recon, images).mean()),
                "judge_accuracy": judge.accuracy(recon, labels),
                "evals_per_image": runner.denoiser.unet_evals // len(labels),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            vae = grid[VAE_COLUMN]
            log.info("reconstruction %s %3d steps: PSNR %.2f dB", inverter, steps, rows[str(steps)]["psnr"])
        results[inverter] = rows
    results["vae"] = {"psnr": float(psnr(vae, images).mean()), "ssim": float(ssim(vae, images).mean())}
    results["judge_accuracy"] = {"input": judge.accuracy(images, labels), "vae": judge.accuracy(vae, labels)}
    return results


def save_figures(results: dict[str, Any], grid: torch.Tensor, args: argparse.Namespace) -> dict[str, str]:
    """The main configuration's samples (one column per digit) and PSNR against steps."""
    n = args.samples_per_digit
    rows = min(n, 8)
    columns = [(digits.NAMES[k], grid[k * n : k * n + rows]) for k in range(10)]
    samples = save_grid(args.out / "samples.png", columns, [f"#{r}" for r in range(rows)], min_cell=48)
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    recon = results["reconstruction"]
    for inverter in args.inverters:
        curve = [recon[inverter][str(s)]["psnr"] for s in args.recon_steps]
        ax.plot(args.recon_steps, curve, "o-", label=inverter)
    ax.axhline(recon["vae"]["psnr"], color="grey", ls=":", label="VAE ceiling")
    ax.set(xscale="log", xticks=args.recon_steps, xticklabels=[str(s) for s in args.recon_steps])
    ax.set(xlabel="steps", ylabel="PSNR (dB)", title="digits-flow: held-out reconstruction")
    ax.legend()
    fig.tight_layout()
    curve = args.out / "reconstruction_psnr.png"
    fig.savefig(curve, dpi=120)
    return {"samples": str(samples), "reconstruction_psnr": str(curve)}


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The tables of ``results.md``."""
    lines = ["# digits-flow benchmark", "", f"`{results['config']['command']}`", ""]
    lines += [f"Judge held-out accuracy: {results['judge']}", ""]
    lines += ["## Samples", "", "| prompt | guidance | samples | judge agrees |", "|---|---|---|---|"]
    for r in results["samples"]["configs"]:
        row = f'| "{r["template"]}" | {r["guidance"]:g} | {r["samples"]} | {100 * r["accuracy"]:.1f}% |'
        lines.append(row)
    p = results["pipeline"]
    lines.append(f'| "{p["template"]}" (diffusers pipeline) | {p["guidance"]:g} | {p["samples"]} |')
    lines[-1] += f" {100 * p['accuracy']:.1f}% |"
    recon = results["reconstruction"]
    lines += ["", f"## Reconstruction ({recon['images']} held-out digits, guidance 1)", ""]
    lines += ["| inverter | steps | evals/image | PSNR (± s.e.) | SSIM | judge |", "|---|---|---|---|---|---|"]
    for inverter in args.inverters:
        for s in args.recon_steps:
            r = recon[inverter][str(s)]
            lines.append(
                f"| {inverter} | {s} | {r['evals_per_image']} | {r['psnr']:.2f} ± {r['psnr_sem']:.2f} dB"
                f" | {r['ssim']:.3f} | {100 * r['judge_accuracy']:.0f}% |"
            )
    lines.append(f"| VAE ceiling | – | – | {recon['vae']['psnr']:.2f} dB | {recon['vae']['ssim']:.3f} | – |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.model = model_overrides("digits-flow", args.model_dir)  # the engine's model=… overrides
    cfg = engine_config(args.model, args.batch_size)
    model = load_model(cfg.model, cfg.runtime, cfg.cache.dir)
    judge = train_judge(args.seed)
    command = ["python scripts/benchmark_digits_flow.py", *(sys.argv[1:] if argv is None else argv)]
    results: dict[str, Any] = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "command": " ".join(command),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "load_average_start": round(os.getloadavg()[0], 2),
        },
        "judge": held_out_accuracies(judge, model.resolution),
        "seconds": {},
    }
    start = time.perf_counter()
    results["samples"], grid = measure_samples(model, judge, args)
    results["seconds"]["samples"] = round(time.perf_counter() - start, 1)
    for r in results["samples"]["configs"]:
        log.info("samples %r g=%g: judge agrees %.1f%%", r["template"], r["guidance"], 100 * r["accuracy"])
    start = time.perf_counter()
    results["pipeline"] = measure_pipeline(model, judge, args)
    results["seconds"]["pipeline"] = round(time.perf_counter() - start, 1)
    log.info("diffusers pipeline samples: judge agrees %.1f%%", 100 * results["pipeline"]["accuracy"])
    start = time.perf_counter()
    results["reconstruction"] = measure_reconstruction(model, judge, args)
    results["seconds"]["reconstruction"] = round(time.perf_counter() - start, 1)
    main_acc = results["samples"]["configs"][0]["accuracy"]
    results["target"] = {"sample_accuracy": TARGET_ACCURACY, "measured": main_acc}
    results["target"]["pass"] = main_acc >= TARGET_ACCURACY
    results["figures"] = save_figures(results, grid, args)
    results["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    results["config"]["load_average_end"] = round(os.getloadavg()[0], 2)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results, args))
    log.info("main samples: judge agrees %.1f%% (target %.0f%%)", 100 * main_acc, 100 * TARGET_ACCURACY)
    log.info("wrote %s in %.0f s", args.out, results["seconds"]["total"])


if __name__ == "__main__":
    main()
