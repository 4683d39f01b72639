"""Benchmark the sweep engine against the seed-style loop: same process, same images, same model.

    python scripts/benchmark_grid.py                                   # shipped digits model, CPU
    python scripts/benchmark_grid.py --model tiny --num-steps 10 --starts 0 5   # plumbing check in seconds
    python scripts/benchmark_grid.py --model sd15-random --dtype fp16  # GPU, Stable Diffusion 1.5 size

Both sides encode, invert, sample and decode every image × grid point (guidance × start step):

- seed-style loop (the course notebook's way): for every image and every grid point, encode the prompts and
  the image, invert from scratch (``ddim_lab.engine.ddim.invert``, batch 1, with the inversion guidance), sample
  that one trajectory (``ddim_lab.engine.ddim.sample``, batch 1), decode;
- engine: ``ddim_lab.study.runner.Runner`` composed with Hydra like the CLI: each image inverted once, every
  grid point's trajectory batched through the UNet per timestep (at most ``--batch-size`` per call), joining
  when its start step comes; guidance 1 costs one UNet row per step.

Both use the same plan, denoiser class and inversion guidance (``--inversion-guidance``, default 3.5 as in the
seed), so their outputs are equivalent and the largest latent difference between them is printed. Being the
same denoiser, the loop also gets one UNet row per step at guidance 1 (the notebook spent two), so the
evaluation ratio measures re-inversion alone and the wall-time ratio re-inversion plus batching. A second
engine line with inversion guidance 1 (the recommended setting) is an extra: its outputs differ by design.
The inversion cache is disabled so that the engine really inverts.

Measured per side, after one short warm-up of both: wall time (``time.perf_counter``, CUDA synchronised),
UNet evaluations (the denoiser's ``unet_evals``), the minimum the grid needs, images/s and UNet evaluations/s,
and peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per side); on the CPU the process's peak
resident set (Linux ``VmHWM``, reset per side through ``/proc/self/clear_refs``; where that is not allowed,
the RSS sampled every 5 ms with psutil), reported as the peak and as the growth over the RSS at the side's
start (model weights are resident before either side begins).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local or built; never wait for the hub

import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ddim_lab.config.compose import compose_config  # noqa: E402
from ddim_lab.config.validate import validate  # noqa: E402
from ddim_lab.data.folders import Item, load_dataset  # noqa: E402
from ddim_lab.engine.ddim import invert, sample  # noqa: E402
from ddim_lab.engine.denoiser import Conditioning  # noqa: E402
from ddim_lab.engine.schedule import Plan  # noqa: E402
from ddim_lab.methods.inversion import make_plan  # noqa: E402
from ddim_lab.methods.inversion.ddim import DDIMInversion  # noqa: E402
from ddim_lab.models.latent import LatentModel  # noqa: E402
from ddim_lab.models.loading import load_model  # noqa: E402
from ddim_lab.study.runner import GridPoint, Runner, grid_points  # noqa: E402

log = logging.getLogger("benchmark_grid")

DATA = {"digits": "digits", "tiny": "photos", "sd15-random": "photos"}
MIB = 1 << 20


@dataclass
class Side:
    """One measured way of computing the grid."""

    name: str
    seconds: float
    unet_evals: int
    minimum_evals: int
    outputs: int  # decoded images
    peak_memory_mib: float
    memory_growth_mib: float
    max_abs_diff: float | None = None  # largest |latent − seed-style latent| over all outputs
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.outputs / self.seconds

    @property
    def unet_evals_per_s(self) -> float:
        return self.unet_evals / self.seconds


# -- memory ----------------------------------------------------------------------------------------------


def _rss_field(name: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_field("VmHWM") is not None


@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Fill ``result`` with ``peak`` and ``growth`` (bytes) of the block, and ``how`` it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak=peak, growth=peak - start, how="torch.cuda.max_memory_allocated")
        return
    import psutil

    process = psutil.Process()
    start = process.memory_info().rss
    if _reset_peak_rss():
        yield
        peak = _rss_field("VmHWM")
        how = "peak RSS (VmHWM, reset via /proc/self/clear_refs)"
    else:
        samples, stop = [start], threading.Event()

        def poll() -> None:
            while not stop.wait(0.005):
                samples.append(process.memory_info().rss)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        peak = max(*samples, process.memory_info().rss)
        how = "peak RSS (psutil, sampled every 5 ms)"
    result.update(peak=peak, growth=peak - start, how=how)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, device: torch.device, run: Callable[[], tuple[torch.Tensor, int, int]]) -> tuple:
    """Run ``run() -> (latents, unet_evals, minimum)`` once; return its Side and latents."""
    memory: dict = {}
    with peak_memory(device, memory):
        _sync(device)
        start = time.perf_counter()
        latents, evals, minimum = run()
        _sync(device)
        seconds = time.perf_counter() - start
    side = Side(
        name=name,
        seconds=seconds,
        unet_evals=evals,
        minimum_evals=minimum,
        outputs=len(latents),
        peak_memory_mib=memory["peak"] / MIB,
        memory_growth_mib=memory["growth"] / MIB,
        extra={"memory": memory["how"]},
    )
    return side, latents


# -- the two ways --------------------------------------------------------------------------------------


def engine_config(
    args: argparse.Namespace,
    inversion_guidance: float,
    num_steps: int | None = None,
    starts: list[int] | None = None,
) -> DictConfig:
    """The engine's config, composed like the CLI composes it."""
    overrides = [
        f"model={args.model}",
        f"data={DATA[args.model]}",
        f"num_steps={num_steps or args.num_steps}",
        f"guidance_scale=[{','.join(str(g) for g in args.guidance)}]",
        f"start_step=[{','.join(str(k) for k in starts or args.starts)}]",
        f"inversion.guidance_scale={inversion_guidance}",
        f"runtime.device={args.device}",
        f"runtime.dtype={args.dtype}",
        "runtime.progress=false",
        "metrics.lpips=off",
        "cache.enabled=false",  # the engine must really invert; cache.dir still holds built models
        *([f"batch_size={args.batch_size}"] if args.batch_size else []),
        *args.set,
    ]
    cfg = compose_config(overrides)
    validate(cfg)
    return cfg


def decode_all(model: LatentModel, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """Decode in chunks (a 512 px VAE decode of the whole grid at once needs a lot of memory)."""
    return torch.cat([model.decode(part) for part in latents.split(chunk)])


def engine(cfg: DictConfig, model: LatentModel, items: list[Item]) -> tuple[torch.Tensor, int, int]:
    """The sweep engine: encode once, invert once per image, sample the grid batched, decode."""
    runner = Runner(cfg, model)
    x0 = model.encode(torch.stack([it.image for it in items]))  # (G, C, h, w)
    artifacts, _ = runner.artifacts(items, x0)
    latents = runner.sample_grid(items, artifacts)  # (G·P, C, h, w), image-major
    decode_all(model, latents, cfg.batch_size)
    return latents.cpu(), runner.denoiser.unet_evals, runner.minimum.forwards  # the engine's own accounting


def _embed(model: LatentModel, prompt: str, negative: str, guidance: float) -> Conditioning:
    """Prompt embeddings encoded afresh, as the seed's ``_encode_prompt`` did on every call."""
    text, null = model.pipe.encode_prompt(prompt, model.device, 1, True, negative_prompt=negative)
    return Conditioning(text=text.float(), null=null.float(), guidance=torch.tensor([guidance]))


def seed_loop(cfg: DictConfig, model: LatentModel, items: list[Item]) -> tuple[torch.Tensor, int, int]:
    """The seed-style loop: per image and grid point, encode, invert from scratch, sample, decode; batch 1."""
    scheduler = model.scheduler(**cfg.scheduler.overrides)
    plan = make_plan(cfg.inverter.name, scheduler, cfg.num_steps)
    denoiser = model.denoiser(scheduler)
    points = grid_points(cfg)
    inversion_guidance = float(cfg.inversion.guidance_scale)
    outputs = []
    for item in items:
        for p in points:
            x0 = model.encode(item.image[None])  # (1, C, h, w)
            source = _embed(model, item.prompt, cfg.negative_prompt, inversion_guidance)
            trajectory = invert(denoiser, x0, plan, source, batch_size=1)
            x = trajectory[plan.start_index[p.start_step]]
            target = _embed(model, p.target or item.prompt, cfg.negative_prompt, p.guidance)
            out = sample(denoiser, x, plan, target, start_step=p.start_step, batch_size=1)
            model.decode(out)
            outputs.append(out.cpu())
    return torch.cat(outputs), denoiser.unet_evals, grid_minimum(plan, points, len(items), inversion_guidance)


def grid_minimum(plan: Plan, points: list[GridPoint], images: int, inversion_guidance: float) -> int:
    """The fewest UNet evaluations the grid needs (DDIM's formula): one inversion per image, each trajectory
    once; the seed-style loop's yardstick (the engine counts its own, ``Runner.minimum``)."""
    ddim = DDIMInversion()
    inversion = ddim.inversion_cost(plan, {}, 1.0, inversion_guidance).forwards
    sampling = sum(
        ddim.sampling_cost(plan, p.start_step, p.guidance, p.target is not None).forwards for p in points
    )
    return images * (inversion + sampling)


# -- report --------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, core count and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def table(sides: list[Side], seed: Side) -> list[str]:
    """Markdown rows, one per side."""
    head = (
        "| side | wall s | × faster | UNet evals | evals ratio | minimum | evals − minimum | images/s "
        "| UNet evals/s | peak MiB | growth MiB | max abs diff |"
    )
    lines = [head, "|" + "---|" * 12]
    for s in sides:
        diff = "n/a" if s.max_abs_diff is None else f"{s.max_abs_diff:.3g}"
        lines.append(
            f"| {s.name} | {s.seconds:.2f} | {seed.seconds / s.seconds:.2f} | {s.unet_evals} "
            f"| {seed.unet_evals / s.unet_evals:.2f} | {s.minimum_evals} | {s.unet_evals - s.minimum_evals} "
            f"| {s.images_per_s:.3g} | {s.unet_evals_per_s:.4g} | {s.peak_memory_mib:.0f} "
            f"| {s.memory_growth_mib:.0f} | {diff} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(DATA), default="digits")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.5, 7.5])
    parser.add_argument("--starts", type=int, nargs="+", default=[0, 10, 20, 30])
    parser.add_argument("--inversion-guidance", type=float, default=3.5, help="both sides; 3.5 as in the seed")
    parser.add_argument("--batch-size", type=int, default=None, help="engine trajectories per UNet call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more Hydra overrides")
    parser.add_argument("--out", type=Path, default=None, help="write benchmark.json and benchmark.md here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import diffusers
    import transformers

    for lib in (diffusers, transformers):  # their loading bars and notices, not the lab's
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = engine_config(args, args.inversion_guidance)
    model = load_model(cfg.model, cfg.runtime, cfg.cache.dir)
    items = load_dataset(cfg.data.path, model.resolution, cfg.prompt)[: args.images]
    device = model.device
    P = len(args.guidance) * len(args.starts)
    log.info(
        "model %s (%s, %s) on %s; %d images × %d grid points, %d steps, inversion guidance %g, batch %d",
        cfg.model.name,
        args.dtype,
        cfg.runtime.attention,
        device_name(device),
        len(items),
        P,
        cfg.num_steps,
        args.inversion_guidance,
        cfg.batch_size,
    )

    # 1. warm-up: both sides once on one image, 3 steps from step 0 (kernels, allocator, lazy init)
    warm = engine_config(args, args.inversion_guidance, num_steps=3, starts=[0])
    t0 = time.perf_counter()
    engine(warm, model, items[:1])
    seed_loop(warm, model, items[:1])
    log.info("warm-up: %.1f s", time.perf_counter() - t0)

    # 2. the seed-style loop, then the engine with the same inversion guidance, then the recommended one
    seed, seed_latents = measure("seed-style loop", device, lambda: seed_loop(cfg, model, items))
    log.info("seed-style loop: %.2f s, %d UNet evaluations", seed.seconds, seed.unet_evals)
    eng, eng_latents = measure(
        f"engine (inversion guidance {args.inversion_guidance:g})", device, lambda: engine(cfg, model, items)
    )
    eng.max_abs_diff = float((eng_latents - seed_latents).abs().max())
    eng.extra["max_abs_latent"] = float(seed_latents.abs().max())
    log.info("engine: %.2f s, %d UNet evaluations", eng.seconds, eng.unet_evals)
    sides = [seed, eng]
    if args.inversion_guidance != 1:
        rec_cfg = engine_config(args, 1.0)
        rec, _ = measure(
            "extra: engine, inversion guidance 1 (recommended; outputs differ by design)",
            device,
            lambda: engine(rec_cfg, model, items),
        )
        sides.append(rec)

    # 3. report
    lines = table(sides, seed)
    summary = [
        f"wall-time ratio (seed-style / engine): {seed.seconds / eng.seconds:.2f}×",
        f"UNet-evaluation ratio (seed-style / engine): {seed.unet_evals / eng.unet_evals:.2f}×",
        f"engine evaluations vs the minimum: {eng.unet_evals} vs {eng.minimum_evals}"
        f" ({'equal' if eng.unet_evals == eng.minimum_evals else 'NOT equal'})",
        f"largest |engine − seed-style| over all output latents: {eng.max_abs_diff:.3g}"
        f" (latents up to {eng.extra['max_abs_latent']:.3g})",
        f"memory: {seed.extra['memory']}",
    ]
    log.info("\n%s\n\n%s", "\n".join(lines), "\n".join(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "device": device_name(device),
            "torch": torch.__version__,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "batch_size": cfg.batch_size,
            "num_steps": cfg.num_steps,
            "grid_points": P,
            "images": len(items),
            "sides": [
                {**asdict(s), "images_per_s": s.images_per_s, "unet_evals_per_s": s.unet_evals_per_s}
                for s in sides
            ],
            "wall_time_ratio": seed.seconds / eng.seconds,
            "unet_eval_ratio": seed.unet_evals / eng.unet_evals,
        }
        (args.out / "benchmark.json").write_text(json.dumps(record, indent=2))
        md = [f"# Grid benchmark: {args.model} on {device_name(device)}", "", *lines, "", *summary]
        (args.out / "benchmark.md").write_text("\n".join(f"- {s}" if s in summary else s for s in md) + "\n")
        log.info("wrote %s", args.out / "benchmark.json")


if __name__ == "__main__":
    main()
