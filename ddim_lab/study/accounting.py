"""What a run spends: network passes counted by the denoiser, the minimum the methods' formulas say they cost,
time and memory. The stages add to one :class:`Tally`; the summary reads it."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from ddim_lab.methods.inversion.base import Cost


def _counters() -> dict[str, int]:
    """The run's counters, in the order ``run.json`` lists them."""
    return {
        "inversion": 0,
        "inversion_backwards": 0,
        "sampling": 0,
        "inversions_computed": 0,
        "inversions_cached": 0,
        "pivots_computed": 0,
    }


@dataclass
class Tally:
    """Network passes spent so far (``evals``), what that work must cost by the methods' formulas
    (``minimum``), and when the run started."""

    evals: dict[str, int] = field(default_factory=_counters)
    minimum: Cost = field(default_factory=Cost)
    started: float = field(default_factory=time.perf_counter)


def cost_guidance(denoiser: object, guidance: float) -> float:
    """The guidance the cost formulas see: a model with embedded guidance (FLUX.1-dev) takes the scale as an
    input and spends one pass per row at any guidance, as classifier-free guidance does at 1."""
    return 1.0 if getattr(denoiser, "guidance", "cfg") == "embedded" else float(guidance)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
