"""Tests for ddim_lab.metrics.image against scikit-image, the lpips package and the offline LPIPS policy."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import ddim_lab
from ddim_lab.data.folders import load_dataset
from ddim_lab.metrics.image import (
    LPIPS_BACKBONE_ARCHS,
    LPIPS_BACKBONE_FILES,
    ImageMetrics,
    LpipsUnavailable,
    lpips_backbone_path,
    mse,
    psnr,
    ssim,
    upsample_for_lpips,
)

ASSETS = Path(ddim_lab.__file__).parent / "assets"
PSNR_TOL = 1e-4  # dB; float64 on both sides, observed ~1e-6
SSIM_TOL = 1e-5  # SSIM runs in float32; observed ≤ 2e-6 at 64 px, ~5e-6 at 256 px
LPIPS_TOL = 1e-4


def use_torch_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point $TORCH_HOME and torch.hub's directory at ``home`` (both undone by the monkeypatch)."""
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # registers the restore for set_dir below
    torch.hub.set_dir(str(home / "hub"))


def no_download(*args, **kwargs):
    raise AssertionError(f"a download was attempted: {args}")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The bundled photographs at 64 px, (N, 3, 64, 64)."""
    return torch.stack([item.image for item in load_dataset(ASSETS / "photos", 64, "")])


def degrade(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A blurred, noisy copy in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    blurred = torchvision.transforms.functional.gaussian_blur(images, kernel_size=5, sigma=1.0)
    return (blurred + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).double().numpy()


def skimage_ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    return structural_similarity(
        hwc(target),
        hwc(pred),
        channel_axis=2,
        data_range=1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


@pytest.fixture(scope="module")
def fake_torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding a random-weight AlexNet checkpoint under torchvision's file name.

    torchvision's ``alexnet(weights=...)`` loads the whole ``AlexNet`` state dict (features + classifier)
    strictly, so the file must be a full ``torchvision.models.alexnet().state_dict()``.
    """
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        state = torchvision.models.alexnet().state_dict()
    torch.save(state, checkpoints / LPIPS_BACKBONE_FILES["alex"])
    return home


@pytest.fixture(scope="module")
def lpips_pair(fake_torch_home):
    """(ImageMetrics with real LPIPS, the lpips package's model or None), both built from the fake backbone."""
    import lpips

    with pytest.MonkeyPatch.context() as patch:
        use_torch_home(patch, fake_torch_home)
        patch.setattr(torch.hub, "download_url_to_file", no_download)
        metrics = ImageMetrics(lpips_net="alex", lpips="required")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" inside lpips
            reference = lpips.LPIPS(net="alex", pretrained=True, verbose=False).eval()
    return metrics, reference


def test_backbone_file_names_are_torchvision_defaults():
    for net, arch in LPIPS_BACKBONE_ARCHS.items():
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        assert os.path.basename(urlparse(url).path) == LPIPS_BACKBONE_FILES[net]


def test_backbone_path_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert lpips_backbone_path("vgg") == tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(ValueError, match="unknown"):
        lpips_backbone_path("resnet")


def test_mse_per_row():
    a = torch.zeros(3, 2, 4, 4)
    b = torch.zeros(3, 2, 4, 4)
    b[1] = 0.5
    b[2, 0, 0, 0] = 1.0
    assert torch.allclose(mse(a, b), torch.tensor([0.0, 0.25, 1.0 / 32]))
    with pytest.raises(ValueError):
        mse(a, b[:2])


def test_psnr_and_ssim_match_skimage_on_photos(photos):
    pred = degrade(photos)
    metrics = ImageMetrics(lpips="off")
    values = metrics(pred, photos)
    assert set(values) == {"psnr", "ssim", "lpips"}
    for k in range(len(photos)):
        expected_psnr = peak_signal_noise_ratio(hwc(photos[k]), hwc(pred[k]), data_range=1)
        assert abs(float(values["psnr"][k]) - expected_psnr) < PSNR_TOL
        assert abs(float(values["ssim"][k]) - skimage_ssim(pred[k], photos[k])) < SSIM_TOL
    assert torch.isnan(values["lpips"]).all()


def test_rows_are_per_image_not_pooled(photos):
    pred = degrade(photos)
    batch_psnr, batch_ssim = psnr(pred, photos), ssim(pred, photos)
    assert batch_psnr.shape == batch_ssim.shape == (len(photos),)
    assert len(set(batch_psnr.round(decimals=3).tolist())) == len(photos)
    assert len(set(batch_ssim.round(decimals=3).tolist())) == len(photos)
    for k in range(len(photos)):
        assert torch.allclose(psnr(pred[k : k + 1], photos[k : k + 1]), batch_psnr[k : k + 1], atol=1e-9)
        assert torch.allclose(ssim(pred[k : k + 1], photos[k : k + 1]), batch_ssim[k : k + 1], atol=1e-6)
    pooled = 10 * math.log10(1 / float(mse(pred, photos).mean()))
    assert abs(float(batch_psnr.mean()) - pooled) > 0.01


def test_ssim_matches_skimage_at_16_px():
    items = load_dataset(ASSETS / "digits-heldout", 16, "")
    target = torch.stack([item.image for item in items[:6]])
    pred = degrade(target, seed=3)
    values = ssim(pred, target)
    for k in range(len(target)):
        assert abs(float(values[k]) - skimage_ssim(pred[k], target[k])) < SSIM_TOL


def test_identical_images(photos):
    values = ImageMetrics(lpips="off")(photos[:2], photos[:2].clone())
    assert torch.isinf(values["psnr"]).all() and (values["psnr"] > 0).all()
    assert torch.allclose(values["ssim"], torch.ones(2), atol=1e-6)


def test_inputs_are_validated(photos):
    metrics = ImageMetrics(lpips="off")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics(photos[:1] * 2 - 1, photos[:1])
    with pytest.raises(ValueError, match="shape"):
        metrics(photos[:1], photos[:2])
    with pytest.raises(ValueError, match="11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_upsample_for_lpips_keeps_aspect_and_large_images():
    small = torch.rand(2, 3, 16, 24)
    assert upsample_for_lpips(small).shape == (2, 3, 64, 96)
    large = torch.rand(1, 3, 64, 70)
    assert upsample_for_lpips(large) is large


def test_missing_backbone_auto_warns_once_and_gives_nan(tmp_path, monkeypatch, caplog, photos):
    use_torch_home(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    metrics = ImageMetrics(lpips_net="alex", lpips="auto")
    assert not metrics.lpips_available
    with caplog.at_level(logging.WARNING, logger="ddim_lab.metrics.image"):
        for _ in range(3):
            values = metrics(photos[:2], degrade(photos[:2]))
            assert values["lpips"].shape == (2,) and torch.isnan(values["lpips"]).all()
            assert torch.isfinite(values["psnr"]).all()
    warned = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warned) == 1
    message = warned[0].getMessage()
    expected_path = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert str(expected_path) in message and "TORCH_HOME" in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert not (tmp_path / "hub").exists()  # torch.hub was never asked to fetch anything


def test_missing_backbone_required_raises(tmp_path, monkeypatch):
    use_torch_home(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(LpipsUnavailable, match="squeezenet1_1-b8a52dc0.pth"):
        ImageMetrics(lpips_net="squeeze", lpips="required")


def test_lpips_off_is_silent(fake_torch_home, monkeypatch, caplog, photos):
    use_torch_home(monkeypatch, fake_torch_home)
    metrics = ImageMetrics(lpips="off")
    with caplog.at_level(logging.WARNING):
        values = metrics(photos[:1], photos[1:2])
    assert not metrics.lpips_available
    assert torch.isnan(values["lpips"]).all() and not caplog.records


def test_bad_lpips_mode():
    with pytest.raises(ValueError, match="lpips"):
        ImageMetrics(lpips="sometimes")


def test_lpips_loads_the_file_in_the_hub_dir(lpips_pair, fake_torch_home):
    metrics, _ = lpips_pair
    assert metrics.lpips_available
    saved = torch.load(fake_torch_home / "hub" / "checkpoints" / LPIPS_BACKBONE_FILES["alex"], mmap=True)
    first_conv = metrics._lpips.net.net.slice1[0].weight
    assert torch.equal(first_conv.cpu(), saved["features.0.weight"])


def test_lpips_properties(lpips_pair, photos):
    metrics, _ = lpips_pair
    target = photos[:3]
    pred = degrade(target)
    same = metrics.lpips(target, target.clone())
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    forward, backward = metrics.lpips(pred, target), metrics.lpips(target, pred)
    assert torch.isfinite(forward).all() and (forward > 1e-4).all()
    assert torch.allclose(forward, backward, atol=1e-6)
    assert len(set(forward.round(decimals=5).tolist())) == 3
    for k in range(3):
        assert torch.allclose(metrics.lpips(pred[k : k + 1], target[k : k + 1]), forward[k : k + 1], atol=1e-6)
    assert torch.equal(metrics(pred, target)["lpips"], forward)


def test_lpips_small_images_are_upsampled(lpips_pair):
    metrics, _ = lpips_pair
    items = load_dataset(ASSETS / "digits-heldout", 16, "")
    target = torch.stack([item.image for item in items[:4]])
    pred = degrade(target, seed=1)
    values = metrics(pred, target)["lpips"]
    assert torch.isfinite(values).all() and (values > 0).all()
    big = [F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False) for x in (pred, target)]
    assert torch.allclose(values, metrics.lpips(*big), atol=1e-6)


def test_lpips_matches_lpips_package(lpips_pair, photos):
    metrics, reference = lpips_pair
    target = photos
    pred = degrade(target, seed=2)
    ours = metrics.lpips(pred, target)
    with torch.no_grad():
        theirs = reference(pred * 2 - 1, target * 2 - 1).reshape(-1)
    assert torch.allclose(ours, theirs, atol=LPIPS_TOL, rtol=0)
