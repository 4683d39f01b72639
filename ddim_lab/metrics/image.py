"""Per-image reconstruction metrics (PSNR, SSIM, LPIPS, MSE) on ``[0, 1]`` NCHW tensors.

- PSNR: ``data_range=1``, one value per image (the mean of per-image PSNR is not the PSNR of pooled MSE).
  Identical images give ``inf``.
- SSIM: Wang et al.'s definition as in scikit-image (``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1``) and older torchmetrics: an 11×11 Gaussian window, averaged
  only where the window fits inside the image. Since PR #2721 (2024) torchmetrics averages its SSIM map over
  the whole reflect-padded image instead, which differs (on blurred, noisy photos by 0.04–0.13 at 16 px and
  ~0.005 at 256 px), so we take its full map and drop the 5-pixel border ourselves. Needs at least 11 px
  per side; at 16 px (the digits model) the mean covers the central 6×6 pixels. SSIM runs in float32
  (within ~1e-5 of float64), PSNR in float64.
- LPIPS: torchmetrics' implementation (``normalize=True``, inputs in [0, 1]) with an ImageNet backbone.
  Images smaller than 64 px on their shorter side are first upsampled bilinearly (both images, the same way,
  aspect ratio kept) so that the shorter side is 64 px, for every backbone: the strided convolutions and
  poolings shrink small inputs to nothing (AlexNet fails below 31 px, SqueezeNet below 17).

The LPIPS linear layers ship inside torchmetrics, but the backbone is torchvision's pretrained checkpoint,
looked up in ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``). This module checks for
that file itself and never lets torchvision try to download it: with ``lpips="auto"`` a missing file gives a
one-line warning, once per process (and backbone file), and NaN values, with ``"required"`` it raises
:class:`LpipsUnavailable`, with ``"off"`` LPIPS is NaN without a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

logger = logging.getLogger(__name__)

LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
LPIPS_BACKBONE_ARCHS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
LPIPS_MODES = ("auto", "required", "off")
LPIPS_MIN_SIZE = 64
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # torchmetrics: 2 * int(3.5 * sigma + 0.5) + 1, as in scikit-image


_NOTIFIED: set[Path] = set()  # backbone files whose absence this process has already reported


def lpips_missing_notice(net: str) -> str:
    """The one-line notice for ``metrics.lpips=auto`` without the backbone file."""
    path = lpips_backbone_path(net)
    url = torchvision.models.get_model_weights(LPIPS_BACKBONE_ARCHS[net]).DEFAULT.url
    return (
        f"LPIPS ({net}) is unavailable: no {path} ($TORCH_HOME/hub/checkpoints; get it from {url} or with "
        "`ddim-lab-prefetch`); LPIPS is recorded as NaN, metrics.lpips=off silences this"
    )


class LpipsUnavailable(RuntimeError):
    """The LPIPS backbone checkpoint is not on disk (and will not be downloaded)."""


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision looks for the LPIPS backbone of ``net``: ``<torch hub dir>/checkpoints/<file>``."""
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(LPIPS_BACKBONE_FILES)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def lpips_missing_message(net: str) -> str:
    """Explain which LPIPS backbone file is missing, where it belongs and how to get it."""
    path = lpips_backbone_path(net)
    arch = LPIPS_BACKBONE_ARCHS[net]
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return (
        f"LPIPS ({net}) is unavailable: torchvision's ImageNet backbone {path.name} is not in {path.parent}. "
        f"Put the file at {path} (that folder is $TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to "
        f"~/.cache/torch). Get it from {url}, e.g. on a machine with internet run "
        f"`python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"` and copy "
        f"~/.cache/torch/hub/checkpoints/{path.name} over. No download is attempted here."
    )


def _check_images(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(
            f"expected two NCHW tensors of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    for name, x in (("pred", pred), ("target", target)):
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} must hold finite values in [0, 1], got [{x.min():.4g}, {x.max():.4g}]")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared error: ``(B, ...)`` → ``(B,)``."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).pow(2).flatten(1).mean(dim=1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [0, 1] NCHW images, ``(B,)`` float64."""
    return peak_signal_noise_ratio(
        pred.double(), target.double(), data_range=1.0, dim=(1, 2, 3), reduction="none"
    ).reshape(-1)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (11×11 Gaussian window, sigma 1.5, border dropped) for [0, 1] NCHW images, ``(B,)``."""
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px per side, got {tuple(pred.shape)}")
    _, full = structural_similarity_index_measure(
        pred.float(), target.float(), sigma=SSIM_SIGMA, data_range=1.0, reduction="none", return_full_image=True
    )
    border = SSIM_WINDOW // 2
    return full[..., border:-border, border:-border].double().mean(dim=(1, 2, 3))


def upsample_for_lpips(x: torch.Tensor, min_size: int = LPIPS_MIN_SIZE) -> torch.Tensor:
    """Bilinearly upsample NCHW images whose shorter side is below ``min_size`` so it equals ``min_size``."""
    height, width = x.shape[-2:]
    short = min(height, width)
    if short >= min_size:
        return x
    size = (max(min_size, round(height * min_size / short)), max(min_size, round(width * min_size / short)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


class ImageMetrics:
    """PSNR, SSIM and LPIPS per image; see the module docstring for the LPIPS policy."""

    def __init__(self, lpips_net: str = "alex", lpips: str = "auto", device: str | torch.device = "cpu"):
        if lpips not in LPIPS_MODES:
            raise ValueError(f"lpips must be one of {LPIPS_MODES}, got {lpips!r}")
        self.lpips_net = lpips_net
        self.lpips_mode = lpips
        self.device = torch.device(device)
        self._backbone = lpips_backbone_path(lpips_net)
        self._warned = False
        self._lpips = None
        if lpips == "off":
            return
        if not self._backbone.is_file():
            if lpips == "required":
                raise LpipsUnavailable(lpips_missing_message(lpips_net))
            return
        self._lpips = self._build_lpips()

    def _build_lpips(self) -> torch.nn.Module:
        logger.debug("loading LPIPS (%s) backbone from %s", self.lpips_net, self._backbone)
        # reduction="none": compute() returns one value per image of the last update.
        metric = LearnedPerceptualImagePatchSimilarity(
            net_type=self.lpips_net, normalize=True, reduction="none"
        )
        return metric.to(self.device)

    @property
    def lpips_available(self) -> bool:
        """Whether LPIPS values are computed (False: they are NaN)."""
        return self._lpips is not None

    def lpips(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS ``(B,)`` float32 for [0, 1] NCHW images; NaN when the backbone is unavailable."""
        if self._lpips is None:
            if self.lpips_mode == "auto" and not self._warned:
                self._warned = True
                if self._backbone not in _NOTIFIED:
                    _NOTIFIED.add(self._backbone)
                    logger.warning("%s", lpips_missing_notice(self.lpips_net))
            return torch.full((pred.shape[0],), float("nan"), dtype=torch.float32)
        a = upsample_for_lpips(pred.to(self.device, torch.float32))
        b = upsample_for_lpips(target.to(self.device, torch.float32))
        with torch.no_grad():
            self._lpips.reset()
            self._lpips.update(a, b)
            values = self._lpips.compute()
            self._lpips.reset()
        return values.reshape(-1).float().cpu()

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"psnr", "ssim", "lpips"}``, each ``(B,)`` float32 on the CPU; inputs are [0, 1] NCHW."""
        _check_images(pred, target)
        pred = pred.to(self.device)
        target = target.to(self.device)
        return {
            "psnr": psnr(pred, target).float().cpu(),
            "ssim": ssim(pred, target).float().cpu(),
            "lpips": self.lpips(pred, target),
        }
