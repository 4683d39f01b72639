"""The evaluation protocol: everything that must match for two numbers to be comparable, and its short id.

Every result row carries ``protocol`` (:meth:`Protocol.id`); ``run.json`` carries :meth:`Protocol.fields`.
Rows with different ids must not be averaged together. The id is the first 12 hex digits of the sha256 of
the fields as canonical JSON (sorted keys, no whitespace), so it is the same in every process and on every
machine (no Python ``hash``), and any change of any field changes it. Adding a field changes every id: that
is intended, since the old ids did not pin it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

ID_LENGTH = 12
MASK_USES = ("score-only", "input")  # masks only weight the metrics, or are also given to the editor


def ids_digest(image_ids: Iterable[str]) -> str:
    """sha256 hex of the sorted, de-duplicated image ids joined by newlines: the image subset, order-free."""
    unique = sorted({str(i) for i in image_ids})
    return hashlib.sha256("\n".join(unique).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Protocol:
    """Fields that make numbers comparable. Defaults are PIE-Bench's reference evaluation (PnPInversion)."""

    benchmark: str  # e.g. "pie-bench", "digits-pie", "folder"
    image_ids: str  # ids_digest() of the evaluated image ids
    image_count: int
    resolution: int  # pixels per side at which images are edited and scored
    bracket_rule: str = "strip"  # "[" "]" removed from prompts before use
    mask_border: str = "one-pixel border set to 1"
    mask_use: str = "score-only"  # one of MASK_USES
    region_masking: str = "multiply both images by the region, metric on the full frame"
    nan_rule: str = "empty region -> NaN, counted and excluded from means"
    lpips_net: str = "squeeze"
    lpips_input_range: str = "[0, 1], normalize=True"  # = the reference's x*2-1 into [-1, 1]
    ssim: str = "gaussian 11x11 sigma 1.5, valid window (border dropped)"
    clip_model: str = "openai/clip-vit-large-patch14"
    structure_model: str = "facebook/dino-vitb8"

    def __post_init__(self) -> None:
        if self.mask_use not in MASK_USES:
            raise ValueError(f"mask_use must be one of {MASK_USES}, got {self.mask_use!r}")
        if self.image_count < 0 or self.resolution < 1:
            raise ValueError(f"bad image_count {self.image_count} or resolution {self.resolution}")

    @classmethod
    def for_images(cls, image_ids: Iterable[str], **kwargs: Any) -> Protocol:
        """A protocol for these image ids (``image_ids`` and ``image_count`` filled in); ``kwargs`` set the
        other fields (``benchmark`` and ``resolution`` are required)."""
        ids = [str(i) for i in image_ids]
        return cls(image_ids=ids_digest(ids), image_count=len(set(ids)), **kwargs)

    def canonical(self) -> str:
        """The fields as canonical JSON (sorted keys, compact): what the id hashes."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def id(self) -> str:
        """Short stable id: the first 12 hex digits of sha256(:meth:`canonical`)."""
        return hashlib.sha256(self.canonical().encode("ascii")).hexdigest()[:ID_LENGTH]

    def fields(self) -> dict[str, Any]:
        """For ``run.json``: ``{"protocol": id, **every field}``."""
        return {"protocol": self.id(), **asdict(self)}

    @staticmethod
    def field_names() -> list[str]:
        """Names of the fields that enter the id."""
        return [f.name for f in fields(Protocol)]
