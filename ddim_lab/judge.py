"""A digit classifier that judges the digits model's images: logistic regression on the 8×8 training scans.

It is fitted on ``digits.split()["train"]`` only (the split the model was trained on), so held-out digits are
new to both. Model images (B, 3, 16, 16) in [0, 1] are brought back to the classifier's domain by averaging
the channels and area-downsampling to 8×8, the inverse of ``digits.to_rgb`` up to its bilinear blur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from ddim_lab import digits

SCAN_SIZE = 8


def to_scan(images: torch.Tensor) -> np.ndarray:
    """(B, 3, R, R) RGB in [0, 1] → (B, 8, 8) grayscale in [0, 1]: channel mean, then area downsampling."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
    gray = images.detach().float().cpu().mean(dim=1, keepdim=True)  # (B, 1, R, R)
    return F.adaptive_avg_pool2d(gray, SCAN_SIZE)[:, 0].clamp(0, 1).numpy()


@dataclass
class Judge:
    """The fitted classifier; ``predict`` takes model-resolution RGB images, ``predict_scans`` 8×8 scans."""

    classifier: LogisticRegression

    def predict_scans(self, scans: np.ndarray) -> np.ndarray:
        """(B, 8, 8) in [0, 1] → (B,) labels."""
        return self.classifier.predict(np.asarray(scans, dtype=np.float32).reshape(len(scans), -1))

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, R, R) in [0, 1] → (B,) labels."""
        return self.predict_scans(to_scan(images))

    def accuracy(self, images: torch.Tensor, labels: np.ndarray | torch.Tensor | list[int]) -> float:
        """Fraction of images classified as their label."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def train_judge(seed: int = 0) -> Judge:
    """Fit logistic regression on the flattened 8×8 training scans (under a second on one core)."""
    images, labels = digits.split()["train"]
    classifier = LogisticRegression(max_iter=5000, random_state=seed)
    classifier.fit(images.reshape(len(images), -1), labels)
    return Judge(classifier)


def held_out_accuracies(judge: Judge, size: int = 16) -> dict[str, float]:
    """Held-out accuracy on the raw 8×8 scans and on the same scans round-tripped through ``to_rgb(size)``."""
    images, labels = digits.split()["held_out"]
    return {
        "scans_8x8": float(np.mean(judge.predict_scans(images) == labels)),
        f"rgb_{size}x{size}_round_trip": judge.accuracy(digits.to_rgb(images, size), labels),
    }
