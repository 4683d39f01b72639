"""Why a model cannot be had here: its weights are missing (``ModelUnavailable``), or the installed packages
cannot import its pipeline (``BrokenInstall``). Each message is one line that says what to do."""

from __future__ import annotations

from importlib import metadata

import torch


class ModelUnavailable(RuntimeError):
    """A model's weights cannot be had here; the message says how to provide them."""


class BrokenInstall(ModelUnavailable):
    """The installed packages cannot import a model family's pipeline (typically a torch and a torchvision that
    are not a matching pair); the message names the installed pair."""


def broken_install_message(what: str, err: BaseException) -> str:
    """One line: what failed to import, the root cause (the innermost error of the chain, as the lazy import
    machinery of diffusers and transformers wraps it twice), and the installed torch/torchvision pair."""
    seen = [err]
    while (seen[-1].__cause__ or seen[-1].__context__) is not None and len(seen) < 20:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    root = seen[-1]
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    reason = f"{type(root).__name__}: {lines[-1]}" if lines else type(root).__name__
    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        vision = "(not installed)"
    return (
        f"cannot import {what} ({reason}): the installed torch {torch.__version__} and"
        f" torchvision {vision} must be a matching pair (torchvision built for this torch); reinstall both"
        " together from one package index (see the README, 'Set up and run'; `make` rebuilds a broken .venv)"
    )
