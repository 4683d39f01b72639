"""PIE-Bench data (Ju et al. 2023, "Direct Inversion"): editing prompts, blended words and edit masks.

Layout: ``DIR/mapping_file.json`` and ``DIR/annotation_images/<image_path>``. The JSON maps an image id to an
entry with ``image_path``, ``original_prompt``, ``editing_prompt``, ``editing_instruction``,
``editing_type_id`` ("0"–"9"), ``blended_word`` ("source target" or "") and ``mask``.

Rules, as in the reference evaluation (cure-lab/PnPInversion, ``evaluation/evaluate.py``):

- ``[`` and ``]`` are removed from both prompts (they mark the edited words);
- ``mask`` is run-length pairs ``[start, length, start, length, …]`` over the row-major flattened mask; a run
  that overshoots the end is clipped; the edit region is 1; the mask's one-pixel border is then set to 1
  ("to avoid annotation errors in boundary").

Mask size: an entry may give ``mask_shape: [H, W]``; otherwise the mask has the annotation image's stored
pixel size (PIE-Bench: 512×512; the shipped digits mini-benchmark: 64×64). The border rule applies at that
size. The mask then goes through the same geometry as the image (EXIF orientation, shorter side resized to
the model resolution R, centre square cropped; Lanczos, then thresholded at 0.5), so mask and image pixels
stay aligned. A border
band thinner than half a pixel at R disappears in that step.

The image itself follows :mod:`ddim_lab.data.folders`'s policy (EXIF, colour conversion, resize and crop), so
``content_hash`` is the same as for the file loaded with :func:`ddim_lab.data.folders.load_dataset`.

Entries that are missing fields, malformed, or whose image cannot be read are logged with their id as a
warning and skipped; loading goes on. A folder without ``mapping_file.json`` or with no usable entry raises
:class:`~ddim_lab.data.folders.DataError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_lab.data.folders import (
    DECODE_ERRORS,
    DataError,
    Item,
    UnreadableImageError,
    _resize_center_crop,
    content_hash,
    load_pixels,
    pixels_to_tensor,
)

logger = logging.getLogger(__name__)

MAPPING_FILE = "mapping_file.json"
ORIENTATION_TAG = 0x0112
IMAGE_DIR = "annotation_images"
EDITING_TYPES = {
    "0": "random editing",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute content",
    "5": "change attribute pose",
    "6": "change attribute color",
    "7": "change attribute material",
    "8": "change background",
    "9": "change style",
}
REQUIRED_FIELDS = (
    "image_path",
    "original_prompt",
    "editing_prompt",
    "editing_instruction",
    "editing_type_id",
    "blended_word",
    "mask",
)


class MalformedEntry(DataError):
    """One mapping-file entry cannot be used; the message says why."""


@dataclass(frozen=True)
class PieItem(Item):
    """A :class:`~ddim_lab.data.folders.Item` (``name`` = image id, ``prompt`` = source prompt without
    brackets) with the edit annotation. It works wherever an ``Item`` does."""

    target_prompt: str  # editing_prompt without brackets
    instruction: str
    editing_type: str  # "0"–"9", see EDITING_TYPES
    blended_words: tuple[str, str] | None  # (source word, target word), None when blended_word is ""
    mask: torch.Tensor  # (1, R, R) float32 in {0, 1}, 1 = edit region, aligned with ``image``
    mask_shape: tuple[int, int]  # (H, W) of the run-length mask in the file


def strip_brackets(prompt: str) -> str:
    """Remove the ``[`` ``]`` edit markers, as the reference evaluation does (nothing else changes)."""
    return prompt.replace("[", "").replace("]", "")


def decode_mask(runs: Sequence[int], shape: tuple[int, int], border: bool = True) -> np.ndarray:
    """Run-length pairs over the row-major flattened mask → ``(H, W)`` uint8 in {0, 1}.

    A run longer than what is left is clipped (as the reference does); a start outside the mask, a negative
    length or an odd number of values raises :class:`MalformedEntry`. ``border=True`` sets the one-pixel
    border to 1 (the reference's rule).
    """
    height, width = shape
    size = height * width
    values = list(runs)
    if len(values) % 2:
        raise MalformedEntry(f"mask has an odd number of values ({len(values)}); expected start/length pairs")
    flat = np.zeros(size, dtype=np.uint8)
    for i in range(0, len(values), 2):
        start, length = values[i], values[i + 1]
        if isinstance(start, bool) or isinstance(length, bool):
            raise MalformedEntry(f"mask run {i // 2} is not a pair of integers: {start!r}, {length!r}")
        if not (isinstance(start, int) and isinstance(length, int)):
            raise MalformedEntry(f"mask run {i // 2} is not a pair of integers: {start!r}, {length!r}")
        if not 0 <= start < size or length < 0:
            raise MalformedEntry(f"mask run {i // 2} ({start}, {length}) lies outside a {height}×{width} mask")
        flat[start : start + length] = 1
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = 1
        mask[:, 0] = mask[:, -1] = 1
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """``(H, W)`` {0, 1} mask → run-length pairs over the row-major flattened mask (inverse of decoding
    without the border rule)."""
    flat = np.concatenate([[0], np.asarray(mask, dtype=np.uint8).reshape(-1) != 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts, strict=True) for v in pair]


# EXIF orientation → the transpose that ImageOps.exif_transpose applies to the image
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def resize_mask(mask: np.ndarray, resolution: int, orientation: int = 1) -> torch.Tensor:
    """``(H, W)`` {0, 1} mask → ``(1, R, R)`` float32 {0, 1} with the image policy's EXIF transpose (of the
    image's ``orientation`` tag), resize and centre crop."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
    if orientation in EXIF_TRANSPOSE:
        img = img.transpose(EXIF_TRANSPOSE[orientation])
    resized = np.asarray(_resize_center_crop(img, resolution), dtype=np.uint8)
    return torch.from_numpy((resized >= 128).astype(np.float32))[None]


def _parse_blended(value: str) -> tuple[str, str] | None:
    words = value.split()
    if not words:
        return None
    if len(words) != 2:
        raise MalformedEntry(f"blended_word must be 'source target' or empty, got {value!r}")
    return words[0], words[1]


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry[key]
    if not isinstance(value, str):
        raise MalformedEntry(f"{key} must be a string, got {type(value).__name__}")
    return value


def parse_entry(image_id: str, entry: Any, root: Path, resolution: int) -> PieItem:
    """One mapping-file entry → :class:`PieItem`; raises :class:`MalformedEntry` or
    :class:`~ddim_lab.data.folders.UnreadableImageError` (both name the problem)."""
    if not isinstance(entry, dict):
        raise MalformedEntry(f"entry is a {type(entry).__name__}, not an object")
    missing = [key for key in REQUIRED_FIELDS if key not in entry]
    if missing:
        raise MalformedEntry(f"missing field(s) {missing}")
    editing_type = str(entry["editing_type_id"])
    if editing_type not in EDITING_TYPES:
        raise MalformedEntry(f"editing_type_id {editing_type!r} is not one of 0–9")
    if not isinstance(entry["mask"], list):
        raise MalformedEntry("mask must be a list of run-length pairs")
    path = root / IMAGE_DIR / _text(entry, "image_path")
    if not path.is_file():
        raise MalformedEntry(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size  # stored pixels, before EXIF orientation (the reference ignores EXIF)
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
    except DECODE_ERRORS as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err
    shape = entry.get("mask_shape", [height, width])
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 2 for v in shape)):
        raise MalformedEntry(f"mask_shape must be [H, W] with H, W > 2, got {shape!r}")
    mask = decode_mask(entry["mask"], (shape[0], shape[1]))
    pixels = load_pixels(path, resolution)
    return PieItem(
        name=str(image_id),
        path=path,
        image=pixels_to_tensor(pixels),
        prompt=strip_brackets(_text(entry, "original_prompt")),
        content_hash=content_hash(pixels),
        target_prompt=strip_brackets(_text(entry, "editing_prompt")),
        instruction=_text(entry, "editing_instruction"),
        editing_type=editing_type,
        blended_words=_parse_blended(_text(entry, "blended_word")),
        mask=resize_mask(mask, resolution, orientation),
        mask_shape=(shape[0], shape[1]),
    )


def normalise_categories(categories: Iterable[int | str] | None) -> set[str] | None:
    """``[1, "9"]`` → ``{"1", "9"}``; ``None`` (or empty) means every editing type."""
    if categories is None:
        return None
    chosen = {str(c).strip() for c in categories}
    if not chosen:
        return None
    unknown = sorted(chosen - set(EDITING_TYPES))
    if unknown:
        raise DataError(f"unknown PIE-Bench editing type(s) {unknown}; choose from 0–9 ({EDITING_TYPES})")
    return chosen


def is_pie_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PIE-Bench-format folder (it holds ``mapping_file.json``): the engine's dispatch."""
    return (Path(path) / MAPPING_FILE).is_file()


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The parsed ``mapping_file.json`` of a PIE-Bench folder (an object keyed by image id)."""
    file = Path(path) / MAPPING_FILE
    if not file.is_file():
        raise DataError(
            f"{path} is not a PIE-Bench folder: no {MAPPING_FILE} (expected DIR/{MAPPING_FILE} "
            f"and DIR/{IMAGE_DIR}/<image_path>)"
        )
    try:
        mapping = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(mapping, dict):
        raise DataError(f"{file} must hold an object keyed by image id, got {type(mapping).__name__}")
    return mapping


def load_pie_checked(
    path: str | Path, resolution: int, categories: Iterable[int | str] | None = None
) -> tuple[list[PieItem], dict[str, str]]:
    """:func:`load_pie` that also returns the skipped entries, ``{image id: reason}`` (for ``run.json``)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset path does not exist: {root}")
    chosen = normalise_categories(categories)
    items: list[PieItem] = []
    skipped: dict[str, str] = {}
    for image_id, entry in read_mapping(root).items():
        if chosen is not None and isinstance(entry, dict) and str(entry.get("editing_type_id")) not in chosen:
            continue
        try:
            items.append(parse_entry(image_id, entry, root, resolution))
        except (DataError, OSError) as err:
            skipped[image_id] = str(err)
            logger.warning("PIE-Bench entry %s skipped: %s", image_id, err)
    if skipped:
        plural = "y" if len(skipped) == 1 else "ies"
        logger.warning("%d PIE-Bench entr%s skipped: %s", len(skipped), plural, ", ".join(skipped))
    if not items:
        which = f" of editing type(s) {sorted(chosen)}" if chosen else ""
        raise DataError(f"no usable PIE-Bench entries{which} in {root}")
    logger.info("loaded %d PIE-Bench item(s) from %s at %dx%d", len(items), root, resolution, resolution)
    return items, skipped


def load_pie(path: str | Path, resolution: int, categories: Iterable[int | str] | None = None) -> list[PieItem]:
    """Load a PIE-Bench-format folder as :class:`PieItem` s in mapping-file order, keeping the editing types
    in ``categories`` (None: all). Bad entries are logged by id and skipped (see the module docstring)."""
    return load_pie_checked(path, resolution, categories)[0]
