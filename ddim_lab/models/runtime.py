"""The runtime settings a model loads with: its dtype, its device, and the GPU knobs (attention backend,
channels_last, torch.compile, model CPU offload)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def apply_knobs(pipe: Any, runtime: Mapping[str, Any], device: torch.device, network: str = "unet") -> None:
    """GPU knobs: attention backend, channels_last, torch.compile of the ``network`` (``unet`` or
    ``transformer``), model CPU offload."""
    attention = runtime.get("attention", "sdpa")
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()  # raises clearly when xformers is not installed
    elif attention != "sdpa":
        raise ValueError(f"runtime.attention must be sdpa or xformers, got {attention!r}")
    if runtime.get("channels_last", False):
        getattr(pipe, network).to(memory_format=torch.channels_last)
    if runtime.get("cpu_offload", False):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if runtime.get("compile", False):
        setattr(pipe, network, torch.compile(getattr(pipe, network)))
