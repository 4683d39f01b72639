"""Load a Stable-Diffusion-format model, whatever its source, through diffusers' ``from_pretrained``.

Sources: ``hub`` (a model id, from the local Hugging Face cache or the network), ``local`` (a diffusers
directory), ``digits`` (the model shipped inside this package), ``build`` (random weights from committed
architecture configs, saved once and loaded back like any other model).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from omegaconf import DictConfig, OmegaConf

from ddim_lab.denoiser import UNetDenoiser
from ddim_lab.models.build import built_model_dir
from ddim_lab.schedule import ddim_scheduler

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_HOST = ("huggingface.co", 443)
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")  # weights, configs, tokenizer files
MIB = 1 << 20


class ModelUnavailable(RuntimeError):
    """A model's weights cannot be had here; the message says how to provide them."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def shipped_model_dir() -> Path:
    """The digits model inside the installed package."""
    return Path(str(resources.files("ddim_lab") / "assets" / "digits-ldm"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


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
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelUnavailable(how.format(why="HF_HUB_OFFLINE is set")) from local_error
    if not _hub_reachable():
        raise ModelUnavailable(how.format(why="the hub cannot be reached (no network)")) from local_error
    log.info("downloading %s from the hub", model_id)
    return Path(snapshot_download(model_id, revision=revision))


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
    if source == "digits":
        path = shipped_model_dir()
        if not (path / "model_index.json").exists():
            raise ModelUnavailable(f"the shipped digits model is missing from {path}; reinstall ddim_lab")
        return path
    if source == "build":
        return built_model_dir(spec["arch"], spec["words"], spec.get("seed", 0), Path(cache_dir) / "models")
    raise ValueError(f"unknown model source {source!r} (hub, local, digits, build)")


@dataclass
class LatentModel:
    """A loaded SD-format pipeline with the few operations the lab needs."""

    pipe: StableDiffusionPipeline
    name: str
    resolution: int
    device: torch.device
    dtype: torch.dtype
    revision: str = ""  # hub commit, or a fingerprint of the weight files (part of the inversion cache key)
    _embeds: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    controlnet: Any = None  # a diffusers ControlNetModel (attach_controlnet); the denoiser adds its residuals
    controlnet_scale: float = 1.0
    controlnet_revision: str = ""  # fingerprint of the ControlNet weights (part of the inversion cache key)

    @property
    def scaling_factor(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        """The model's own prediction type (``scheduler.overrides`` may change it for a run)."""
        return self.pipe.scheduler.config.prediction_type

    def scheduler(self, **overrides: Any):
        """A DDIMScheduler from the model's own scheduler config, with overrides."""
        return ddim_scheduler(self.pipe.scheduler.config, **overrides)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [0, 1] → latents (B, 4, R/f, R/f): posterior mean × scaling factor."""
        vae = self.pipe.vae
        x = (images * 2 - 1).to(self.device, vae.dtype)
        return (vae.encode(x).latent_dist.mean * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Latents → images (B, 3, R, R) in [0, 1], float32 on the CPU; ``chunk`` latents per VAE call, so a
        whole grid's results never sit in GPU memory at once."""
        vae = self.pipe.vae
        out = []
        for part in latents.split(chunk):
            x = vae.decode((part / self.scaling_factor).to(self.device, vae.dtype)).sample
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, 77, D) for prompts, each distinct prompt encoded once."""
        missing = sorted({p for p in prompts if p not in self._embeds})
        if missing:
            embeds = self.pipe.encode_prompt(missing, self.device, 1, False)[0]
            self._embeds.update({p: e for p, e in zip(missing, embeds.float(), strict=True)})
        return torch.stack([self._embeds[p] for p in prompts])

    def denoiser(self, scheduler: DDIMScheduler | None = None) -> UNetDenoiser:
        """The UNet as a denoiser on ``scheduler``'s ᾱ and prediction type — pass the scheduler the plan was
        built from (default: the model's own, no overrides)."""
        scheduler = scheduler if scheduler is not None else self.scheduler()
        return UNetDenoiser(
            self.pipe.unet,
            scheduler.alphas_cumprod,
            scheduler.config.prediction_type,
            controlnet=self.controlnet,
            controlnet_scale=self.controlnet_scale,
        )


def load_model(
    spec: Mapping[str, Any], runtime: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike = ".cache"
) -> LatentModel:
    """Load the model described by a ``model`` config with ``runtime`` settings (device, dtype, GPU knobs)."""
    spec = _plain_dict(spec)
    runtime = _plain_dict(runtime or {})
    if runtime.get("dtype", "fp32") not in DTYPES:
        raise ValueError(f"runtime.dtype must be one of {sorted(DTYPES)}, got {runtime.get('dtype')!r}")
    dtype = DTYPES[runtime.get("dtype", "fp32")]
    device = resolve_device(runtime.get("device", "auto"))
    path = model_dir(spec, cache_dir)
    log.info("loading model %s from %s (%s, %s)", spec["name"], path, device, dtype)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"could not load model {spec['name']} from {path}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)  # inference; inverters that optimise (null-text) differentiate inputs only
    if runtime.get("vae_fp32", True) and dtype != torch.float32:
        pipe.vae.to(torch.float32)
    _apply_knobs(pipe, runtime, device)
    resolution = int(spec.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return LatentModel(
        pipe=pipe,
        name=spec["name"],
        resolution=resolution,
        device=device,
        dtype=dtype,
        revision=fingerprint(path),
    )


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


def _plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _apply_knobs(pipe: StableDiffusionPipeline, runtime: Mapping[str, Any], device: torch.device) -> None:
    """GPU knobs: attention backend, channels_last, torch.compile, model CPU offload."""
    attention = runtime.get("attention", "sdpa")
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()  # raises clearly when xformers is not installed
    elif attention != "sdpa":
        raise ValueError(f"runtime.attention must be sdpa or xformers, got {attention!r}")
    if runtime.get("channels_last", False):
        pipe.unet.to(memory_format=torch.channels_last)
    if runtime.get("cpu_offload", False):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if runtime.get("compile", False):
        pipe.unet = torch.compile(pipe.unet)


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def load_scheduler_config(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> dict[str, Any]:
    """Only the scheduler config of a model (no weights): for a hub model just ``scheduler_config.json``
    (looked up in the local cache, downloaded alone when missing and the hub is reachable); a ``build`` model's
    config comes from its recipe without building it."""
    import json

    spec = _plain_dict(spec)
    source = spec["source"]
    if source == "build":
        from ddim_lab.models.build import SD_SCHEDULER

        return {**SD_SCHEDULER, **dict((spec.get("arch") or {}).get("scheduler") or {})}
    if source == "hub":
        path = _hub_scheduler_file(spec["id"], spec.get("revision"))
    else:
        path = model_dir(spec, cache_dir) / SCHEDULER_CONFIG
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelUnavailable(
            f"cannot read the scheduler config of model {spec['name']} ({path}): {err}"
        ) from err


def _hub_scheduler_file(model_id: str, revision: str | None) -> Path:
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
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelUnavailable(how.format(why="HF_HUB_OFFLINE is set")) from local_error
    if not _hub_reachable():
        raise ModelUnavailable(how.format(why="the hub cannot be reached (no network)")) from local_error
    log.info("downloading %s of %s from the hub", SCHEDULER_CONFIG, model_id)
    folder = snapshot_download(model_id, revision=revision, allow_patterns=[SCHEDULER_CONFIG])
    return Path(folder) / SCHEDULER_CONFIG


# -- ControlNet models ---------------------------------------------------------------------------------------
def shipped_controlnet_dir() -> Path:
    """The digits ControlNet inside the installed package."""
    return Path(str(resources.files("ddim_lab") / "assets" / "digits-controlnet"))


def controlnet_dir(spec: Mapping[str, Any]) -> Path:
    """Where a ``controlnet`` config's diffusers directory is, per its ``source`` (hub, local, digits)."""
    source = spec["source"]
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
    raise ValueError(f"unknown controlnet source {source!r} (none, hub, local, digits)")


def load_controlnet(
    spec: Mapping[str, Any], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Any, str]:
    """``ControlNetModel.from_pretrained`` of a ``controlnet`` config → (model in eval mode, fingerprint)."""
    from diffusers import ControlNetModel

    spec = _plain_dict(spec)
    path = controlnet_dir(spec)
    log.info("loading ControlNet %s from %s (%s, %s)", spec["name"], path, device, dtype)
    try:
        net = ControlNetModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"could not load ControlNet {spec['name']} from {path}: {err}") from err
    net.requires_grad_(False)
    return net.to(device).eval(), fingerprint(path)


def attach_controlnet(model: LatentModel, spec: Mapping[str, Any] | None) -> LatentModel:
    """Load the ControlNet a ``controlnet`` config names (``none`` → nothing) into ``model``, in the UNet's
    dtype and on its device, with its ``scale``; ``model.denoiser()`` then adds its residuals."""
    spec = _plain_dict(spec or {"source": "none"})
    if spec.get("source", "none") == "none":
        model.controlnet, model.controlnet_revision = None, ""
        return model
    model.controlnet, model.controlnet_revision = load_controlnet(spec, model.pipe.unet.dtype, model.device)
    model.controlnet_scale = float(spec.get("scale", 1.0))
    return model
