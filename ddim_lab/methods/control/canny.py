"""Canny edges with OpenCV, as in the course chapter: ``cv2.Canny(image, 100, 200)``, grey map to RGB."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import torch

from ddim_lab.methods.control.base import ControlSignal, from_uint8, to_uint8


class Canny(ControlSignal):
    """White edges on black, one pixel wide, at the input's resolution."""

    name = "canny"

    def __init__(self, low_threshold: int = 100, high_threshold: int = 200) -> None:
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(f"canny thresholds need 0 <= low <= high, got {low_threshold}, {high_threshold}")
        self.low_threshold = int(low_threshold)
        self.high_threshold = int(high_threshold)

    def __call__(self, images: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        edges = [cv2.Canny(a, self.low_threshold, self.high_threshold) for a in to_uint8(images)]
        return from_uint8(edges)

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "low_threshold": self.low_threshold, "high_threshold": self.high_threshold}
