"""Benchmark of the digits ControlNet: does generation follow the control, and does control help inversion?

    python scripts/benchmark_controlnet.py                                  # the shipped digits ControlNet
    python scripts/benchmark_controlnet.py --controlnet-path /tmp/cn --n-generate 20 --n-invert 10 --n-edit 10

Held-out digits only (``ddim_lab.data.digits``: neither the model, the ControlNet nor the judge saw them). All
work goes through the lab's own code: ``controlnet_task.generate`` (diffusers' ControlNet pipeline over the
loaded model), the engine's ``Runner`` (any inverter, with the ControlNet residuals in inversion and sampling),
``ddim_lab.methods.control`` (Canny 100/200) and ``ddim_lab.data.judge``.

a. generation: the Canny map of a held-out digit + the prompt of the same digit, with the ControlNet
   (scale 1) and without (scale 0: zero residuals, exactly the plain model) from the same seeds; the judge's
   agreement with the digit, and edge-SSIM: SSIM of the result's Canny map to the control map;
b. reconstruction: invert and sample back at guidance 1 and 7.5 (inverted at the same guidance), with and
   without the ControlNet fed the input's own edges; PSNR/SSIM to the input, paired bootstrap intervals;
c. edits i → (i+5) mod 10 at guidance 7.5 (inverted at 1) from several start steps: the judge's success
   rate and SSIM to the input, for scale 0, 0.5 and 1; SSIM compared at equal success by interpolation.

Writes ``results.json`` and ``results.md`` (plus grids) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchmark_digits import held_out_items  # noqa: E402  (the sibling script: held-out digits as Items)

from ddim_lab.config.compose import compose_config  # noqa: E402
from ddim_lab.data import digits  # noqa: E402
from ddim_lab.data.folders import Item  # noqa: E402
from ddim_lab.data.judge import train_judge  # noqa: E402
from ddim_lab.methods.control import make_control  # noqa: E402
from ddim_lab.metrics.image import ssim  # noqa: E402
from ddim_lab.models.controlnet import attach_controlnet  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402
from ddim_lab.study.controlnet_task import control_pipeline, generate, make_sampler  # noqa: E402
from ddim_lab.study.records import save_grid  # noqa: E402
from ddim_lab.study.runner import Runner  # noqa: E402

log = logging.getLogger("benchmark_controlnet")
CANNY = {"name": "canny", "low_threshold": 100, "high_threshold": 200}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--controlnet-path", default=None, help="a local ControlNet dir (default: the shipped one)")
    p.add_argument("--n-generate", type=int, default=100, help="held-out digits for (a), stratified")
    p.add_argument("--n-invert", type=int, default=50, help="held-out digits for (b)")
    p.add_argument("--n-edit", type=int, default=50, help="held-out digits for (c)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps everywhere")
    p.add_argument("--generate-guidance", type=float, default=4.0)
    p.add_argument("--edit-starts", type=int, nargs="+", default=[0, 5, 10, 15])
    p.add_argument("--edit-scales", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/controlnet"))
    return p.parse_args(argv)


def held_out(n: int, seed: int) -> tuple[list[Item], np.ndarray]:
    """``n`` held-out digits, stratified over the labels (seeded order), as the lab's ``Item`` s at 16 px."""
    scans, labels = digits.held_out_subset(n, seed)
    return held_out_items(scans, labels, 16, eight_bit=True), labels


def bootstrap(diff: np.ndarray, n: int, seed: int) -> list[float]:
    """95% percentile interval of the mean of ``diff`` over ``n`` resamples."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def cfg_for(args: argparse.Namespace, controlled: bool, *overrides: str):
    net = ["control=canny", "controlnet=digits-canny"]
    if controlled and args.controlnet_path:
        net = ["control=canny", "controlnet=local", f"controlnet.path='{args.controlnet_path}'"]
    base = ["model=digits", f"num_steps={args.steps}", "metrics.lpips=off", "runtime.device=cpu"]
    base += ["runtime.progress=false", "cache.enabled=false", "batch_size=128", "negative_prompt=''"]
    return compose_config([*base, *(net if controlled else []), *overrides])


# -- a. controlled generation ---------------------------------------------------------------------------
def measure_generation(models, judge, args) -> tuple[dict[str, Any], list]:
    items, labels = held_out(args.n_generate, args.seed)
    images = torch.stack([it.image for it in items])
    canny = make_control(CANNY)
    control = canny(images)
    model = models[True]
    pipe = control_pipeline(model, make_sampler("ddim", model), {})
    seeds = [args.seed + i for i in range(len(items))]
    out: dict[str, Any] = {"n": len(items), "steps": args.steps, "guidance": args.generate_guidance}
    columns = [("input", images[:20]), ("control", control[:20])]
    for name, scale in (("uncontrolled", 0.0), ("controlled", 1.0)):
        latents = generate(
            pipe,
            control,
            [it.prompt for it in items],
            seeds,
            num_steps=args.steps,
            guidance=args.generate_guidance,
            scale=scale,
            batch_size=128,
        )
        result = model.decode(latents)
        edge_ssim = ssim(canny(result), control).numpy()
        agree = judge.predict(result) == labels
        out[name] = {"judge_agreement": float(agree.mean()), "edge_ssim": summary(edge_ssim)}
        out[name]["_edge_ssim"] = edge_ssim
        columns.append((name, result[:20]))
        log.info("generation %s: judge %.3f, edge-SSIM %.3f", name, agree.mean(), edge_ssim.mean())
    diff = out["controlled"].pop("_edge_ssim") - out["uncontrolled"].pop("_edge_ssim")
    out["edge_ssim_gain"] = {"mean": float(diff.mean()), "ci95": bootstrap(diff, args.bootstrap, args.seed)}
    return out, columns


# -- b. reconstruction ------------------------------------------------------------------------------------
def measure_reconstruction(models, args) -> tuple[dict[str, Any], list]:
    items, _ = held_out(args.n_invert, args.seed + 1)
    rows: dict[bool, list[dict]] = {}
    columns = []
    for controlled in (False, True):
        cfg = cfg_for(args, controlled, "guidance_scale=[1,7.5]", "inversion.guidance_scale=match")
        runner = Runner(cfg, models[controlled])
        rows[controlled], cols = runner.run_group(items)
        if not controlled:
            columns.append(("input", cols["input"][:20]))
        columns += [
            (f"{'ctrl' if controlled else 'plain'} {k}", v[:20]) for k, v in cols.items() if k.startswith("g=")
        ]
    out: dict[str, Any] = {"n": len(items), "steps": args.steps}
    for g in (1.0, 7.5):
        entry: dict[str, Any] = {}
        for metric in ("psnr", "ssim"):
            values = {
                c: np.array([r[metric] for r in rows[c] if r["guidance_scale"] == g]) for c in (False, True)
            }
            diff = values[True] - values[False]
            entry[metric] = {
                "unconditioned": summary(values[False]),
                "conditioned": summary(values[True]),
                "gain": float(diff.mean()),
                "gain_ci95": bootstrap(diff, args.bootstrap, args.seed),
            }
        out[f"guidance_{g:g}"] = entry
        log.info(
            "reconstruction g=%g: PSNR %.2f → %.2f dB, SSIM %.3f → %.3f",
            g,
            entry["psnr"]["unconditioned"]["mean"],
            entry["psnr"]["conditioned"]["mean"],
            entry["ssim"]["unconditioned"]["mean"],
            entry["ssim"]["conditioned"]["mean"],
        )
    return out, columns


# -- c. edits ------------------------------------------------------------------------------------------------
def measure_edits(models, judge, args) -> dict[str, Any]:
    items, labels = held_out(args.n_edit, args.seed + 2)
    targets = (labels + 5) % 10
    curves: dict[str, list[dict]] = {}
    for scale in args.edit_scales:
        controlled = scale > 0
        models[True].controlnet_scale = scale
        success = {k: [] for k in args.edit_starts}
        similarity = {k: [] for k in args.edit_starts}
        for j in sorted(set(targets.tolist())):
            part = [it for it, t in zip(items, targets, strict=True) if t == j]
            cfg = cfg_for(
                args,
                controlled,
                "task=edit",
                f"edit_prompt='{digits.caption(j)}'",
                "guidance_scale=7.5",
                f"start_step=[{','.join(map(str, args.edit_starts))}]",
            )
            runner = Runner(cfg, models[controlled])
            rows, cols = runner.run_group(part)
            for p in runner.points:
                verdict = judge.predict(cols[p.label]) == j
                success[p.start_step] += verdict.tolist()
                similarity[p.start_step] += [r["ssim"] for r in rows if r["start_step"] == p.start_step]
        curves[f"scale_{scale:g}"] = [
            {"start_step": k, "success": float(np.mean(success[k])), "ssim": float(np.mean(similarity[k]))}
            for k in args.edit_starts
        ]
        log.info("edits scale %g: %s", scale, curves[f"scale_{scale:g}"])
    models[True].controlnet_scale = 1.0
    return {
        "n": len(items),
        "steps": args.steps,
        "guidance": 7.5,
        "curves": curves,
        "at_equal_success": matched(curves),
    }


def matched(curves: dict[str, list[dict]]) -> list[dict[str, float]]:
    """SSIM of each curve at the success rates the unconditioned curve reaches (linear interpolation)."""
    base = curves.get("scale_0")
    if not base:
        return []
    out = []
    for point in base:
        entry = {"success": point["success"], "scale_0": point["ssim"]}
        for name, curve in curves.items():
            if name == "scale_0":
                continue
            s = np.array([c["success"] for c in curve])
            v = np.array([c["ssim"] for c in curve])
            order = np.argsort(s)
            inside = s.min() <= point["success"] <= s.max()
            entry[name] = float(np.interp(point["success"], s[order], v[order])) if inside else None
        out.append(entry)
    return out


def markdown(results: dict[str, Any]) -> str:
    g, r, e = results["generation"], results["reconstruction"], results["edits"]
    lines = [
        f"Setup: {results['setup']}",
        "",
        f"**a. Generation** ({g['n']} held-out digits, Canny map + the same digit's prompt,"
        f" {g['steps']} DDIM steps, guidance {g['guidance']:g}):",
        "",
        "| | judge agreement | edge-SSIM to the control |",
        "|---|---|---|",
    ]
    for name in ("uncontrolled", "controlled"):
        lines.append(f"| {name} | {g[name]['judge_agreement']:.1%} | {g[name]['edge_ssim']['mean']:.3f} |")
    ci = g["edge_ssim_gain"]["ci95"]
    lines += [
        "",
        f"Edge-SSIM gain {g['edge_ssim_gain']['mean']:+.3f} (95% CI {ci[0]:+.3f} … {ci[1]:+.3f}).",
        "",
    ]
    lines += [
        f"**b. Reconstruction** ({r['n']} held-out digits, {r['steps']} steps, inverted and sampled at the same"
        " guidance, start step 0):",
        "",
        "| guidance | PSNR uncond. | PSNR cond. | gain (95% CI) | SSIM uncond. | SSIM cond. | gain (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("guidance_1", "guidance_7.5"):
        p, s = r[key]["psnr"], r[key]["ssim"]
        lines.append(
            f"| {key.split('_')[1]} | {p['unconditioned']['mean']:.2f} | {p['conditioned']['mean']:.2f} |"
            f" {p['gain']:+.2f} ({p['gain_ci95'][0]:+.2f} … {p['gain_ci95'][1]:+.2f}) |"
            f" {s['unconditioned']['mean']:.3f} | {s['conditioned']['mean']:.3f} |"
            f" {s['gain']:+.3f} ({s['gain_ci95'][0]:+.3f} … {s['gain_ci95'][1]:+.3f}) |"
        )
    lines += [
        "",
        f"**c. Edits** i → (i+5) mod 10 ({e['n']} held-out digits, {e['steps']} steps, guidance 7.5, inverted"
        " at 1): success (judge says the target) / SSIM to the input per start step:",
        "",
        "| ControlNet scale | "
        + " | ".join(f"k={c['start_step']}" for c in next(iter(e["curves"].values())))
        + " |",
        "|---|" + "---|" * len(next(iter(e["curves"].values()))),
    ]
    for name, curve in e["curves"].items():
        cells = " | ".join(f"{c['success']:.0%} / {c['ssim']:.3f}" for c in curve)
        lines.append(f"| {name.split('_')[1]} | {cells} |")
    lines += ["", "SSIM at the success rates of the unconditioned curve (interpolated; – = not reached):", ""]
    names = [n for n in e["curves"] if n != "scale_0"]
    lines += ["| success | scale 0 | " + " | ".join(f"scale {n.split('_')[1]}" for n in names) + " |"]
    lines += ["|---|---|" + "---|" * len(names)]
    for m in e["at_equal_success"]:
        cells = " | ".join("–" if m[n] is None else f"{m[n]:.3f}" for n in names)
        lines.append(f"| {m['success']:.0%} | {m['scale_0']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    plain_cfg, ctrl_cfg = cfg_for(args, False), cfg_for(args, True)
    models = {
        False: load_model(plain_cfg.model, {"device": "cpu"}),
        True: attach_controlnet(load_model(ctrl_cfg.model, {"device": "cpu"}), ctrl_cfg.controlnet),
    }
    judge = train_judge()
    generation, gen_cols = measure_generation(models, judge, args)
    save_grid(args.out / "generation.png", gen_cols, [f"held-out {i}" for i in range(len(gen_cols[0][1]))])
    reconstruction, rec_cols = measure_reconstruction(models, args)
    save_grid(args.out / "reconstruction.png", rec_cols, [f"held-out {i}" for i in range(len(rec_cols[0][1]))])
    edits = measure_edits(models, judge, args)
    results = {
        "setup": (
            f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} torch threads, fp32, torch"
            f" {torch.__version__}; ControlNet {args.controlnet_path or 'ddim_lab/assets/digits-controlnet'}"
            f" (revision {models[True].controlnet_revision}); seed {args.seed}"
        ),
        "generation": generation,
        "reconstruction": reconstruction,
        "edits": edits,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    log.info("wrote %s in %.0f s", args.out, results["seconds"])


if __name__ == "__main__":
    main()
