"""scikit-learn's handwritten digits (1,797 real 8×8 scans) as a captioned image set with a fixed split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {name}", "digit {name}", "the number {name}", "digit {k}")
WORDS = ("a", "handwritten", "digit", "the", "number", *NAMES)
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0  # the split is fixed forever: the shipped model never saw the held-out digits


def caption(label: int, template: int = 0) -> str:
    """Caption for a digit label; template 0 is the canonical one."""
    return TEMPLATES[template].format(name=NAMES[label], k=label)


def split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "held_out": (images, labels)}``; images (N, 8, 8) in [0, 1]."""
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, data.target, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    return {"train": (x_tr, y_tr), "held_out": (x_te, y_te)}


def to_rgb(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] → (N, 3, size, size) in [0, 1]: white ink on black, bilinear upsampling."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
