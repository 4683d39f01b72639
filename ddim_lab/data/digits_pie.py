"""The digits mini-benchmark in PIE-Bench format (``ddim_lab/assets/digits-pie``) and its edit-success judge.

Built by ``scripts/build_digits_pie.py`` from the first two held-out digits of each label (the 20 images of
``digits-heldout``), never seen by the digits model or the judge:

- images: ``annotation_images/<type>_<name>/digit<d>_<i>.png``, 64×64 RGB (``digits.to_rgb(scan, 64)``).
  The benchmark has its own resolution, 64 px, not PIE-Bench's 512: the loader takes the mask size from the
  image, and at the digits model's 16 px the images and masks are resized like any PIE-Bench image;
- prompts: ``"a handwritten digit [three]"`` → ``"a handwritten digit [eight]"``, ``blended_word``
  ``"three eight"``; every digit is edited into eight (the quickstart's edit) and eight into three;
- mask: the source digit's ink (> 0.25 at 64 px) dilated by 4 px (one pixel of the 16 px model), RLE over the
  flattened 64×64 image; the loader then sets its border to 1 as for PIE-Bench;
- categories: the first image of each digit is ``editing_type_id`` "1" (change object), the second "0"
  (random editing), so ``data.categories=[1]`` selects 10 images.

Edit success on digits is judged by the digit classifier (:mod:`ddim_lab.data.judge`), no CLIP needed:
:func:`edit_success`; :class:`DigitEditSuccess` is the benchmark's scorer (``conf/data/digits-pie.yaml``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddim_lab.data import digits
from ddim_lab.data.judge import Judge, train_judge
from ddim_lab.data.pie import IMAGE_DIR, MAPPING_FILE, PieItem, encode_mask
from ddim_lab.data.scoring import ScoreBatch, Scorer, ScoringContext

logger = logging.getLogger(__name__)

RESOLUTION = 64
INK_THRESHOLD = 0.25
DILATION = 4  # pixels at 64 px = one pixel of the 16 px digits model
PER_DIGIT = 2
TARGET = 8  # every digit becomes eight, and eight becomes three
TEMPLATE = "a handwritten digit {}"
TYPES = ("1", "0")  # by image index: change object, random editing


def target_label(label: int) -> int:
    """The digit each source digit is edited into."""
    return 3 if label == TARGET else TARGET


def digit_mask(gray: torch.Tensor) -> np.ndarray:
    """``(H, W)`` grayscale in [0, 1] → ``(H, W)`` uint8 {0, 1}: ink above the threshold, dilated."""
    ink = (gray > INK_THRESHOLD).float()[None, None]
    dilated = F.max_pool2d(ink, 2 * DILATION + 1, stride=1, padding=DILATION)
    return dilated[0, 0].to(torch.uint8).numpy()


def build(out_dir: str | Path) -> dict[str, dict]:
    """Write ``mapping_file.json`` and ``annotation_images/`` to ``out_dir``; returns the mapping."""
    out = Path(out_dir)
    images, labels = digits.split()["held_out"]
    mapping: dict[str, dict] = {}
    for label in range(len(digits.NAMES)):
        chosen = np.flatnonzero(labels == label)[:PER_DIGIT]
        rgb = digits.to_rgb(images[chosen], RESOLUTION)  # (n, 3, 64, 64) in [0, 1]
        for i, image in enumerate(rgb):
            kind = TYPES[i]
            source, target = digits.NAMES[label], digits.NAMES[target_label(label)]
            relative = f"{kind}_{'change_object' if kind == '1' else 'random'}/digit{label}_{i}.png"
            file = out / IMAGE_DIR / relative
            file.parent.mkdir(parents=True, exist_ok=True)
            pixels = (image.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(file, optimize=True)
            mapping[f"{kind}{label:02d}{i}"] = {
                "image_path": relative,
                "original_prompt": TEMPLATE.format(f"[{source}]"),
                "editing_prompt": TEMPLATE.format(f"[{target}]"),
                "editing_instruction": f"Change the digit {source} into {target}",
                "editing_type_id": kind,
                "blended_word": f"{source} {target}",
                "mask": encode_mask(digit_mask(image[0])),
            }
    lines = [f"{json.dumps(key)}: {json.dumps(entry)}" for key, entry in mapping.items()]
    (out / MAPPING_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    logger.info("wrote %d digits-pie entries to %s", len(mapping), out)
    return mapping


def target_digit(item: PieItem) -> int | None:
    """The target digit of a digits-pie item (from its blended words), None if it names no digit."""
    if item.blended_words is None or item.blended_words[1] not in digits.NAMES:
        return None
    return digits.NAMES.index(item.blended_words[1])


def edit_success(images: torch.Tensor, targets: Sequence[int | None], judge: Judge | None = None) -> np.ndarray:
    """Per row: does the digit classifier read the target digit in the edited image? ``images`` (B, 3, R, R)
    in [0, 1]; ``targets`` one digit (or None: not judged, NaN) per row. Returns float64 (B,): 1.0, 0.0, NaN.
    Pass a ``judge`` (``train_judge()``, about a second) to reuse it across calls."""
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    judge = judge or train_judge()
    predicted = judge.predict(images)
    return np.array(
        [np.nan if t is None else float(p == t) for p, t in zip(predicted, targets, strict=True)],
        dtype=np.float64,
    )


class DigitEditSuccess(Scorer):
    """``edit_success`` as the digits benchmark's scorer (``scorers: [digit_edit_success]``): on edit rows of
    annotated items whose blended words name a target digit, :func:`edit_success` by one judge per run (fitted
    on the first such batch); reconstruction rows get NaN."""

    name = "digit_edit_success"
    columns = ("edit_success",)

    def __init__(self, context: ScoringContext) -> None:
        super().__init__(context)
        self._judge: Judge | None = None

    def score(self, batch: ScoreBatch) -> dict[str, list[float]]:
        items = batch.items or []
        if batch.generated or not items or not all(isinstance(it, PieItem) for it in items):
            return {}
        targets = [target_digit(it) if edit else None for it, edit in zip(items, batch.edits, strict=True)]
        if all(t is None for t in targets):
            return {}
        if self._judge is None:
            self._judge = train_judge()
        return {"edit_success": edit_success(batch.results, targets, self._judge).tolist()}
