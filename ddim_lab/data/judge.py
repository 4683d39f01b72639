"""A digit classifier that judges the digits model's images: logistic regression on the 8×8 training scans.

It is fitted on ``digits.split()["train"]`` only (the split the model was trained on), so held-out digits are
new to both. Model images (B, 3, 16, 16) in [0, 1] are brought back to the classifier's domain by averaging
the channels and area-downsampling to 8×8, the inverse of ``digits.to_rgb`` up to its bilinear blur.

:class:`JudgeAgreement` scores generated rows for the digits data sets (``scorers: [digit_judge_agreement]``):
does the judge read the digit each prompt names?
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from ddim_lab.data import digits
from ddim_lab.data.scoring import ScoreBatch, Scorer, ScoringContext

SCAN_SIZE = 8
# models trained on the digits captions: the judge applies
JUDGED_SOURCES = ("digits", "digits-flow", "digits-lcm")


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


def prompt_digit(prompt: str) -> int | None:
    """The digit a digits caption names (any of ``digits.TEMPLATES``: "a handwritten digit three", "digit 3"),
    None when it names none or several."""
    words = re.findall(r"[a-z]+|\d+", prompt.lower())
    named = {digits.NAMES.index(w) for w in words if w in digits.NAMES}
    named |= {int(w) for w in words if w.isdigit() and int(w) < len(digits.NAMES)}
    return named.pop() if len(named) == 1 else None


class JudgeAgreement(Scorer):
    """``judge_agreement`` of generated rows on the digits models (``model.source`` in :data:`JUDGED_SOURCES`):
    1.0 when the judge reads the digit the row's prompt names, 0.0 when not, NaN for a prompt naming none; no
    column when no prompt names a digit. The judge is fitted once per scorer, on the first judged batch."""

    name = "digit_judge_agreement"
    columns = ("judge_agreement",)

    def __init__(self, context: ScoringContext) -> None:
        super().__init__(context)
        self._judge: Judge | None = None

    def score(self, batch: ScoreBatch) -> dict[str, list[float]]:
        if not batch.generated or self.context.model_source not in JUDGED_SOURCES:
            return {}
        targets = [prompt_digit(p) for p in batch.prompts]
        if all(t is None for t in targets):
            return {}
        if self._judge is None:
            self._judge = train_judge()
        read = self._judge.predict(batch.results)
        return {
            "judge_agreement": [
                math.nan if t is None else float(r == t) for r, t in zip(read, targets, strict=True)
            ]
        }
