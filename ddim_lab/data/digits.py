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


def prompt_texts() -> list[str]:
    """The training prompt table: index 0 is the empty prompt, ``1 + label·T + template`` the captions."""
    return [""] + [caption(k, j) for k in range(len(NAMES)) for j in range(len(TEMPLATES))]


def sample_prompts(labels: torch.Tensor, dropout: float, gen: torch.Generator) -> torch.Tensor:
    """Indices into ``prompt_texts()`` for a batch of labels: a uniform template each, and the empty prompt
    (index 0) with probability ``dropout``, for classifier-free guidance."""
    template = torch.randint(len(TEMPLATES), (len(labels),), generator=gen)
    prompt = 1 + labels * len(TEMPLATES) + template
    prompt[torch.rand(len(labels), generator=gen) < dropout] = 0
    return prompt


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


def held_out_subset(n: int, seed: int, label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out scans: stratified over the ten digits (or all of digit ``label``), seeded order."""
    images, labels = split()["held_out"]
    rng = np.random.default_rng(seed)
    classes = range(len(NAMES)) if label is None else [label]
    per_class = [rng.permutation(np.flatnonzero(labels == k)) for k in classes]
    order = [idx[r] for r in range(max(map(len, per_class))) for idx in per_class if r < len(idx)]
    chosen = np.array(order[:n])
    return images[chosen], labels[chosen]
