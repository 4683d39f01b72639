"""What a run needs to be reproduced: library versions, device, dtype, Python and the project's git revision."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("torch", "diffusers", "transformers", "hydra-core", "accelerate", "torchmetrics", "numpy")
UNKNOWN = "unknown"


def library_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``unknown``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def git_revision(root: Path = PROJECT_ROOT) -> str:
    """The commit of the project checkout (``+dirty`` with uncommitted changes), or ``unknown`` when the
    package is not in a git checkout (a wheel install) or git is missing."""
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{rev}+dirty" if dirty else rev


def provenance(device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Versions (torch, diffusers, transformers, hydra, …), device, dtype, Python and git revision."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "ddim_lab": library_version("ddim_lab"),
            **{("hydra" if n == "hydra-core" else n): library_version(n) for n in LIBRARIES},
        },
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device or ("cuda" if cuda else "cpu"),
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if cuda else None,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "git_revision": git_revision(),
    }
