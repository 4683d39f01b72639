"""Image loading: one preprocessing policy for every image the lab reads.

Policy, applied to each file in this order:

1. The file is decoded with Pillow (first frame only for animated/multi-page files) and
   ``ImageOps.exif_transpose`` applies its EXIF orientation, so pixels are as a viewer shows them.
2. Colour conversion to 8-bit RGB:

   - anything with transparency (RGBA, LA, palette or RGB/L images with a transparent colour) is
     composited over a white background;
   - 16-bit grayscale (``I;16*``) is scaled to 8 bit by its full range, 65535 → 255 (no per-image
     contrast stretching); ``I`` (32-bit integer, what Pillow gives for some 16-bit files) is treated as
     16-bit data, clipped to [0, 65535] and scaled the same way; ``F`` (float) is taken as [0, 1] and clipped;
   - grayscale is replicated to three channels;
   - every other mode (CMYK, YCbCr, LAB, HSV, bilevel …) goes through Pillow's ``convert("RGB")``.
     ICC profiles are ignored (no colour management).
3. The shorter side is resized to the model resolution ``R`` with Lanczos and the centre ``R × R`` square is
   cropped (odd margins put the extra pixel on the right/bottom).
4. The result is a ``(3, R, R)`` float32 tensor in [0, 1] (``uint8 / 255``). ``Item.content_hash`` is the
   sha256 of ``"uint8 {R}x{R}x3\n"`` followed by the preprocessed ``(R, R, 3)`` uint8 bytes: it depends on the
   pixels the model sees and on R, not on the file name, format or prompt.

Datasets: a path is an image file or a folder searched recursively for files ending in
:data:`IMAGE_SUFFIXES` (any case; hidden files and folders are skipped), sorted by relative path. Prompts come
from ``captions.csv`` (columns ``image``, ``prompt``) or ``captions.jsonl`` (objects with ``image``,
``prompt``) in the folder (for a single file: in its parent folder); ``image`` is the path relative to that
folder or the bare file name, the relative path winning when both match. Images without a caption get the
default prompt; an empty prompt in the file is kept as given. A dataset without any caption, or loaded with
``captions=False`` (``data.captions=false``: caption files ignored), gives every image the default prompt and
says so once. Having both caption files in one folder is an error. An unreadable image in a folder is logged
as a warning and skipped; a missing path raises ``FileNotFoundError``; a folder with no readable image, or
an unreadable single file, raises ``ValueError``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ddim_lab.data import digits

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTIONS_CSV = "captions.csv"
CAPTIONS_JSONL = "captions.jsonl"
WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MAX = 65535
# Exceptions Pillow raises for unreadable or corrupt files (SyntaxError for some malformed headers).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """A dataset path, captions file or image cannot be used; the message names it."""


class UnreadableImageError(DataError):
    """An image file exists but cannot be decoded."""


@dataclass(frozen=True)
class Item:
    """One preprocessed image with its prompt."""

    name: str  # path relative to the dataset root (or the file name for a single file)
    path: Path
    image: torch.Tensor  # (3, R, R) float32 in [0, 1]
    prompt: str
    content_hash: str  # sha256 of the preprocessed uint8 pixels and R


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB following the module policy."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0
        else:
            values = np.clip(values, 0, SIXTEEN_BIT_MAX) * (255.0 / SIXTEEN_BIT_MAX)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


LONG_SIDE_FACTOR = 2  # beyond (long side resized) > 2 R, only the part that lands in the square is resampled


def _resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (Lanczos) and crop the centre square.

    For a very elongated image (resized long side above ``LONG_SIDE_FACTOR`` × R) only the source region
    that ends up in the square is resampled (Pillow's ``resize(box=...)``, as ``ImageOps.fit`` does), with
    the same sample positions and filter, so the cost does not grow with the discarded part (a 3000 × 2 px
    strip at 512 px would otherwise be resized to 768000 × 512 first). Other images are resized whole, then
    cropped, bit for bit as before.
    """
    width, height = img.size
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    if max(new_w, new_h) > LONG_SIDE_FACTOR * resolution:
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    return img.crop((left, top, left + resolution, top + resolution))


def load_pixels(path: Path, resolution: int) -> np.ndarray:
    """Decode and preprocess an image file to ``(R, R, 3)`` uint8 pixels (see the module policy)."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except DECODE_ERRORS as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err
    return np.asarray(_resize_center_crop(rgb, resolution), dtype=np.uint8).copy()


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(R, R, 3)`` uint8 → ``(3, R, R)`` float32 in [0, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0).contiguous()


def content_hash(pixels: np.ndarray) -> str:
    """sha256 hex of preprocessed ``(R, R, 3)`` uint8 pixels, with R and the layout in the digest."""
    resolution = pixels.shape[0]
    digest = hashlib.sha256(f"uint8 {resolution}x{resolution}x3\n".encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Load one image as a ``(3, R, R)`` float32 tensor in [0, 1]; raises if the file is unreadable."""
    return pixels_to_tensor(load_pixels(path, resolution))


def _read_captions_csv(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "prompt"} <= set(reader.fieldnames):
            raise DataError(f"{path} must have the columns 'image' and 'prompt', got {reader.fieldnames}")
        return {row["image"].strip(): row["prompt"] or "" for row in reader if row["image"]}


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    captions = {}
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or "image" not in record or "prompt" not in record:
                raise DataError(f"{path}:{number}: expected an object with 'image' and 'prompt'")
            captions[str(record["image"]).strip()] = str(record["prompt"])
    return captions


def read_captions(folder: Path) -> dict[str, str]:
    """Captions from ``captions.csv`` or ``captions.jsonl`` in ``folder`` (empty if neither exists)."""
    csv_path, jsonl_path = folder / CAPTIONS_CSV, folder / CAPTIONS_JSONL
    if csv_path.is_file() and jsonl_path.is_file():
        raise DataError(f"{folder} has both {CAPTIONS_CSV} and {CAPTIONS_JSONL}; keep one")
    if csv_path.is_file():
        return _read_captions_csv(csv_path)
    if jsonl_path.is_file():
        return _read_captions_jsonl(jsonl_path)
    return {}


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, no hidden entries), sorted by relative path."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def with_prompt(items: Sequence[Item], prompt: str, source: str | Path) -> list[Item]:
    """``items`` with ``prompt`` as every source prompt (``data.captions=false``), said once."""
    _say_captions_off(source, prompt, len(items))
    return [replace(item, prompt=prompt) for item in items]


def _say_captions_off(path: str | Path, prompt: str, count: int) -> None:
    logger.info("data.captions=false: using prompt=%r for all %d images of %s", prompt, count, path)


def _say_uncaptioned(path: Path, prompt: str, count: int) -> None:
    """Say once that no image of ``path`` has a caption: a warning when they all get an empty prompt."""
    level = logging.WARNING if not prompt else logging.INFO
    logger.log(
        level,
        "data.path=%s has no captions (no %s or %s): using prompt=%r for all %d images",
        path,
        CAPTIONS_CSV,
        CAPTIONS_JSONL,
        prompt,
        count,
    )


def load_dataset(path: str | Path, resolution: int, default_prompt: str, captions: bool = True) -> list[Item]:
    """Load an image file or a folder of images as captioned :class:`Item` s (see the module policy);
    ``captions=False`` ignores caption files: every image gets ``default_prompt``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if path.is_dir():
        root, files = path, find_images(path)
    else:
        root, files = path.parent, [path]
    found = read_captions(root) if captions else {}
    items, used, uncaptioned = [], set(), 0
    for file in files:
        name = file.relative_to(root).as_posix()
        try:
            pixels = load_pixels(file, resolution)
        except UnreadableImageError as err:
            if not path.is_dir():
                raise
            logger.warning("skipping unreadable image %s: %s", file, err.__cause__)
            continue
        key = name if name in found else file.name
        used.add(key)
        uncaptioned += key not in found
        prompt = found.get(key, default_prompt)
        items.append(Item(name, file, pixels_to_tensor(pixels), prompt, content_hash(pixels)))
    if not items:
        raise DataError(f"no readable images in {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
    if not captions:
        _say_captions_off(path, default_prompt, len(items))
    elif not found:
        _say_uncaptioned(path, default_prompt, len(items))
    elif uncaptioned:
        logger.info("%d image(s) in %s have no caption: they get prompt=%r", uncaptioned, root, default_prompt)
    unused = sorted(set(found) - used)
    if path.is_dir() and unused:
        logger.warning("%d caption(s) in %s match no loaded image, e.g. %s", len(unused), root, unused[:3])
    logger.info("loaded %d image(s) from %s at %dx%d", len(items), path, resolution, resolution)
    return items


def export_digits(out_dir: Path, count_per_digit: int, resolution: int) -> None:
    """Write the first ``count_per_digit`` held-out digits of each label as PNGs plus ``captions.csv``."""
    images, labels = digits.split()["held_out"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in range(len(digits.NAMES)):
        chosen = np.flatnonzero(labels == label)[:count_per_digit]
        if len(chosen) < count_per_digit:
            raise ValueError(f"only {len(chosen)} held-out examples of digit {label}")
        rgb = digits.to_rgb(images[chosen], resolution)  # (n, 3, R, R) in [0, 1]
        pixels = (rgb.permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8).numpy()
        for i, array in enumerate(pixels):
            file_name = f"digit{label}_{i}.png"
            Image.fromarray(array).save(out_dir / file_name)
            rows.append((file_name, digits.caption(label)))
    with (out_dir / CAPTIONS_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "prompt"])
        writer.writerows(rows)
    logger.info("wrote %d held-out digits to %s", len(rows), out_dir)
