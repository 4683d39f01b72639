"""Ready-made control images: one file for every input, or a folder matched to the inputs by file name."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddim_lab.data.folders import IMAGE_SUFFIXES, find_images, load_image
from ddim_lab.methods.control.base import ControlSignal, ControlUnavailable


class ImageControl(ControlSignal):
    """``path``: an image file (used for every row) or a folder; a folder's file for input ``a/b.png`` is
    ``a/b.png`` or any ``a/b.*``/``b.*`` image in it. Control images get the lab's resize/centre-crop policy."""

    name = "image"

    def __init__(self, path: str | None = None) -> None:
        if not path:
            raise ControlUnavailable("control=image needs control.path=FILE_OR_FOLDER (the control image(s))")
        self.path = Path(path)
        if not self.path.exists():
            raise ControlUnavailable(f"control.path={path!r} does not exist")

    def file_for(self, name: str | None) -> Path:
        """The control image for input ``name`` (its path relative to data.path)."""
        if self.path.is_file():
            return self.path
        if name is None:
            raise ControlUnavailable(f"control.path={self.path} is a folder: the inputs need file names")
        stem = Path(name).with_suffix("")
        candidates = [self.path / name, *(self.path / stem.with_suffix(s) for s in IMAGE_SUFFIXES)]
        candidates += [p for p in find_images(self.path) if p.stem == stem.name]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ControlUnavailable(f"no control image for {name!r} in {self.path} (looked for {stem.name}.*)")

    def __call__(self, images: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        resolution = images.shape[-1]
        names = list(names) if names is not None else [None] * len(images)
        return torch.stack([load_image(self.file_for(n), resolution) for n in names])

    def key(self) -> dict[str, Any]:
        """Content, not path: the same pixels anywhere give the same key."""
        files = [self.path] if self.path.is_file() else find_images(self.path)
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        return {"name": self.name, "files": digest.hexdigest()[:16]}
