"""Quality benchmark of the digits model: prompt following, reconstruction and editing, judged by a classifier.

    python scripts/benchmark_digits.py                        # the shipped model, defaults below
    python scripts/benchmark_digits.py --model-dir /tmp/m --held-out 20 --samples-per-digit 4   # quick look

A logistic-regression classifier fitted on the model's own training split (``ddim_lab.data.judge``) names the
digit in each image. Three measurements, all through the lab's engine:

a. samples: prompt "digit {name}" (and two other phrasings), 50 steps, several guidance scales, one batched
   call of the engine's sampler (``ddim_lab.engine.ddim.sample``, as ``task=sample`` runs it) with per-row
   prompts and guidance; how often the classifier agrees with the prompted digit;
b. reconstruction: ``task=reconstruct`` (``Runner``, its config composed as the CLI composes it) of held-out
   digits, inverted at guidance 1 with their caption and sampled back at guidance 1 from step 0, for
   10/25/50/100 steps and ``inverter=ddim`` / ``course``; PSNR/SSIM against the input and against the VAE
   ceiling (the engine's encode → decode);
c. edits i → j: ``task=edit`` of digit i's held-out scans with digit j's caption from each start step (the
   inversion cache shares each image's inversion between the main grid and the guidance sweep); the
   classifier's verdict and SSIM to the input, against unedited sampling of j from random noise.

Writes ``results.json``, ``results.md`` and PNG figures into ``--out`` and logs a PASS/MISS table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ddim_lab.config.compose import compose_config  # noqa: E402
from ddim_lab.config.validate import validate  # noqa: E402
from ddim_lab.data import digits  # noqa: E402
from ddim_lab.data.digits import held_out_subset  # noqa: E402
from ddim_lab.data.folders import Item, content_hash, pixels_to_tensor  # noqa: E402
from ddim_lab.data.judge import Judge, held_out_accuracies, train_judge  # noqa: E402
from ddim_lab.engine.ddim import sample  # noqa: E402
from ddim_lab.methods.inversion import make_plan  # noqa: E402
from ddim_lab.metrics.image import psnr, ssim  # noqa: E402
from ddim_lab.models.latent import LatentModel  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402
from ddim_lab.models.sources import SHIPPED, shipped_model_dir  # noqa: E402
from ddim_lab.study.records import VAE_COLUMN, save_grid  # noqa: E402
from ddim_lab.study.runner import Runner  # noqa: E402

log = logging.getLogger("benchmark_digits")

SAMPLE_STEPS = 50
EDIT_STEPS = 50
RECON_STEPS = (10, 25, 50, 100)
EXTRA_GUIDANCE = (1.0, 3.0, 5.0)
MAIN_TEMPLATE = 1  # "digit {name}"
OTHER_TEMPLATES = (0, 3)  # "a handwritten digit {name}", "digit {k}"
MIDDLE_STARTS = (20, 30)  # inclusive range of "middle" start steps of 50
TARGETS = {"sample_accuracy": 0.80, "edit_success": 0.60, "recon_gap_db": 3.0}
DEFAULT_PAIRS = ("3:8", "1:7", "0:6", "5:9", "4:1")


# -- setup ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=shipped_model_dir(), help="diffusers directory")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/digits"))
    p.add_argument("--held-out", type=int, default=100, help="held-out images per measurement (stratified)")
    p.add_argument("--samples-per-digit", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0, help="guidance of samples and edits")
    p.add_argument("--edit-pairs", nargs="+", default=list(DEFAULT_PAIRS), help="source:target digit pairs")
    p.add_argument("--starts", nargs="+", type=int, default=list(range(0, EDIT_STEPS, 5)))
    p.add_argument(
        "--edit-guidance-sweep",
        nargs="*",
        type=float,
        default=[7.5, 10.0],
        help="further edit guidance scales, measured at the middle start steps only",
    )
    p.add_argument("--batch-size", type=int, default=256, help="UNet rows per call")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.edit_pairs = [tuple(int(d) for d in pair.split(":")) for pair in args.edit_pairs]
    if any(not 0 <= k < EDIT_STEPS for k in args.starts):
        raise SystemExit(f"--starts must lie in [0, {EDIT_STEPS})")
    return args


def model_overrides(name: str, model_dir: Path | None) -> list[str]:
    """The ``model=`` overrides of a shipped digits model (``name``: digits, digits-flow), or of another
    diffusers directory of one (``model=local``, 16 px)."""
    if model_dir is None or model_dir.resolve() == shipped_model_dir(SHIPPED[name]).resolve():
        return [f"model={name}"]
    return ["model=local", f"model.path='{model_dir}'", "model.resolution=16"]


def engine_config(model: list[str], batch_size: int, *overrides: str, cache: str | None = None) -> DictConfig:
    """The engine's config as the CLI composes it: CPU, no LPIPS, no progress bars; the inversion cache only
    in ``cache`` (None: off). Validated before anything runs."""
    cfg = compose_config(
        [
            *model,
            "runtime.device=cpu",
            "runtime.progress=false",
            "metrics.lpips=off",
            f"batch_size={batch_size}",
            f"cache.enabled={cache is not None}",
            *([f"cache.dir='{cache}'"] if cache else []),
            *overrides,
        ]
    )
    validate(cfg)
    return cfg


def held_out_items(
    scans: np.ndarray, labels: np.ndarray, resolution: int, eight_bit: bool = False
) -> list[Item]:
    """Held-out scans as the engine's images at ``resolution``, captioned with their digit: the bilinear
    upsampling itself (the numbers of the model card), or ``eight_bit`` as an image file holds it (what a data
    folder of the same digits gives; ``benchmark_controlnet.py``'s numbers). The hash names the 8-bit pixels."""
    rgb = digits.to_rgb(scans, resolution)  # (N, 3, R, R) in [0, 1]
    pixels = (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (N, R, R, 3)
    images = [pixels_to_tensor(px) for px in pixels] if eight_bit else list(rgb)
    return [
        Item(
            f"heldout_{i:03d}.png",
            Path(f"heldout_{i:03d}.png"),
            image,
            digits.caption(int(k)),
            content_hash(px),
        )
        for i, (image, px, k) in enumerate(zip(images, pixels, labels, strict=True))
    ]


def run_engine(model: LatentModel, cfg: DictConfig, items: list[Item]) -> tuple[Runner, list[dict], dict]:
    """One image group through the engine: its rows, its images by grid column, and the runner (its points
    and evaluation count); the count must be the minimum the inverter's formulas give."""
    runner = Runner(cfg, model)
    rows, columns = runner.run_group(items)
    if runner.denoiser.unet_evals != runner.minimum.forwards:
        raise RuntimeError(f"accounting: {runner.denoiser.unet_evals} evaluations ≠ {runner.minimum.forwards}")
    return runner, rows, columns


def noise(n: int, seed: int, shape: tuple[int, ...] = (4, 8, 8)) -> torch.Tensor:
    """(n, *shape) standard normal latents from a seeded generator."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def generate(
    model: LatentModel, x: torch.Tensor, prompts: list[str], guidance: list[float], steps: int, batch_size: int
) -> tuple[torch.Tensor, int]:
    """Decoded samples (B, 3, R, R) of noise ``x`` (B, C, h, w) with per-row prompts and guidance, from step 0
    of the model's own ``steps``-step schedule (DDIM or flow), as ``task=sample`` runs the engine's sampler;
    and the network rows they cost."""
    plan = make_plan("ddim", model.scheduler(), steps)
    denoiser = model.denoiser()
    out = sample(denoiser, x, plan, model.conditioning(prompts, guidance), batch_size=batch_size)
    return model.decode(out), denoiser.unet_evals


# -- a. samples -------------------------------------------------------------------------------------


def measure_samples(
    model: LatentModel, judge: Judge, args: argparse.Namespace
) -> tuple[dict[str, Any], torch.Tensor]:
    """Classifier agreement of prompted samples per (prompt template, guidance); also the grid images."""
    n = args.samples_per_digit
    configs = [(MAIN_TEMPLATE, g) for g in sorted({*EXTRA_GUIDANCE, args.guidance})]
    configs += [(t, args.guidance) for t in OTHER_TEMPLATES]
    labels = np.repeat(np.arange(10), n)  # (10 n,) digit-major
    prompts = [digits.caption(int(k), t) for t, _ in configs for k in labels]
    guidance = [g for _, g in configs for _ in labels]
    # the same starting noise for every configuration, so they differ only in prompt and guidance
    x = noise(len(labels), args.seed, model.latent_shape).repeat(len(configs), 1, 1, 1)
    images, unet_rows = generate(model, x, prompts, guidance, SAMPLE_STEPS, args.batch_size)
    predicted = judge.predict(images).reshape(len(configs), len(labels))
    results = []
    for c, (t, g) in enumerate(configs):
        agree = predicted[c] == labels
        results.append(
            {
                "template": digits.TEMPLATES[t],
                "guidance": g,
                "accuracy": float(agree.mean()),
                "per_digit": [float(agree[labels == k].mean()) for k in range(10)],
            }
        )
    main = configs.index((MAIN_TEMPLATE, args.guidance))
    grid = images[main * len(labels) : (main + 1) * len(labels)]
    return {"steps": SAMPLE_STEPS, "samples_per_digit": n, "configs": results, "unet_rows": unet_rows}, grid


# -- b. reconstruction ------------------------------------------------------------------------------


def measure_reconstruction(
    model: LatentModel, judge: Judge, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PSNR/SSIM of guidance-1 inversion + reconstruction per inverter and step count, and the VAE ceiling."""
    scans, labels = held_out_subset(args.held_out, args.seed)
    items = held_out_items(scans, labels, model.resolution)
    images = torch.stack([it.image for it in items])
    results: dict[str, Any] = {"images": len(items), "unet_rows": 0}
    columns: dict[str, torch.Tensor] = {"input": images}
    for inverter in ("ddim", "course"):
        rows = {}
        for steps in RECON_STEPS:
            t0 = time.perf_counter()
            cfg = engine_config(args.model, args.batch_size, f"inverter={inverter}", f"num_steps={steps}")
            runner, _, grid = run_engine(model, cfg, items)
            recon = grid[runner.points[0].label]
            rows[str(steps)] = {
                "psnr": _mean(psnr(recon, images)),
                "ssim": _mean(ssim(recon, images)),
                "judge_accuracy": judge.accuracy(recon, labels),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results["unet_rows"] += runner.denoiser.unet_evals
            columns.setdefault("VAE", grid[VAE_COLUMN])
            columns[f"{inverter} {steps}"] = recon
            log.info("reconstruction %s %3d steps: PSNR %.2f dB", inverter, steps, rows[str(steps)]["psnr"])
        results[inverter] = rows
    vae = columns["VAE"]
    results["vae"] = {"psnr": _mean(psnr(vae, images)), "ssim": _mean(ssim(vae, images))}
    results["judge_accuracy"] = {"input": judge.accuracy(images, labels), "vae": judge.accuracy(vae, labels)}
    curve = [results["ddim"][str(s)]["psnr"] for s in RECON_STEPS]
    results["monotonic"] = bool(all(b > a for a, b in zip(curve, curve[1:], strict=False)))
    results["gap_db_at_100"] = results["vae"]["psnr"] - results["ddim"][str(RECON_STEPS[-1])]["psnr"]
    return results, columns


# -- c. edits ---------------------------------------------------------------------------------------


def edit_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out scans of each pair's source digit (``--held-out`` split over the pairs), sources, targets."""
    per_pair = max(1, args.held_out // len(args.edit_pairs))
    scans, sources, targets = [], [], []
    for i, j in args.edit_pairs:
        s, _ = held_out_subset(per_pair, args.seed, label=i)
        scans.append(s)
        sources += [i] * len(s)
        targets += [j] * len(s)
    return np.concatenate(scans), np.array(sources), np.array(targets)


def edit_grids(args: argparse.Namespace) -> list[tuple[float, list[int]]]:
    """(guidance, start steps) of each engine run per pair: ``--starts`` at ``--guidance``, then the middle
    start steps at each ``--edit-guidance-sweep`` scale."""
    middle = [k for k in args.starts if MIDDLE_STARTS[0] <= k <= MIDDLE_STARTS[1]]
    sweep = [g for g in dict.fromkeys(args.edit_guidance_sweep) if g != args.guidance]
    return [(args.guidance, list(args.starts))] + [(g, middle) for g in sweep if middle]


def measure_edits(
    model: LatentModel, judge: Judge, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Edit success and SSIM to the input per start step, and the unedited-sampling baseline.

    Each pair runs ``task=edit`` once per (guidance, start steps) of :func:`edit_grids`; the inversion cache (a
    temporary folder) inverts each image once, at guidance 1 with its source caption. The baseline samples
    the target captions from random noise at step 0, every guidance in one call of the engine's sampler.
    """
    scans, sources, targets = edit_inputs(args)
    items = held_out_items(scans, sources, model.resolution)
    images = torch.stack([it.image for it in items])
    n = len(items)
    said: dict[tuple[float, int], list[np.ndarray]] = {}  # (guidance, start) → per pair: judge says target
    similarity: dict[tuple[float, int], list[torch.Tensor]] = {}  # … SSIM to the input
    edited: dict[tuple[float, int], list[torch.Tensor]] = {}  # … the edited images
    unet_rows = 0
    with tempfile.TemporaryDirectory() as cache:
        for i, j in args.edit_pairs:
            part = [it for it, s, t in zip(items, sources, targets, strict=True) if (s, t) == (i, j)]
            source = torch.stack([it.image for it in part])
            for g, starts in edit_grids(args):
                cfg = engine_config(
                    args.model,
                    args.batch_size,
                    "task=edit",
                    f"num_steps={EDIT_STEPS}",
                    f"edit_prompt='{digits.caption(j)}'",
                    f"guidance_scale={g}",
                    f"start_step=[{','.join(map(str, starts))}]",
                    cache=cache,
                )
                runner, _, grid = run_engine(model, cfg, part)
                unet_rows += runner.denoiser.unet_evals
                for p in runner.points:
                    out = grid[p.label]
                    said.setdefault((g, p.start_step), []).append(judge.predict(out) == j)
                    similarity.setdefault((g, p.start_step), []).append(ssim(out, source))
                    edited.setdefault((g, p.start_step), []).append(out)
    # the baseline: target captions from random noise, every guidance of the grids in one batch
    guidances = [g for g, _ in edit_grids(args)]
    x = noise(n, args.seed + 1, model.latent_shape).repeat(len(guidances), 1, 1, 1)
    prompts = [digits.caption(int(j)) for j in targets] * len(guidances)
    base, rows = generate(
        model, x, prompts, [g for g in guidances for _ in range(n)], EDIT_STEPS, args.batch_size
    )
    unet_rows += rows
    for b, g in enumerate(guidances):
        out = base[b * n : (b + 1) * n]
        said[g, None] = [judge.predict(out) == targets]
        similarity[g, None] = [ssim(out, images)]
        edited[g, None] = [out]
    score = {
        key: {"success": float(np.concatenate(v).mean()), "ssim": _mean(torch.cat(similarity[key]))}
        for key, v in said.items()
    }
    per_pair = {key: [float(v.mean()) for v in verdicts] for key, verdicts in said.items()}
    sweep = [(g, k) for g, starts in edit_grids(args)[1:] for k in starts]
    results = {
        "steps": EDIT_STEPS,
        "guidance": args.guidance,
        "inversion_guidance": 1.0,
        "pairs": [f"{i}->{j}" for i, j in args.edit_pairs],
        "images": n,
        "judge_accuracy_on_inputs": judge.accuracy(images, sources),
        "per_start": [{"start": k, **score[args.guidance, k]} for k in args.starts],
        "per_pair_success": {
            f"{i}->{j}": [per_pair[args.guidance, k][p] for k in args.starts]
            for p, (i, j) in enumerate(args.edit_pairs)
        },
        "baseline": score[args.guidance, None],
        "guidance_sweep": [
            {"guidance": g, "start": k, **score[g, k], "baseline_ssim": score[g, None]["ssim"]}
            for g, k in sweep
        ],
        "unet_rows": unet_rows,
    }
    columns = {"input": images}
    columns.update({f"k={k}": torch.cat(edited[args.guidance, k]) for k in args.starts})
    columns["from noise"] = edited[args.guidance, None][0]
    return results, columns


# -- verdicts, figures, report ----------------------------------------------------------------------


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean())


def _edit_ok(row: dict[str, Any], baseline_ssim: float) -> bool:
    return row["success"] >= TARGETS["edit_success"] and row["ssim"] > baseline_ssim


def verdicts(results: dict[str, Any], guidance: float) -> list[dict[str, Any]]:
    """One row per target of the issue: what it asks, what was measured, PASS or MISS."""
    main = next(
        c
        for c in results["samples"]["configs"]
        if c["template"] == digits.TEMPLATES[MAIN_TEMPLATE] and c["guidance"] == guidance
    )
    recon = results["reconstruction"]
    curve = " → ".join(f"{recon['ddim'][str(s)]['psnr']:.2f}" for s in RECON_STEPS)
    edits = results["edits"]
    base = edits["baseline"]["ssim"]
    middle = [r for r in edits["per_start"] if MIDDLE_STARTS[0] <= r["start"] <= MIDDLE_STARTS[1]]
    good = [r for r in middle if _edit_ok(r, base)]
    shown = "; ".join(f"k={r['start']}: {100 * r['success']:.0f}%, SSIM {r['ssim']:.3f}" for r in middle)
    return [
        {
            "target": f"samples 'digit k' (g={guidance:g}, {SAMPLE_STEPS} steps): judge agrees ≥ 80%",
            "measured": f"{100 * main['accuracy']:.1f}%",
            "pass": main["accuracy"] >= TARGETS["sample_accuracy"],
        },
        {
            "target": "reconstruction PSNR grows with steps 10 → 25 → 50 → 100",
            "measured": f"{curve} dB",
            "pass": recon["monotonic"],
        },
        {
            "target": "reconstruction at 100 steps within 3 dB of the VAE ceiling",
            "measured": f"gap {recon['gap_db_at_100']:.2f} dB (VAE {recon['vae']['psnr']:.2f} dB)",
            "pass": recon["gap_db_at_100"] <= TARGETS["recon_gap_db"],
        },
        {
            "target": (
                f"edits from a middle start ({MIDDLE_STARTS[0]}–{MIDDLE_STARTS[1]} of {EDIT_STEPS}): "
                f"judge says j ≥ 60% with SSIM > baseline {base:.3f}"
            ),
            "measured": shown or "no middle start step measured",
            "pass": bool(good),
        },
    ]


def tradeoff_figure(edits: dict[str, Any], path: Path) -> None:
    """Edit success and SSIM to the input against the start step, with the baseline SSIM; the guidance
    sweep's middle start steps as fainter markers."""
    g0 = edits["guidance"]
    starts = [r["start"] for r in edits["per_start"]]
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    ax = fig.add_subplot()
    ax.axvspan(*MIDDLE_STARTS, color="0.92", zorder=0)
    ax.plot(starts, [100 * r["success"] for r in edits["per_start"]], "o-", color="tab:blue", label="success")
    ax.axhline(100 * TARGETS["edit_success"], color="tab:blue", ls=":", lw=1, label="60% target")
    ax.set(xlabel=f"start step (of {edits['steps']})", ylabel="judge says target digit (%)", ylim=(0, 102))
    ax.set_xticks(starts)
    ax2 = ax.twinx()
    ax2.plot(starts, [r["ssim"] for r in edits["per_start"]], "s-", color="tab:orange", label="SSIM to input")
    ax2.axhline(edits["baseline"]["ssim"], color="tab:orange", ls="--", lw=1, label="SSIM, unedited sampling")
    ax2.set(ylabel="SSIM to input", ylim=(0, 1))
    sweep = sorted({r["guidance"] for r in edits["guidance_sweep"]})
    for g, marker in zip(sweep, "^vDPX*", strict=False):
        rows = [r for r in edits["guidance_sweep"] if r["guidance"] == g]
        ks = [r["start"] for r in rows]
        style = {"marker": marker, "ls": "--", "alpha": 0.6}
        ax.plot(ks, [100 * r["success"] for r in rows], color="tab:blue", label=f"success, g={g:g}", **style)
        ax2.plot(ks, [r["ssim"] for r in rows], color="tab:orange", label=f"SSIM, g={g:g}", **style)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    ax.set_title(f"digits edits {', '.join(edits['pairs'])}; solid: guidance {g0:g}", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)


def reconstruction_figure(recon: dict[str, Any], path: Path) -> None:
    """PSNR against the number of steps per inverter, with the VAE ceiling."""
    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    ax = fig.add_subplot()
    for inverter, style in (("ddim", "o-"), ("course", "s--")):
        ax.plot(RECON_STEPS, [recon[inverter][str(s)]["psnr"] for s in RECON_STEPS], style, label=inverter)
    ax.axhline(recon["vae"]["psnr"], color="k", lw=1, label="VAE ceiling")
    ax.set(xscale="log", xticks=RECON_STEPS, xticklabels=[str(s) for s in RECON_STEPS])
    ax.set(xlabel="DDIM steps", ylabel="PSNR to input (dB)", title="held-out reconstruction, guidance 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def save_figures(results: dict[str, Any], images: dict[str, Any], out: Path) -> dict[str, str]:
    """All PNGs; returns their file names by role."""
    n = results["samples"]["samples_per_digit"]
    grid = images["samples"].view(10, n, 3, *images["samples"].shape[-2:])
    save_grid(
        out / "samples.png",
        [(str(c), grid[:, c]) for c in range(n)],
        [digits.caption(k, MAIN_TEMPLATE) for k in range(10)],
        min_cell=48,
    )
    recon = images["reconstruction"]
    rows = list(
        range(0, results["reconstruction"]["images"], max(1, results["reconstruction"]["images"] // 10))
    )
    save_grid(out / "reconstruction.png", [(k, v[rows]) for k, v in recon.items()], [str(r) for r in rows], 48)
    edits = images["edits"]
    n_edit, pairs = results["edits"]["images"], len(results["edits"]["pairs"])
    per_pair = n_edit // pairs
    rows = [p * per_pair + r for p in range(pairs) for r in range(min(2, per_pair))]
    labels = [results["edits"]["pairs"][r // per_pair] for r in rows]
    save_grid(out / "edits.png", [(k, v[rows]) for k, v in edits.items()], labels, min_cell=48)
    tradeoff_figure(results["edits"], out / "edit_tradeoff.png")
    reconstruction_figure(results["reconstruction"], out / "reconstruction_psnr.png")
    return {
        "samples": "samples.png",
        "reconstruction": "reconstruction.png",
        "reconstruction_psnr": "reconstruction_psnr.png",
        "edits": "edits.png",
        "edit_tradeoff": "edit_tradeoff.png",
    }


def markdown(results: dict[str, Any]) -> str:
    """The human-readable report."""
    cfg, samples = results["config"], results["samples"]
    lines = [
        "# Digits model benchmark",
        "",
        f"`{cfg['command']}` — {cfg['machine']}, {cfg['threads']} threads, "
        f"{results['seconds']['total']:.0f} s.",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *(
            f"| {v['target']} | {v['measured']} | {'PASS' if v['pass'] else 'MISS'} |"
            for v in results["targets"]
        ),
        "",
        "## Judge",
        "",
        f"Logistic regression on the {cfg['train_images']} training scans; held-out accuracy "
        f"{100 * results['judge']['scans_8x8']:.1f}% on the 8×8 scans, "
        f"{100 * results['judge']['rgb_16x16_round_trip']:.1f}% after the 16×16 RGB round trip.",
        "",
        f"## a. Samples ({samples['steps']} steps, {samples['samples_per_digit']} per digit)",
        "",
        "| prompt | guidance | agreement | " + " | ".join(str(k) for k in range(10)) + " |",
        "|---|---|---|" + "---|" * 10,
    ]
    for c in results["samples"]["configs"]:
        digits_row = " | ".join(f"{100 * a:.0f}" for a in c["per_digit"])
        lines.append(f"| `{c['template']}` | {c['guidance']:g} | {100 * c['accuracy']:.1f}% | {digits_row} |")
    recon = results["reconstruction"]
    lines += [
        "",
        f"## b. Reconstruction ({recon['images']} held-out digits, guidance 1, start step 0)",
        "",
        f"VAE ceiling: PSNR {recon['vae']['psnr']:.2f} dB, SSIM {recon['vae']['ssim']:.3f}; judge accuracy on "
        f"inputs {100 * recon['judge_accuracy']['input']:.0f}%, on VAE round trips "
        f"{100 * recon['judge_accuracy']['vae']:.0f}%.",
        "",
        "| inverter | steps | PSNR (dB) | SSIM | judge accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for inverter in ("ddim", "course"):
        for s in RECON_STEPS:
            r = recon[inverter][str(s)]
            lines.append(
                f"| {inverter} | {s} | {r['psnr']:.2f} | {r['ssim']:.3f} | {100 * r['judge_accuracy']:.0f}% "
                f"| {r['seconds']:.0f} |"
            )
    edits = results["edits"]
    lines += [
        "",
        f"## c. Edits ({', '.join(edits['pairs'])}; {edits['images']} held-out inputs, {edits['steps']} steps, "
        f"inversion guidance 1, edit guidance {edits['guidance']:g})",
        "",
        f"Unedited sampling of the target prompt from random noise: judge says target "
        f"{100 * edits['baseline']['success']:.0f}%, SSIM to the input {edits['baseline']['ssim']:.3f}.",
        "",
        "| start step | judge says target | SSIM to input | " + " | ".join(edits["pairs"]) + " |",
        "|---|---|---|" + "---|" * len(edits["pairs"]),
    ]
    for s, r in enumerate(edits["per_start"]):
        pairs = " | ".join(f"{100 * edits['per_pair_success'][p][s]:.0f}%" for p in edits["pairs"])
        lines.append(f"| {r['start']} | {100 * r['success']:.0f}% | {r['ssim']:.3f} | {pairs} |")
    if edits["guidance_sweep"]:
        lines += [
            "",
            "Guidance sweep at the middle start steps (each guidance with its own unedited-sampling baseline):",
            "",
            "| guidance | start step | judge says target | SSIM to input | baseline SSIM | both targets |",
            "|---|---|---|---|---|---|",
        ]
        for r in edits["guidance_sweep"]:
            lines.append(
                f"| {r['guidance']:g} | {r['start']} | {100 * r['success']:.0f}% | {r['ssim']:.3f} "
                f"| {r['baseline_ssim']:.3f} | {'yes' if _edit_ok(r, r['baseline_ssim']) else 'no'} |"
            )
    lines += ["", "## Figures", "", *(f"- {k}: `{v}`" for k, v in results["figures"].items()), ""]
    return "\n".join(lines)


def log_summary(results: dict[str, Any]) -> None:
    log.info("judge held-out accuracy: %s", results["judge"])
    for v in results["targets"]:
        log.info("%-4s  %s  —  %s", "PASS" if v["pass"] else "MISS", v["target"], v["measured"])
    for r in results["edits"]["guidance_sweep"]:
        log.info(
            "edit sweep g=%g k=%d: judge says target %.0f%%, SSIM %.3f (baseline %.3f)",
            r["guidance"],
            r["start"],
            100 * r["success"],
            r["ssim"],
            r["baseline_ssim"],
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.model = model_overrides("digits", args.model_dir)  # the engine's model=… overrides
    cfg = engine_config(args.model, args.batch_size)
    model = load_model(cfg.model, cfg.runtime, cfg.cache.dir)
    judge = train_judge(args.seed)
    results: dict[str, Any] = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "command": " ".join(
                ["python scripts/benchmark_digits.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "train_images": len(digits.split()["train"][0]),
        },
        "judge": held_out_accuracies(judge, model.resolution),
        "seconds": {},
    }
    images: dict[str, Any] = {}
    for name, measure in (
        ("samples", measure_samples),
        ("reconstruction", measure_reconstruction),
        ("edits", measure_edits),
    ):
        start = time.perf_counter()
        results[name], images[name] = measure(model, judge, args)
        results["seconds"][name] = round(time.perf_counter() - start, 1)
        log.info("%s done in %.0f s (%d UNet rows)", name, results["seconds"][name], results[name]["unet_rows"])
    results["targets"] = verdicts(results, args.guidance)
    results["figures"] = save_figures(results, images, args.out)
    results["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    log_summary(results)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
