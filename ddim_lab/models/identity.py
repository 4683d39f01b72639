"""A model's identity for the inversion cache key: which weights sit behind a name or a path."""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")  # weights, configs, tokenizer files
MIB = 1 << 20


def fingerprint(path: Path) -> str:
    """A hub snapshot's commit hash; otherwise sha256 over the weight, config and tokenizer files (relative
    path, size, content; files over 64 MiB: their first and last MiB, so SD-sized weights cost milliseconds).

    Tells apart different weights behind one name or path (a retrained digits model, a rebuilt model), and is
    the same for the same files anywhere.
    """
    if path.parent.name == "snapshots":
        return path.name
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.suffix in FINGERPRINT_SUFFIXES and p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= 64 * MIB:
                digest.update(handle.read())
            else:
                digest.update(handle.read(MIB))
                handle.seek(size - MIB)
                digest.update(handle.read())
    return digest.hexdigest()[:16]
