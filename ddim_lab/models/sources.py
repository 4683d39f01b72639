"""Where a model lives, per its config's ``source``: ``hub`` (a model id, from the local Hugging Face cache or
the network), ``local`` (a diffusers directory), ``digits`` / ``digits-flow`` / ``digits-lcm`` (the models
shipped inside this package), ``build`` (random weights from committed architecture configs, saved once and
loaded back like any other model). ControlNets have the same sources (``digits``: the shipped digits
ControlNet). A model that cannot be had here raises ModelUnavailable with the way to provide it."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddim_lab.models.build import built_controlnet_dir, built_model_dir
from ddim_lab.models.errors import ModelUnavailable

log = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
# source → folder under ddim_lab/assets
SHIPPED = {"digits": "digits-ldm", "digits-flow": "digits-flow", "digits-lcm": "digits-lcm"}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model`` / ``controlnet`` / ``runtime`` config as a plain dict (a DictConfig resolved)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def shipped_model_dir(name: str = "digits-ldm") -> Path:
    """A model inside the installed package: the digits UNet model (``digits-ldm``), its flow twin
    (``digits-flow``) or its few-step distillation (``digits-lcm``)."""
    return Path(str(resources.files("ddim_lab") / "assets" / name))


def shipped_controlnet_dir() -> Path:
    """The digits ControlNet inside the installed package."""
    return Path(str(resources.files("ddim_lab") / "assets" / "digits-controlnet"))


def model_dir(spec: Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    """Where the model's diffusers directory is, per its ``source``."""
    source = spec["source"]
    if source == "hub":
        return _hub_dir(spec["id"], spec.get("revision"))
    if source == "local":
        path = Path(spec.get("path") or "")
        if not spec.get("path") or not (path / "model_index.json").exists():
            raise ModelUnavailable(
                f"model.path={spec.get('path')!r} is not a diffusers directory (no model_index.json)"
            )
        return path
    if source in SHIPPED:
        path = shipped_model_dir(SHIPPED[source])
        if not (path / "model_index.json").exists():
            raise ModelUnavailable(f"the shipped {source} model is missing from {path}; reinstall ddim_lab")
        return path
    if source == "build":
        return built_model_dir(spec["arch"], spec["words"], spec.get("seed", 0), Path(cache_dir) / "models")
    raise ValueError(f"unknown model source {source!r} (hub, local, {', '.join(SHIPPED)}, build)")


def controlnet_dir(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> Path:
    """Where a ``controlnet`` config's diffusers directory is, per its ``source`` (hub, local, digits, build:
    random weights from ``arch``, saved once under ``cache_dir/models``)."""
    source = spec["source"]
    if source == "build":
        return built_controlnet_dir(spec["arch"], spec.get("seed", 0), Path(cache_dir) / "models")
    if source == "hub":
        try:
            return _hub_dir(spec["id"], spec.get("revision"))
        except ModelUnavailable as err:  # same message, pointing at the controlnet group
            text = (
                str(err)
                .replace("Model '", "ControlNet '")
                .replace("model=local model.path", "controlnet=local controlnet.path")
            )
            raise ModelUnavailable(text) from err
    if source == "local":
        path = Path(spec.get("path") or "")
        if not spec.get("path") or not (path / "config.json").exists():
            raise ModelUnavailable(
                f"controlnet.path={spec.get('path')!r} is not a diffusers ControlNet directory (no config.json)"
            )
        return path
    if source == "digits":
        path = shipped_controlnet_dir()
        if not (path / "config.json").exists():
            raise ModelUnavailable(f"the shipped digits ControlNet is missing from {path}; reinstall ddim_lab")
        return path
    raise ValueError(f"unknown controlnet source {source!r} (none, hub, local, digits, build)")


# -- the hub: the local cache first, the network only when it can be reached -----------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _refuse_offline(how: str, local_error: Exception) -> None:
    """Raise ModelUnavailable (``how`` with its ``{why}`` filled in) when the hub cannot be asked:
    HF_HUB_OFFLINE is set, or the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelUnavailable(how.format(why="HF_HUB_OFFLINE is set")) from local_error
    if not _hub_reachable():
        raise ModelUnavailable(how.format(why="the hub cannot be reached (no network)")) from local_error


def _hub_dir(model_id: str, revision: str | None) -> Path:
    """The local snapshot of a hub model, downloading it only when the hub is reachable."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception as err:  # any lookup failure means: not in the local cache
        local_error = err
    how = (
        f"Model '{model_id}' is not in the local Hugging Face cache"
        f" ({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
        f" and {{why}}. Provide it with `huggingface-cli download {model_id}` on a machine with network"
        " (then copy the cache, or set HF_HOME), or save it with `save_pretrained` and run with"
        " `model=local model.path=DIR`."
    )
    _refuse_offline(how, local_error)
    log.info("downloading %s from the hub", model_id)
    return Path(snapshot_download(model_id, revision=revision))


def hub_scheduler_file(model_id: str, revision: str | None) -> Path:
    """``scheduler/scheduler_config.json`` of a hub model, from the cache or (that file only) the hub."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            model_id, revision=revision, allow_patterns=[SCHEDULER_CONFIG], local_files_only=True
        )
        if (Path(folder) / SCHEDULER_CONFIG).is_file():
            return Path(folder) / SCHEDULER_CONFIG
        local_error: Exception = FileNotFoundError(SCHEDULER_CONFIG)
    except Exception as err:  # any lookup failure means: not in the local cache
        local_error = err
    how = (
        f"The scheduler config of '{model_id}' ({SCHEDULER_CONFIG}) is not in the local Hugging Face cache and"
        f" {{why}}. Get it with `huggingface-cli download {model_id} {SCHEDULER_CONFIG}` on a machine with"
        " network (or `ddim-lab-prefetch model=...`)."
    )
    _refuse_offline(how, local_error)
    log.info("downloading %s of %s from the hub", SCHEDULER_CONFIG, model_id)
    folder = snapshot_download(model_id, revision=revision, allow_patterns=[SCHEDULER_CONFIG])
    return Path(folder) / SCHEDULER_CONFIG


def cached_hub_file(repo: str, revision: str | None, filename: str) -> Path | None:
    """A file of a hub repo from the local Hugging Face cache only (None when it is not there)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several kinds)
        return None
