"""Build a diffusers pipeline from architecture configs, with seeded random weights.

``arch.family`` picks the pipeline: ``sd`` (default; ``StableDiffusionPipeline``), ``sdxl``
(``StableDiffusionXLPipeline``: two CLIP encoders, the second with projection, and a ``text_time`` UNet),
``sd3`` (``StableDiffusion3Pipeline``: two CLIP encoders with projection, T5 optional) or ``flux``
(``FluxPipeline``: CLIP for the pooled embedding, T5 for the sequence). Used for the `tiny` and `tiny-flow`
plumbing models, the SD-1.5-sized timing model, and as the initial state of the shipped digits models before
training. The result is saved with ``save_pretrained`` and loaded back through the same ``from_pretrained``
path as the real models.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module, metadata
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from ddim_lab.models.families import pipeline_class
from ddim_lab.models.tokenizer import MAX_LENGTH, build_t5_tokenizer, build_tokenizer

log = logging.getLogger(__name__)

# Stable Diffusion 1.x noise schedule (its scheduler/scheduler_config.json), used by every built model.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


# Stable Diffusion 3's scheduler/scheduler_config.json: the default of built flow models.
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# What decides a built model besides its recipe (part of the folder's hash): the code that builds it and the
# packages whose classes, initialisations and random streams it uses.
BUILD_MODULES = ("ddim_lab.models.build", "ddim_lab.models.families", "ddim_lab.models.tokenizer")
BUILD_PACKAGES = ("torch", "diffusers", "transformers")


def build_pipeline(arch: Mapping[str, Any], words: Iterable[str], seed: int = 0):
    """A random-weight pipeline of ``arch.family`` (``sd``, ``sdxl``, ``sd3``, ``flux``); ``words`` become
    single tokens of the offline tokenizers. Only that family's classes are imported."""
    builders = {"sd": _build_sd, "sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux}
    family = arch.get("family", "sd")
    if family not in builders:
        raise ValueError(f"arch.family={family!r} must be one of {', '.join(builders)}")
    pipeline = pipeline_class(family)  # a broken install fails here, on one line
    torch.manual_seed(seed)
    return builders[family](pipeline, arch, list(words))


def _clip_config(config: Mapping[str, Any], tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(config),
    )


def _t5(config: Mapping[str, Any], words: list[str]) -> tuple[Any, Any]:
    """A ``T5EncoderModel`` of ``config`` (d_model, d_kv, d_ff, num_layers, num_heads) and its tokenizer."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer(words)
    encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **dict(config))
    )
    return encoder, tokenizer


def _flow_scheduler(arch: Mapping[str, Any]) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**{**FLOW_SCHEDULER, **dict(arch.get("scheduler") or {})})


def _build_sd3(pipeline: type, arch: Mapping[str, Any], words: list[str]):
    """``transformer`` (SD3Transformer2DModel), ``vae`` (set ``shift_factor``), ``text_encoder`` (one CLIP
    config for both encoders: pooled dim = 2 × projection_dim), optional ``text_encoder_3`` (a T5 config)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tokenizer(words), build_tokenizer(words)
    text_encoder = CLIPTextModelWithProjection(_clip_config(arch["text_encoder"], tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(arch["text_encoder"], tokenizer_2))
    t5, t5_tokenizer = _t5(arch["text_encoder_3"], words) if arch.get("text_encoder_3") else (None, None)
    return pipeline(
        transformer=SD3Transformer2DModel(**_tuples(arch["transformer"])),
        scheduler=_flow_scheduler(arch),
        vae=AutoencoderKL(**_tuples(arch["vae"])),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def _build_flux(pipeline: type, arch: Mapping[str, Any], words: list[str]):
    """``transformer`` (FluxTransformer2DModel), ``vae``, ``text_encoder`` (CLIP: the pooled embedding),
    ``text_encoder_2`` (T5: the sequence)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_config(arch["text_encoder"], tokenizer))
    t5, t5_tokenizer = _t5(arch["text_encoder_2"], words)
    return pipeline(
        scheduler=_flow_scheduler(arch),
        vae=AutoencoderKL(**_tuples(arch["vae"])),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**_tuples(arch["transformer"])),
    )


def _build_sd(pipeline: type, arch: Mapping[str, Any], words: list[str]):
    """``unet``, ``vae``, ``text_encoder`` (and optional ``scheduler``) config dicts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_config(arch["text_encoder"], tokenizer))
    unet = UNet2DConditionModel(**_tuples(arch["unet"]))
    vae = AutoencoderKL(**_tuples(arch["vae"]))
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, **dict(arch.get("scheduler", {}))})
    return pipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(pipeline: type, arch: Mapping[str, Any], words: list[str]):
    """``unet`` (``addition_embed_type: text_time``; cross_attention_dim = the two hidden sizes summed,
    projection_class_embeddings_input_dim = 6 × addition_time_embed_dim + text_encoder_2's projection_dim),
    ``vae``, ``text_encoder`` (CLIPTextModel), ``text_encoder_2`` (CLIPTextModelWithProjection), optional
    ``scheduler`` and ``force_zeros_for_empty_prompt`` (default true, as SDXL 1.0)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tokenizer(words), build_tokenizer(words)
    return pipeline(
        vae=AutoencoderKL(**_tuples(arch["vae"])),
        text_encoder=CLIPTextModel(_clip_config(arch["text_encoder"], tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(arch["text_encoder_2"], tokenizer_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**_tuples(arch["unet"])),
        scheduler=DDIMScheduler(**{**SD_SCHEDULER, **dict(arch.get("scheduler", {}))}),
        force_zeros_for_empty_prompt=bool(arch.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )


def code_digest(source: str) -> str:
    """sha256 of Python source as the interpreter reads it: comments, layout and docstrings do not count, so
    only an edit that can change what the code does changes it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            first = body[0].value
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                node.body = body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def build_identity() -> dict[str, str]:
    """What decides a built model besides its recipe: the code of ``BUILD_MODULES`` (``code_digest``) and the
    installed versions of ``BUILD_PACKAGES``."""
    code = {name: code_digest(module_source(name)) for name in BUILD_MODULES}
    return {**code, **{name: metadata.version(name) for name in BUILD_PACKAGES}}


def module_source(name: str) -> str:
    """The source text of an imported module."""
    return inspect.getsource(import_module(name))


def recipe_dir(root: str | os.PathLike, kind: str, recipe: Mapping[str, Any]) -> Path:
    """``root/<kind>-<hash>``: the folder of a built model, hashed over its recipe and ``build_identity()``, so
    a changed recipe, build code or package version builds afresh instead of serving an older build."""
    payload = json.dumps({"recipe": _plain(recipe), "build": build_identity()}, sort_keys=True)
    return Path(root) / f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def built_model_dir(arch: Mapping[str, Any], words: Iterable[str], seed: int, root: str | os.PathLike) -> Path:
    """Build (once) and save a random-weight model; return its directory, keyed by a hash of its recipe and
    build (``recipe_dir``)."""
    words = sorted(set(words))
    path = recipe_dir(root, "built", {"arch": arch, "words": words, "seed": seed})
    if not (path / "model_index.json").exists():
        log.info("building random-weight model into %s", path)
        _save_once(path, build_pipeline(arch, words, seed).save_pretrained)
    return path


def build_controlnet(arch: Mapping[str, Any], seed: int = 0):
    """A random-weight ``ControlNetModel`` of config ``arch``. Its zero convolutions (the conditioning
    embedding's last layer, the residual projections) get torch's default initialisation instead of zeros, so
    the control image really changes the residuals of this plumbing model."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(**_tuples(arch))
    zero_convs = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
    for module in zero_convs:
        module.reset_parameters()
    return net


def built_controlnet_dir(arch: Mapping[str, Any], seed: int, root: str | os.PathLike) -> Path:
    """Build (once) and save a random-weight ControlNet; return its directory, keyed by a hash of its recipe and
    build (``recipe_dir``)."""
    path = recipe_dir(root, "controlnet", {"controlnet": arch, "seed": seed})
    if not (path / "config.json").exists():
        log.info("building random-weight ControlNet into %s", path)
        _save_once(path, build_controlnet(arch, seed).save_pretrained)
    return path


def _save_once(path: Path, save: Callable[[Path], object]) -> None:
    """``save(tmp)`` into a temporary folder beside ``path``, then rename it to ``path`` (a concurrent builder
    that finished first wins: its copy is identical)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save(tmp)
    try:
        tmp.rename(path)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _tuples(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers wants tuples where YAML gives lists."""
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in dict(config).items()}


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
