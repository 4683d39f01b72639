"""The control-signal interface: images in [0, 1] (B, 3, R, R) → control images in [0, 1] (B, 3, R, R)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ControlUnavailable(RuntimeError):
    """A control signal cannot run here (missing annotator weights, missing control image); the message
    says what to provide and where."""


class ControlSignal(ABC):
    """One way of turning input images into ControlNet conditioning images."""

    name: str = ""

    @abstractmethod
    def __call__(self, images: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        """images (B, 3, R, R) in [0, 1] (``names``: their file names, for signals that look files up) →
        control images (B, 3, R, R) in [0, 1], float32 on the CPU."""

    def key(self) -> dict[str, Any]:
        """Everything that determines this signal's output (part of the inversion cache key)."""
        return {"name": self.name}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, R, R) in [0, 1] → (B, R, R, 3) uint8, rounded: what OpenCV and the annotators take."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, R, R), got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8).numpy()


def from_uint8(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(R, R) or (R, R, 3) uint8 arrays → (B, 3, R, R) float32 in [0, 1]; grey maps go to all 3 channels."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        out.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def save_control_images(folder: Path, names: Sequence[str], controls: torch.Tensor) -> list[Path]:
    """Save control images (B, 3, R, R) as PNGs under ``folder``, named after their inputs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in zip(names, to_uint8(controls), strict=True):
        path = folder / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths
