"""Content-addressed cache of inversion artifacts (safetensors, atomic writes).

An artifact is whatever an inverter's sampler needs (``ddim_lab.methods.inversion.base``): a dict of tensors for
one image. The key hashes exactly what determines it — image content, every model option but its name
(``ddim_lab.study.artifacts.model_identity``), revision (hub commit or a fingerprint of the weight files) and
dtype, scheduler config, num_steps, the inverter's method and knobs, inversion guidance, source and negative
prompt; the seed only for stochastic inverters and the sampling guidance only for inverters that optimise for
it — plus ``CACHE_VERSION``, and nothing that only affects sampling. Entries are written to a temporary file
and moved into place with ``os.replace``, so concurrent writers (jobs of one multirun) never leave a torn
entry: the last rename wins and every rename installs a complete file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the inversion math changes: old entries are then never read


def inversion_key(**fields: Any) -> str:
    """sha256 of the canonical JSON of ``fields`` and the cache version."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class InversionCache:
    """Artifacts (name → tensor) stored as ``<root>/<key[:2]>/<key>.safetensors``; ``root=None`` disables."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.root is None or not self._path(key).exists():
            return None
        try:
            artifact = load_file(self._path(key))
            if not artifact:
                raise KeyError("empty entry")
            return artifact
        except (SafetensorError, OSError, KeyError) as err:  # unreadable entry: recompute and overwrite
            log.warning("ignoring unreadable cache entry %s: %s", self._path(key), err)
            return None

    def save(self, key: str, artifact: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        os.close(fd)
        try:
            metadata = {k: json.dumps(v, default=str) for k, v in (meta or {}).items()}
            tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.items()}
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
