"""Load a diffusers text-to-image model, whatever its source, through its pipeline's ``from_pretrained``.

Families: ``sd`` (``StableDiffusionPipeline``: a UNet, DDIM schedules), and the rectified-flow families
``sd3`` (``StableDiffusion3Pipeline``) and ``flux`` (``FluxPipeline``), which run through the same DDIM engine
via ``ddim_lab.engine.flow`` (``FlowModel``). The family comes from the model config's ``family`` key or from the
``_class_name`` in the directory's ``model_index.json``.

Sources: ``hub`` (a model id, from the local Hugging Face cache or the network), ``local`` (a diffusers
directory), ``digits`` / ``digits-flow`` (the models shipped inside this package), ``build`` (random weights
from committed architecture configs, saved once and loaded back like any other model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module, metadata, resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler
from omegaconf import DictConfig, OmegaConf

from ddim_lab.engine.denoiser import Conditioning, UNetDenoiser
from ddim_lab.engine.flow import flow_scheduler
from ddim_lab.engine.flow_denoiser import FlowDenoiser
from ddim_lab.engine.schedule import ddim_scheduler
from ddim_lab.models.build import built_model_dir

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_HOST = ("huggingface.co", 443)
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")  # weights, configs, tokenizer files
MIB = 1 << 20
# family → its diffusers pipeline class, imported only when a model of that family loads (pipeline_class)
PIPELINES = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
FAMILY_OF_PIPELINE = {name: family for family, name in PIPELINES.items()}


class ModelUnavailable(RuntimeError):
    """A model's weights cannot be had here; the message says how to provide them."""


class BrokenInstall(ModelUnavailable):
    """The installed packages cannot import a model family's pipeline (typically a torch and a torchvision that
    are not a matching pair); the message names the installed pair."""


def pipeline_class(family: str) -> type:
    """The diffusers pipeline class of ``family`` (``sd``, ``sd3``, ``flux``), imported now: one family's
    import never runs for another family's model. An import failure raises BrokenInstall, one line."""
    name = PIPELINES[family]
    try:
        return getattr(import_module("diffusers"), name)
    except (ImportError, RuntimeError, OSError, AttributeError) as err:
        raise BrokenInstall(broken_install_message(f"diffusers' {name}", err)) from err


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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def shipped_model_dir(name: str = "digits-ldm") -> Path:
    """A model inside the installed package: the digits UNet model (``digits-ldm``) or its flow twin
    (``digits-flow``)."""
    return Path(str(resources.files("ddim_lab") / "assets" / name))


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
    if source in SHIPPED:
        path = shipped_model_dir(SHIPPED[source])
        if not (path / "model_index.json").exists():
            raise ModelUnavailable(f"the shipped {source} model is missing from {path}; reinstall ddim_lab")
        return path
    if source == "build":
        return built_model_dir(spec["arch"], spec["words"], spec.get("seed", 0), Path(cache_dir) / "models")
    raise ValueError(f"unknown model source {source!r} (hub, local, {', '.join(SHIPPED)}, build)")


SHIPPED = {"digits": "digits-ldm", "digits-flow": "digits-flow"}  # source → folder under ddim_lab/assets


def model_family(spec: Mapping[str, Any], path: Path) -> str:
    """``sd``, ``sd3`` or ``flux``: the config's ``family`` key, else the pipeline class in model_index.json."""
    if spec.get("family"):
        if spec["family"] not in PIPELINES:
            raise ValueError(f"model.family={spec['family']!r} must be one of {', '.join(PIPELINES)}")
        return spec["family"]
    try:
        name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"cannot read {path / 'model_index.json'}: {err}") from err
    if name not in FAMILY_OF_PIPELINE:
        raise ModelUnavailable(
            f"{path} holds a {name or 'pipeline without _class_name'}; ddim_lab loads"
            f" {', '.join(FAMILY_OF_PIPELINE)} (or set model.family)"
        )
    return FAMILY_OF_PIPELINE[name]


@dataclass
class LatentModel:
    """A loaded SD-format pipeline with the few operations the lab needs (``FlowModel``: SD3 and FLUX)."""

    pipe: Any  # a StableDiffusionPipeline here; StableDiffusion3Pipeline or FluxPipeline in FlowModel
    name: str
    resolution: int
    device: torch.device
    dtype: torch.dtype
    revision: str = ""  # hub commit, or a fingerprint of the weight files (part of the inversion cache key)
    _embeds: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    controlnet: Any = None  # a diffusers ControlNetModel (attach_controlnet); the denoiser adds its residuals
    controlnet_scale: float = 1.0
    controlnet_revision: str = ""  # fingerprint of the ControlNet weights (part of the inversion cache key)

    family: ClassVar[str] = "sd"

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the UNet here, the transformer in ``FlowModel``."""
        return self.pipe.unet

    @property
    def scaling_factor(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent shift (SD3, FLUX); 0 for Stable Diffusion 1/2."""
        return float(self.pipe.vae.config.get("shift_factor") or 0.0)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at the model's resolution."""
        size = self.resolution // self.pipe.vae_scale_factor
        return int(self.pipe.vae.config.latent_channels), size, size

    @property
    def prediction_type(self) -> str:
        """The model's own prediction type (``scheduler.overrides`` may change it for a run)."""
        return self.pipe.scheduler.config.prediction_type

    def scheduler(self, **overrides: Any):
        """A DDIMScheduler from the model's own scheduler config, with overrides."""
        return ddim_scheduler(self.pipe.scheduler.config, **overrides)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [0, 1] → latents (B, C, R/f, R/f): (posterior mean − shift) × scale."""
        vae = self.pipe.vae
        x = (images * 2 - 1).to(self.device, vae.dtype)
        return ((vae.encode(x).latent_dist.mean - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Latents → images (B, 3, R, R) in [0, 1], float32 on the CPU; ``chunk`` latents per VAE call, so a
        whole grid's results never sit in GPU memory at once."""
        vae = self.pipe.vae
        out = []
        for part in latents.split(chunk):
            x = vae.decode((part / self.scaling_factor + self.shift_factor).to(self.device, vae.dtype)).sample
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's prompt encoding of distinct prompts: ``{"text": (B, L, D)}`` (flow models add
        ``"pooled"``)."""
        return {"text": self.pipe.encode_prompt(prompts, self.device, 1, False)[0]}

    @torch.no_grad()
    def prompt_parts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each part of the prompts' encoding, stacked per row (``text`` (B, L, D), ...); every distinct
        prompt is encoded once per model."""
        missing = sorted({p for p in prompts if p not in self._embeds})
        if missing:
            parts = self.encode_prompts(missing)
            for j, p in enumerate(missing):
                self._embeds[p] = {k: v[j].float() for k, v in parts.items()}
        return {k: torch.stack([self._embeds[p][k] for p in prompts]) for k in self._embeds[prompts[0]]}

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) for prompts (L = 77 for Stable Diffusion)."""
        return self.prompt_parts(prompts)["text"]

    def conditioning(
        self,
        prompts: list[str],
        guidance: list[float],
        negative_prompt: str = "",
        extra: dict[str, torch.Tensor] | None = None,
    ) -> Conditioning:
        """Row-aligned conditioning of prompts at per-row guidance: the prompt and null (``negative_prompt``)
        embeddings, and every further part of the encoding in ``extra`` (``pooled`` / ``null_pooled`` for
        flow models) beside the caller's own ``extra`` (a ControlNet's control images)."""
        text = self.prompt_parts(prompts)
        null = self.prompt_parts([negative_prompt] * len(prompts))
        parts = {k: v for k, v in text.items() if k != "text"}
        parts.update({f"null_{k}": v for k, v in null.items() if k != "text"})
        return Conditioning(
            text=text["text"],
            null=null["text"],
            guidance=torch.tensor([float(g) for g in guidance], dtype=torch.float32),
            extra={**(extra or {}), **parts},
        )

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


class FlowModel(LatentModel):
    """A rectified-flow pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``) in the lab's interface: its
    ``FlowMatchEulerDiscreteScheduler`` plans the steps (``ddim_lab.engine.flow``), ``FlowDenoiser`` predicts.

    ``guidance``: ``cfg`` (classifier-free guidance on the velocity) or ``embedded`` (the guidance-distilled
    FLUX.1-dev: each row's guidance scale is a transformer input, one pass per row).
    """

    def __init__(self, *args: Any, family: str = "sd3", guidance: str = "cfg", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.family = family  # type: ignore[misc]  # instance value shadows the class default
        self.guidance = guidance

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees at the model's resolution (what resolution shifting reads)."""
        _, h, w = self.latent_shape
        patch = 2 if self.family == "flux" else int(self.network.config.patch_size)  # FLUX packs 2×2
        return (h // patch) * (w // patch)

    def scheduler(self, **overrides: Any):
        """The model's ``FlowMatchEulerDiscreteScheduler`` with overrides, knowing its pipeline's sigma
        spacing and (dynamic shifting) the μ of this resolution."""
        spacing = "flux" if self.family == "flux" else "scheduler"
        return flow_scheduler(self.pipe.scheduler.config, self.image_seq_len, spacing, **overrides)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``text`` (B, L, D) and ``pooled`` (B, P), as the pipeline's ``encode_prompt`` gives them (SD3: CLIP
        pair + T5 or its zeros, L = 77 + 256; FLUX: T5, L = 512, pooled CLIP)."""
        if self.family == "flux":
            text, pooled, _ = self.pipe.encode_prompt(
                prompts, None, device=self.device, num_images_per_prompt=1
            )
        else:
            text, _, pooled, _ = self.pipe.encode_prompt(
                prompts,
                None,
                None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        return {"text": text, "pooled": pooled}

    def denoiser(self, scheduler: Any = None) -> FlowDenoiser:
        """The transformer as a velocity denoiser (the plan carries the schedule; ``scheduler`` is unused)."""
        if self.controlnet is not None:
            raise ValueError("ControlNets are UNet-only; flow models (SD3, FLUX) run without controlnet=")
        return FlowDenoiser(self.network, self.family, self.guidance)


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
    family = model_family(spec, path)
    log.info("loading %s model %s from %s (%s, %s)", family, spec["name"], path, device, dtype)
    try:
        pipe = pipeline_class(family).from_pretrained(path, dtype=dtype, **_pipeline_kwargs(family, spec, path))
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"could not load model {spec['name']} from {path}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(
                False
            )  # inference; inverters that optimise (null-text) differentiate inputs only
    if runtime.get("vae_fp32", True) and dtype != torch.float32:
        pipe.vae.to(torch.float32)
    network = "unet" if family == "sd" else "transformer"
    _apply_knobs(pipe, runtime, device, network)
    # the pipeline's default size (FluxPipeline: 128 latents; the others: the network's sample_size)
    sample_size = getattr(pipe, "default_sample_size", None) or getattr(pipe, network).config.sample_size
    resolution = int(spec.get("resolution") or sample_size * pipe.vae_scale_factor)
    common = dict(pipe=pipe, name=spec["name"], resolution=resolution, device=device, dtype=dtype)
    if family == "sd":
        return LatentModel(**common, revision=fingerprint(path))
    guidance = spec.get("guidance") or ("embedded" if pipe.transformer.config.get("guidance_embeds") else "cfg")
    return FlowModel(**common, revision=fingerprint(path), family=family, guidance=guidance)


def _pipeline_kwargs(family: str, spec: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments per family: no safety checker for SD; SD3 without T5 when ``model.t5``
    is false or the directory has none (its pipeline then feeds zeros in T5's place)."""
    if family == "sd":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if family == "sd3":
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        if not (spec.get("t5", True) and has_t5):
            return {"text_encoder_3": None, "tokenizer_3": None}
    return {}


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


def _apply_knobs(pipe: Any, runtime: Mapping[str, Any], device: torch.device, network: str = "unet") -> None:
    """GPU knobs: attention backend, channels_last, torch.compile of the ``network`` (``unet`` or
    ``transformer``), model CPU offload."""
    attention = runtime.get("attention", "sdpa")
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()  # raises clearly when xformers is not installed
    elif attention != "sdpa":
        raise ValueError(f"runtime.attention must be sdpa or xformers, got {attention!r}")
    if runtime.get("channels_last", False):
        getattr(pipe, network).to(memory_format=torch.channels_last)
    if runtime.get("cpu_offload", False):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if runtime.get("compile", False):
        setattr(pipe, network, torch.compile(getattr(pipe, network)))


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def load_scheduler_config(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> dict[str, Any]:
    """Only the scheduler config of a model (no weights): for a hub model just ``scheduler_config.json``
    (looked up in the local cache, downloaded alone when missing and the hub is reachable); a ``build`` model's
    config comes from its recipe without building it."""
    import json

    spec = _plain_dict(spec)
    source = spec["source"]
    if source == "build":
        from ddim_lab.models.build import FLOW_SCHEDULER, SD_SCHEDULER

        arch = spec.get("arch") or {}
        if arch.get("family", "sd") == "sd":
            return {**SD_SCHEDULER, **dict(arch.get("scheduler") or {})}
        return {"_class_name": FLOW_SCHEDULER_CLASS, **FLOW_SCHEDULER, **dict(arch.get("scheduler") or {})}
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


FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
TOKEN_PIXELS = 16  # image pixels per transformer token of every released SD3 / FLUX model: VAE 8× × 2×2 patches


def config_scheduler(
    spec: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike = ".cache"
):
    """The scheduler a run plans with, from the model's scheduler config alone (no weights): a DDIMScheduler,
    or for a flow model its FlowMatchEulerDiscreteScheduler (``ddim_lab.engine.flow.flow_scheduler``), the image
    token count taken from ``model.resolution`` (a built model: from its recipe)."""
    spec = _plain_dict(spec)
    config = load_scheduler_config(spec, cache_dir)
    overrides = dict(overrides or {})
    if config.get("_class_name") != FLOW_SCHEDULER_CLASS:
        return ddim_scheduler(config, **overrides)
    arch = spec.get("arch") or {}
    family = spec.get("family") or arch.get("family") or model_family(spec, model_dir(spec, cache_dir))
    pixels = TOKEN_PIXELS
    if arch:  # a built model: its VAE's factor × its patch size (FLUX packs 2×2)
        patch = 2 if family == "flux" else int(arch["transformer"].get("patch_size", 2))
        pixels = 2 ** (len(arch["vae"].get("block_out_channels", [0])) - 1) * patch
    seq_len = (int(spec["resolution"]) // pixels) ** 2 if spec.get("resolution") else None
    return flow_scheduler(config, seq_len, "flux" if family == "flux" else "scheduler", **overrides)


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


def controlnet_dir(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> Path:
    """Where a ``controlnet`` config's diffusers directory is, per its ``source`` (hub, local, digits, build:
    random weights from ``arch``, saved once under ``cache_dir/models``)."""
    source = spec["source"]
    if source == "build":
        from ddim_lab.models.build import built_controlnet_dir

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


def load_controlnet(
    spec: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike = ".cache",
) -> tuple[Any, str]:
    """``ControlNetModel.from_pretrained`` of a ``controlnet`` config → (model in eval mode, fingerprint)."""
    from diffusers import ControlNetModel

    spec = _plain_dict(spec)
    path = controlnet_dir(spec, cache_dir)
    log.info("loading ControlNet %s from %s (%s, %s)", spec["name"], path, device, dtype)
    try:
        net = ControlNetModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"could not load ControlNet {spec['name']} from {path}: {err}") from err
    net.requires_grad_(False)
    return net.to(device).eval(), fingerprint(path)


def attach_controlnet(
    model: LatentModel, spec: Mapping[str, Any] | None, cache_dir: str | os.PathLike = ".cache"
) -> LatentModel:
    """Load the ControlNet a ``controlnet`` config names (``none`` → nothing) into ``model``, in the UNet's
    dtype and on its device, with its ``scale``; ``model.denoiser()`` then adds its residuals. Raises
    ConfigError when the ControlNet does not fit the model's UNet (:func:`check_controlnet_fit`)."""
    spec = _plain_dict(spec or {"source": "none"})
    if spec.get("source", "none") == "none":
        model.controlnet, model.controlnet_revision = None, ""
        return model
    if model.family != "sd":
        raise ValueError(
            f"controlnet={spec.get('name')}: ControlNets are UNet-only; model {model.name} is a"
            f" {model.family} flow model (use controlnet=none)"
        )
    net, revision = load_controlnet(spec, model.network.dtype, model.device, cache_dir)
    factor = int(model.pipe.vae_scale_factor)
    check_controlnet_fit(dict(model.network.config), factor, dict(net.config), spec.get("name"), model.name)
    model.controlnet, model.controlnet_revision = net, revision
    model.controlnet_scale = float(spec.get("scale", 1.0))
    return model


# what must agree between a ControlNet and the UNet it feeds: its residuals are added to the UNet's skip
# connections (channels and count per block), it attends to the same text embeddings, and its control image
# is downsampled to the latent grid as the VAE downsamples images
FIT_KEYS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")


def _with_defaults(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed with ``cls.__init__``'s defaults (what a diffusers model built from it uses)."""
    import inspect

    defaults = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **dict(config)}


def _per_block(value: Any, blocks: int) -> list:
    """A per-block setting as a list (an int or a string means the same value for every block)."""
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


def vae_factor(vae: Mapping[str, Any]) -> int:
    """The VAE's downsampling factor from its config: 2^(len(block_out_channels) − 1), as the pipelines say."""
    from diffusers import AutoencoderKL

    return 2 ** (len(_with_defaults(AutoencoderKL, vae)["block_out_channels"]) - 1)


def check_controlnet_fit(
    unet: Mapping[str, Any], factor: int, controlnet: Mapping[str, Any], name: str, model: str
) -> None:
    """Raise ConfigError (one line naming what differs) when a ControlNet's config does not fit a UNet's (its
    VAE downsampling by ``factor``): the :data:`FIT_KEYS`, and the control image's downsampling
    (2^(len(conditioning_embedding_out_channels) − 1)) against ``factor``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ddim_lab.errors import ConfigError

    u = _with_defaults(UNet2DConditionModel, unet)
    c = _with_defaults(ControlNetModel, controlnet)
    blocks = len(u["down_block_types"])
    differ = [
        f"{key} {c[key]} vs {u[key]}"
        for key in FIT_KEYS
        if _per_block(c[key], blocks) != _per_block(u[key], blocks)
    ]
    control_factor = 2 ** (len(c["conditioning_embedding_out_channels"]) - 1)
    if control_factor != factor:
        differ.append(f"control image downsampled {control_factor}x vs the VAE's {factor}x")
    if differ:
        raise ConfigError(
            f"controlnet={name} does not fit model={model} (ControlNet vs the model's UNet:"
            f" {'; '.join(differ)}); a ControlNet is made for one UNet architecture (model=digits:"
            " controlnet=digits-canny, model=tiny: controlnet=tiny, Stable Diffusion 1.5: sd15-canny,"
            " sd15-openpose)"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached_hub_file(repo: str, revision: str | None, filename: str) -> Path | None:
    """A file of a hub repo from the local Hugging Face cache only (None when it is not there)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several kinds)
        return None


def network_configs(
    spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache"
) -> tuple[dict[str, Any], int] | None:
    """(UNet config, VAE factor) of a UNet ``model`` config, read without loading (or building) weights: a built
    model's from its recipe, a shipped or local model's from its folder, a hub model's from the local cache.
    None when they cannot be read here (the loaded model is checked then)."""
    spec = _plain_dict(spec)
    if spec["source"] == "build":
        arch = spec.get("arch") or {}
        return (arch["unet"], vae_factor(arch["vae"])) if "unet" in arch and "vae" in arch else None
    parts = ("unet/config.json", "vae/config.json")
    if spec["source"] == "hub":
        paths = [_cached_hub_file(spec["id"], spec.get("revision"), part) for part in parts]
    else:
        try:
            paths = [model_dir(spec, cache_dir) / part for part in parts]
        except (ModelUnavailable, ValueError):
            return None  # the load says why
    configs = [_read_json(p) if p is not None else None for p in paths]
    return (configs[0], vae_factor(configs[1])) if all(c is not None for c in configs) else None


def controlnet_config(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> dict | None:
    """A ``controlnet`` config's ``config.json`` without loading weights: a built one's ``arch``, a shipped or
    local one's file, a hub one's from the local cache; None when it cannot be read here."""
    spec = _plain_dict(spec)
    if spec.get("source") == "build":
        return dict(spec.get("arch") or {})
    if spec.get("source") == "hub":
        path = _cached_hub_file(spec["id"], spec.get("revision"), "config.json")
        return _read_json(path) if path is not None else None
    try:
        return _read_json(controlnet_dir(spec, cache_dir) / "config.json")
    except (ModelUnavailable, ValueError):
        return None
