"""Few-step sample quality of the distilled digits model (digits-lcm), judged by the digits classifier.

    python scripts/benchmark_digits_lcm.py                     # the shipped model, defaults below
    python scripts/benchmark_digits_lcm.py --model-dir /tmp/l --samples-per-digit 4   # quick look

Prompt "digit {name}", 20 samples per digit from the same seeded noise, deterministic DDIM with trailing
spacing at 1, 2 and 4 steps (the model's own scheduler), through ``benchmark_digits.generate`` (the engine's
sampler, as ``task=sample`` runs it). The teacher (digits-ldm) is measured on the same noise and steps with
trailing spacing at its distillation guidance, for comparison. Writes ``results.json`` and a sample grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchmark_digits import generate, noise  # noqa: E402  (the sibling script: the engine's sampler)
from matplotlib.figure import Figure  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from ddim_lab.data import digits  # noqa: E402
from ddim_lab.data.judge import train_judge  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402
from ddim_lab.models.sources import shipped_model_dir  # noqa: E402

log = logging.getLogger("benchmark_digits_lcm")
TEMPLATE = 1  # "digit {name}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model-dir", type=Path, default=shipped_model_dir("digits-lcm"), help="diffusers directory"
    )
    p.add_argument("--teacher-dir", type=Path, default=shipped_model_dir("digits-ldm"))
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/digits-lcm"))
    p.add_argument("--figure", type=Path, default=None, help="also draw the student's samples per N here")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--samples-per-digit", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0, help="the student's guidance (distilled: 1)")
    p.add_argument("--teacher-guidance", type=float, default=4.0, help="the teacher's (its distillation ω)")
    p.add_argument("--batch-size", type=int, default=256, help="UNet rows per call")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(path: Path, name: str):
    """A digits-format diffusers directory on CPU, its scheduler switched to trailing spacing (the student's
    own already is; the teacher's is leading)."""
    model = load_model(
        {"name": name, "source": "local", "path": str(path), "resolution": 16}, {"device": "cpu"}
    )
    model.pipe.scheduler = model.scheduler(timestep_spacing="trailing", steps_offset=0)
    return model


def samples_figure(grids: list, per_digit: int, path: Path) -> None:
    """The student's samples side by side per step count (a row per digit, its first 8 samples)."""
    fig = Figure(figsize=(3.2 * len(grids), 3.4))
    for i, (steps, images, accuracy) in enumerate(grids):
        ax = fig.add_subplot(1, len(grids), i + 1)
        shown = images.reshape(10, per_digit, *images.shape[1:])[:, :8].flatten(0, 1)  # 8 per digit
        ax.imshow(make_grid(shown, nrow=min(per_digit, 8), padding=1).permute(1, 2, 0).numpy())
        ax.set_title(f"{steps} step{'s' if steps > 1 else ''}: judged {100 * accuracy:.0f}%")
        ax.axis("off")
    fig.suptitle('digits-lcm, "digit {name}", guidance 1, DDIM trailing')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    judge = train_judge(args.seed)
    labels = np.repeat(np.arange(10), args.samples_per_digit)  # (10 n,) digit-major
    prompts = [digits.caption(int(k), TEMPLATE) for k in labels]
    results: dict[str, Any] = {
        "command": " ".join(
            ["python scripts/benchmark_digits_lcm.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "samples": len(labels),
        "prompt": digits.TEMPLATES[TEMPLATE],
        "rows": [],
    }
    grids: dict[str, list] = {}
    for name, path, g in (
        ("digits-lcm", args.model_dir, args.guidance),
        ("digits-ldm", args.teacher_dir, args.teacher_guidance),
    ):
        model = load(path, name)
        x = noise(len(labels), args.seed, model.latent_shape)  # the same noise for every model and N
        for steps in args.steps:
            t0 = time.perf_counter()
            images, rows = generate(model, x, prompts, [g] * len(labels), steps, args.batch_size)
            agree = judge.predict(images) == labels
            row = {
                "model": name,
                "steps": steps,
                "guidance": g,
                "accuracy": float(agree.mean()),
                "per_digit": [float(agree[labels == k].mean()) for k in range(10)],
                "unet_rows": rows,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results["rows"].append(row)
            log.info("%s  %d steps  guidance %g: judge agrees %.1f%%", name, steps, g, 100 * row["accuracy"])
            save_image(images, args.out / f"samples_{name}_{steps}steps.png", nrow=args.samples_per_digit)
            grids.setdefault(name, []).append((steps, images, row["accuracy"]))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if args.figure:
        samples_figure(grids["digits-lcm"], args.samples_per_digit, args.figure)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
