"""Editing metrics as PIE-Bench's reference evaluation defines them (cure-lab/PnPInversion, ``evaluation/``).

All images are ``(B, 3, R, R)`` in [0, 1]; masks are ``(B, 1, R, R)`` in {0, 1} with 1 = edit region.

- **Unedited region** (``1 - mask``): PSNR, LPIPS, MSE, SSIM between the edited image and the source image.
  Like the reference, both images are *multiplied by the region* (pixels outside it become 0) and the metric
  is computed on the whole frame: the zeros count as agreeing pixels, so PSNR/SSIM are higher and MSE lower
  than a metric restricted to the region would be. This is what published PIE-Bench tables measure. PSNR is
  per image with ``data_range=1`` (identical regions give ``inf``); MSE is the mean over all pixels of the
  frame; SSIM is :func:`ddim_lab.metrics.image.ssim` (11×11 Gaussian, sigma 1.5, valid window: the torchmetrics
  definition of the reference's time); LPIPS is :class:`ddim_lab.metrics.image.ImageMetrics` with the
  reference's ``squeeze`` backbone (``normalize=True`` on [0, 1] equals the reference's ``x*2-1`` input).
- **CLIP similarity** of the edited image to the target prompt, whole and on the edit region (image multiplied
  by the mask, as uint8, like the reference), with torchmetrics' ``CLIPScore`` (``100 · max(cos, 0)``) and
  ``openai/clip-vit-large-patch14``.
- **Structure distance**: the reference's DINO ViT-B/8 self-similarity distance on the whole images: keys of
  the last block, cosine self-similarity over all tokens (CLS included), MSE between the two matrices.
  Images are resized (shorter side to the model's ``image_size``, 224, bilinear without antialiasing: what
  torchvision < 0.17, current when the reference was published, did for tensors; the reference pins no
  torchvision version) and ImageNet-normalised **on the 0–255 scale**, exactly as the reference
  does (it never divides by 255; its published numbers depend on it). The weights are the Hugging Face
  conversion ``facebook/dino-vitb8`` (same checkpoint as ``torch.hub`` ``dino_vitb8``), with DINO's LayerNorm
  eps 1e-6.

NaN rule: a row whose unedited region is empty (mask all ones at R) gets NaN for the four unedited-region
metrics, and one whose edit region is empty gets NaN for the edit-region CLIP score; ``unedited_pixels`` and
``edited_pixels`` are returned per row so the report can count them (:func:`empty_region_counts`).

:class:`MaskedEditScorer` is PIE-Bench's scorer (``scorers: [pie_masked]`` in a data config).

Weights are never downloaded: a model id is looked up in the local Hugging Face cache only (a directory
path is loaded directly). Absent weights give NaN and one warning per process saying what to provide
(mode ``"auto"``), raise :class:`WeightsUnavailable` (``"required"``) or give NaN silently (``"off"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ddim_lab.data.scoring import ScoreBatch, Scorer, ScoringContext
from ddim_lab.metrics.image import ImageMetrics, mse, psnr, ssim

logger = logging.getLogger(__name__)

CLIP_MODEL = "openai/clip-vit-large-patch14"
DINO_MODEL = "facebook/dino-vitb8"
DINO_LAYER_NORM_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRUCTURE_INPUT_SCALE = 255.0  # the reference feeds 0–255 values to the ImageNet normalisation
MODES = ("auto", "required", "off")
UNEDITED_METRICS = ("psnr_unedited", "lpips_unedited", "mse_unedited", "ssim_unedited")

_NOTIFIED: set[str] = set()  # models whose absence this process has reported


class WeightsUnavailable(RuntimeError):
    """Model weights are not on disk (and will not be downloaded)."""


def missing_weights_message(what: str, model: str) -> str:
    """One line: what is unavailable, what to provide and where."""
    return (
        f"{what} is unavailable: {model!r} is neither a local directory nor in the Hugging Face cache "
        f"(HF_HOME / HF_HUB_CACHE; nothing is downloaded here). Provide it with `huggingface-cli download "
        f"{model}` on a machine with internet and copy the cache over, or give a directory written by "
        f"save_pretrained; {what} is recorded as NaN"
    )


def local_model_dir(model: str) -> Path | None:
    """``model`` as a local directory: itself if it is one, else its snapshot in the local Hugging Face cache
    (never the network); None when absent."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, local_files_only=True))
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError is an OSError; bad ids are ValueErrors
        logger.debug("%s not in the local Hugging Face cache: %s", model, err)
        return None


def _load(what: str, model: str, mode: str, build: Callable[[Path], object]) -> object | None:
    """Build from the local copy of ``model``; None (with the one-time notice) when absent in mode auto."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    local = local_model_dir(model)
    loaded = None
    if local is not None:
        try:
            loaded = build(local)
        except (OSError, ValueError) as err:  # an incomplete snapshot
            logger.debug("cannot load %s from %s: %s", model, local, err)
    if loaded is None:
        message = missing_weights_message(what, model)
        if mode == "required":
            raise WeightsUnavailable(message)
        if model not in _NOTIFIED:
            _NOTIFIED.add(model)
            logger.warning("%s", message)
    return loaded


def _nan(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float32)


def _check(images: torch.Tensor, masks: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, R, R) images, got {tuple(images.shape)}")
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"expected (B, 1, R, R) masks for {tuple(images.shape)}, got {tuple(masks.shape)}")
    if masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"mask size {tuple(masks.shape[-2:])} differs from image size {tuple(images.shape[-2:])}"
        )


def region_metrics(
    edited: torch.Tensor, source: torch.Tensor, region: torch.Tensor, lpips: ImageMetrics | None = None
) -> dict[str, torch.Tensor]:
    """PSNR, LPIPS, MSE, SSIM of ``edited * region`` against ``source * region`` (the reference's masking),
    each ``(B,)`` float32; NaN for rows whose region is empty; LPIPS NaN when ``lpips`` is None."""
    _check(edited, region)
    region = region.to(edited.device, edited.dtype)
    a, b = edited * region, source.to(edited.device, edited.dtype) * region
    empty = region.flatten(1).sum(dim=1).cpu() == 0
    out = {
        "psnr": psnr(a, b).float().cpu(),
        "lpips": lpips.lpips(a, b) if lpips is not None else _nan(len(a)),
        "mse": mse(a.double(), b.double()).float().cpu(),
        "ssim": ssim(a, b).float().cpu(),
    }
    return {k: torch.where(empty, torch.nan, v) for k, v in out.items()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float → uint8 by rounding (what saving a PNG does)."""
    return (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def _as_tensor(features: object) -> torch.Tensor:
    """transformers 5 gives a model output whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class _TensorFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return tensors: torchmetrics 1.9.0's ``CLIPScore`` calls
    ``.norm`` on them and fails with transformers 5 (Lightning-AI/torchmetrics#3407, fixed after 1.9.0 by
    #3408). A no-op where the model already returns tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


class ClipSimilarity:
    """torchmetrics ``CLIPScore`` per image; ``model`` is a Hugging Face id (local cache only) or a directory
    with a saved ``CLIPModel`` and ``CLIPProcessor``."""

    def __init__(self, model: str = CLIP_MODEL, mode: str = "auto", device: str | torch.device = "cpu"):
        self.model_name = model
        self.device = torch.device(device)
        self._metric = _load("CLIP similarity", model, mode, self._build)

    def _build(self, local: Path):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        def model_and_processor():
            model = _TensorFeatures(CLIPModel.from_pretrained(local).eval())
            return model, CLIPProcessor.from_pretrained(local)

        return CLIPScore(model_name_or_path=model_and_processor).to(self.device)

    @property
    def available(self) -> bool:
        return self._metric is not None

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], region: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B,)`` float32 CLIP scores of ``images`` (B, 3, R, R in [0, 1]) against ``prompts``; with
        ``region`` (B, 1, R, R) the uint8 image is multiplied by it first, rows with an empty region are NaN."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if self._metric is None:
            return _nan(len(images))
        pixels = to_uint8(images)
        empty = torch.zeros(len(images), dtype=torch.bool)
        if region is not None:
            _check(images, region)
            pixels = (pixels * region.to(pixels.device).round().to(torch.uint8)).to(torch.uint8)
            empty = region.flatten(1).sum(dim=1).cpu() == 0
        scores = []
        with torch.no_grad():
            for image, prompt, skip in zip(pixels, prompts, empty, strict=True):
                if skip:
                    scores.append(float("nan"))
                    continue
                self._metric.reset()
                scores.append(float(self._metric(image.to(self.device), prompt)))
        self._metric.reset()
        return torch.tensor(scores, dtype=torch.float32)


class StructureDistance:
    """The reference's DINO self-similarity structure distance; ``model`` is a Hugging Face id of a ViT (local
    cache only) or a directory with a saved ``ViTModel``."""

    def __init__(self, model: str = DINO_MODEL, mode: str = "auto", device: str | torch.device = "cpu"):
        self.model_name = model
        self.device = torch.device(device)
        self._vit = _load("Structure distance (DINO)", model, mode, self._build)

    def _build(self, local: Path) -> torch.nn.Module:
        from transformers import ViTModel

        vit = ViTModel.from_pretrained(local, add_pooling_layer=False, layer_norm_eps=DINO_LAYER_NORM_EPS)
        return vit.eval().to(self.device)

    @property
    def available(self) -> bool:
        return self._vit is not None

    def _key_projection(self) -> torch.nn.Module:
        layers = getattr(self._vit, "layers", None)  # transformers 5; 4.x: encoder.layer
        last = (layers if layers is not None else self._vit.encoder.layer)[-1]
        for name, module in last.named_modules():
            if name.endswith(("k_proj", "attention.key")):
                return module
        raise RuntimeError(f"no key projection found in the last block of {self.model_name}")

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        size = self._vit.config.image_size
        x = images.to(self.device, torch.float32) * STRUCTURE_INPUT_SCALE
        height, width = x.shape[-2:]
        scale = size / min(height, width)
        x = F.interpolate(
            x, size=(round(height * scale), round(width * scale)), mode="bilinear", align_corners=False
        )
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def self_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, T, T)`` cosine self-similarity of the last block's keys (all heads concatenated)."""
        keys: list[torch.Tensor] = []
        handle = self._key_projection().register_forward_hook(lambda _m, _i, out: keys.append(out))
        try:
            with torch.no_grad():
                x = self._prepare(images)
                interpolate = tuple(x.shape[-2:]) != (self._vit.config.image_size,) * 2
                self._vit(pixel_values=x, interpolate_pos_encoding=interpolate)
        finally:
            handle.remove()
        k = keys[0]  # (B, T, D)
        norms = k.norm(dim=2, keepdim=True)
        return (k @ k.transpose(1, 2)) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)

    def __call__(self, edited: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 structure distance between edited and source images (whole frames)."""
        if self._vit is None:
            return _nan(len(edited))
        a, b = self.self_similarity(edited), self.self_similarity(source)
        return (a - b).pow(2).flatten(1).mean(dim=1).float().cpu()


class EditMetrics:
    """Every editing metric of one row batch; build once per run (loads LPIPS, CLIP and DINO once)."""

    def __init__(
        self,
        lpips_net: str = "squeeze",
        lpips: str = "auto",
        clip_model: str = CLIP_MODEL,
        clip: str = "auto",
        structure_model: str = DINO_MODEL,
        structure: str = "auto",
        device: str | torch.device = "cpu",
    ):
        self.image_metrics = ImageMetrics(lpips_net=lpips_net, lpips=lpips, device=device)
        self.clip = ClipSimilarity(clip_model, clip, device)
        self.structure = StructureDistance(structure_model, structure, device)

    def __call__(
        self, edited: torch.Tensor, source: torch.Tensor, masks: torch.Tensor, target_prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Per-row ``(B,)`` tensors: ``psnr_unedited``, ``lpips_unedited``, ``mse_unedited``,
        ``ssim_unedited``, ``clip_whole``, ``clip_edited``, ``structure_distance``, ``unedited_pixels``,
        ``edited_pixels`` (region sizes at R, for counting empty regions)."""
        _check(edited, masks)
        if edited.shape != source.shape:
            raise ValueError(f"edited {tuple(edited.shape)} and source {tuple(source.shape)} differ in shape")
        masks = (masks > 0.5).to(torch.float32)
        unedited = region_metrics(edited, source, 1.0 - masks, self.image_metrics)
        return {
            **{f"{k}_unedited": v for k, v in unedited.items()},
            "clip_whole": self.clip(edited, target_prompts),
            "clip_edited": self.clip(edited, target_prompts, region=masks),
            "structure_distance": self.structure(edited, source),
            "unedited_pixels": (1.0 - masks).flatten(1).sum(dim=1).cpu(),
            "edited_pixels": masks.flatten(1).sum(dim=1).cpu(),
        }


def empty_region_counts(unedited_pixels: Sequence[float], edited_pixels: Sequence[float]) -> dict[str, int]:
    """How many rows had an empty unedited region (their unedited metrics are NaN) or an empty edit region
    (their ``clip_edited`` is NaN): ``{"empty_unedited": n, "empty_edited": m, "rows": total}``."""
    unedited = torch.as_tensor(list(unedited_pixels), dtype=torch.float64)
    edited = torch.as_tensor(list(edited_pixels), dtype=torch.float64)
    return {
        "empty_unedited": int((unedited == 0).sum()),
        "empty_edited": int((edited == 0).sum()),
        "rows": len(unedited),
    }


class MaskedEditScorer(Scorer):
    """PIE-Bench's masked metrics as a data set's scorer (``scorers: [pie_masked]``): :class:`EditMetrics` of
    rows whose every input item carries an edit mask (``PieItem.mask``), against each row's target prompt;
    ``summary`` counts the rows with an empty unedited or edit region."""

    name = "pie_masked"
    columns = (*UNEDITED_METRICS, "clip_whole", "clip_edited", "structure_distance")

    def __init__(self, context: ScoringContext) -> None:
        super().__init__(context)
        self._metrics: EditMetrics | None = None  # built on the first annotated batch (loads LPIPS, CLIP, DINO)
        self.counts = {"empty_unedited": 0, "empty_edited": 0, "rows": 0}

    def score(self, batch: ScoreBatch) -> dict[str, list[float]]:
        items = batch.items or []
        if batch.generated or not items or not all(getattr(it, "mask", None) is not None for it in items):
            return {}
        if self._metrics is None:
            ctx = self.context
            self._metrics = EditMetrics(lpips_net=ctx.lpips_net, lpips=ctx.lpips, device=ctx.device)
        masks = torch.stack([it.mask for it in items])  # (B, 1, R, R)
        scores = self._metrics(batch.results, batch.sources, masks, list(batch.prompts))
        counts = empty_region_counts(
            scores.pop("unedited_pixels").tolist(), scores.pop("edited_pixels").tolist()
        )
        self.counts = {k: self.counts[k] + v for k, v in counts.items()}
        return {k: [float(x) for x in v] for k, v in scores.items()}

    def summary(self) -> dict[str, int]:
        return dict(self.counts)
