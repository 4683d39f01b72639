"""Round-trip convergence orders of the flow inverters on the digits flow model (issue 19, item 8).

    python scripts/benchmark_flow_orders.py                                   # N = 4 … 64, 4 held-out digits
    python scripts/benchmark_flow_orders.py --images 2 --steps 4 8 16 --fields model   # quick

For each inverter and step count N, held-out digits (``ddim_lab/assets/digits-heldout``, their captions,
guidance 1) are inverted with the lab's inverter (``make_inverter`` → ``plan`` → ``invert``) and sampled back
from step 0 (``sample``) on the model's own N-step schedule. The round-trip error is the relative L2 distance
‖x̂₀ − x₀‖ / ‖x₀‖ of the latents, pooled over the images; the order is the least-squares slope of −log(error)
against log N (also given between consecutive N).

Two velocity fields:

- ``model``: the shipped transformer, v(x, σ);
- ``frozen``: the same transformer evaluated at one fixed level σ* (``--frozen-sigma``) whatever the step's
  level, an autonomous ODE dx/dσ = v(x, σ*). There a second-order one-step method's leading local error is
  odd in the step and cancels between inverting and sampling, so the round trip is third order; the model's
  own field shows how far its time dependence (and the schedule's short last step, 0.001 → 0) keeps the
  measured slopes from that asymptote at N ≤ 64.

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ddim_lab.data.folders import load_dataset  # noqa: E402
from ddim_lab.engine.ddim import Prediction  # noqa: E402
from ddim_lab.engine.denoiser import Conditioning  # noqa: E402
from ddim_lab.engine.flow import TIME_SCALE, sigma_of_timestep, to_flow, velocity_prediction  # noqa: E402
from ddim_lab.engine.flow_denoiser import FlowDenoiser  # noqa: E402
from ddim_lab.methods.inversion import make_inverter  # noqa: E402
from ddim_lab.methods.inversion.base import InvertContext, SampleRows  # noqa: E402
from ddim_lab.models.latent import LatentModel  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402

log = logging.getLogger("benchmark_flow_orders")

HELD_OUT = Path(__file__).resolve().parents[1] / "ddim_lab" / "assets" / "digits-heldout"
INVERTERS = ("flow_euler", "rf_solver", "fireflow", "uni_inv")
FIELDS = ("model", "frozen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/flow-orders"))
    p.add_argument("--images", type=int, default=4, help="held-out digits (one per digit class, 0, 1, …)")
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    p.add_argument("--inverters", nargs="+", default=list(INVERTERS))
    p.add_argument("--fields", nargs="+", choices=FIELDS, default=list(FIELDS))
    p.add_argument("--frozen-sigma", type=float, default=0.5, help="σ* of the time-frozen field")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


class FrozenTime:
    """A flow denoiser whose velocity is taken at one level σ* for every call: v(x, σ) = v_model(x, σ*).

    The engine's latents and predictions stay at the call's own level (x_σ = r(σ)·x, ε̂ and x̂₀ from that v), so
    every inverter runs unchanged on the autonomous field."""

    def __init__(self, base: FlowDenoiser, sigma: float) -> None:
        self.base = base
        self.sigma = sigma

    @property
    def unet_evals(self) -> int:
        return self.base.unet_evals

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        sigma = sigma_of_timestep(t).cpu()  # (B,) the call's own level
        x_sigma = to_flow(x, sigma)
        frozen = torch.full_like(t, self.sigma * TIME_SCALE, dtype=torch.float64)  # (B,) σ* · 1000
        return velocity_prediction(self.base.velocity(x_sigma, frozen, cond), x_sigma, sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.predict(x, t, cond).eps


def round_trip_error(model: LatentModel, denoiser: Any, name: str, steps: int, x0, cond) -> float:
    """‖sample(invert(x0)) − x0‖ / ‖x0‖ of ``name`` at ``steps`` steps, from start step 0."""
    inverter = make_inverter(name)
    plan = inverter.plan(model.scheduler(), steps)
    B = len(x0)
    ctx = InvertContext(generators=[torch.Generator().manual_seed(i) for i in range(B)])
    artifact = inverter.invert(denoiser, x0, plan, cond, ctx)
    rows = SampleRows(artifact, cond, cond, torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool))
    out = inverter.sample(denoiser, plan, rows)
    return float((out - x0).norm() / x0.norm())


def slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of −log(error) against log N: the convergence order."""
    x = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    y = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum())


def local_slopes(steps: list[int], errors: list[float]) -> list[float]:
    return [slope(steps[i : i + 2], errors[i : i + 2]) for i in range(len(steps) - 1)]


def markdown(results: dict[str, Any]) -> str:
    steps = results["steps"]
    lines = [
        "# Round-trip orders of the flow inverters (digits-flow)",
        "",
        f"{results['images']} held-out digits, guidance 1, latent relative L2 round-trip error from start "
        f"step 0; N = {', '.join(map(str, steps))}. Frozen field: σ* = {results['frozen_sigma']}.",
        "",
        "| field | inverter | " + " | ".join(f"N={n}" for n in steps) + " | fitted order | local orders |",
        "|---|---|" + "---|" * len(steps) + "---|---|",
    ]
    for row in results["rows"]:
        errs = " | ".join(f"{e:.3g}" for e in row["errors"])
        local = ", ".join(f"{s:.2f}" for s in row["local_orders"])
        lines.append(f"| {row['field']} | {row['inverter']} | {errs} | {row['order']:.2f} | {local} |")
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model = load_model({"name": "digits-flow", "source": "digits-flow", "resolution": 16}, {"device": "cpu"})
    items = load_dataset(HELD_OUT, model.resolution, "")[::2][: args.images]  # digit0_0, digit1_0, …
    x0 = model.encode(torch.stack([it.image for it in items]))
    cond = model.conditioning([it.prompt for it in items], [1.0] * len(items))
    denoisers = {"model": model.denoiser(), "frozen": FrozenTime(model.denoiser(), args.frozen_sigma)}
    started = time.time()
    rows = []
    with torch.no_grad():
        for field in args.fields:
            for name in args.inverters:
                errors = [round_trip_error(model, denoisers[field], name, n, x0, cond) for n in args.steps]
                row = {
                    "field": field,
                    "inverter": name,
                    "errors": errors,
                    "order": slope(args.steps, errors),
                    "local_orders": local_slopes(args.steps, errors),
                }
                log.info(
                    "%s %s: errors %s, order %.2f", field, name, [f"{e:.3g}" for e in errors], row["order"]
                )
                rows.append(row)
    results = {
        "images": len(items),
        "image_names": [it.name for it in items],
        "steps": args.steps,
        "frozen_sigma": args.frozen_sigma,
        "rows": rows,
        "seconds": time.time() - started,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python scripts/benchmark_flow_orders.py " + " ".join(argv or []),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    log.info("wrote %s", args.out / "results.md")


if __name__ == "__main__":
    main(sys.argv[1:])
