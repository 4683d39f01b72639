"""Editing metrics: masked metrics by hand, the NaN rule, CLIPScore and DINO paths on tiny random models."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from ddim_lab.data import digits
from ddim_lab.data.pie import load_pie
from ddim_lab.metrics import edit as edit_metrics
from ddim_lab.metrics.edit import (
    ClipSimilarity,
    EditMetrics,
    StructureDistance,
    WeightsUnavailable,
    empty_region_counts,
    region_metrics,
    to_uint8,
)
from tests.conftest import ROOT

MISSING = "ddim-lab-tests/no-such-model"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor (offline tokenizer) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ddim_lab.models.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_tokenizer(digits.WORDS)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, **small
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny random ViT (the DINO architecture at 32 px, patch 8) saved with save_pretrained."""
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("tiny_vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture
def fresh_notices(monkeypatch):
    monkeypatch.setattr(edit_metrics, "_NOTIFIED", set())


def _pair(seed: int = 0, size: int = 12):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)
    region = torch.zeros(2, 1, size, size)
    region[0, :, 2:9, 3:11] = 1
    region[1, :, :, :5] = 1
    return a, b, region


def test_region_metrics_match_a_hand_computed_reference():
    a, b, region = _pair()
    got = region_metrics(a, b, region)
    for i in range(2):
        pa, pb = (a[i] * region[i]).double(), (b[i] * region[i]).double()
        mse = float(((pa - pb) ** 2).mean())  # over the whole frame: zeros outside the region count
        assert got["mse"][i] == pytest.approx(mse, rel=1e-5)
        assert got["psnr"][i] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
        ssim = structural_similarity(
            pa.permute(1, 2, 0).numpy(),
            pb.permute(1, 2, 0).numpy(),
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert got["ssim"][i] == pytest.approx(ssim, abs=1e-4)
    assert torch.isnan(got["lpips"]).all()  # no LPIPS given


def test_region_metrics_hand_lpips_the_masked_images():
    a, b, region = _pair()
    seen = []

    class Recorder:
        def lpips(self, x, y):
            seen.append((x, y))
            return torch.tensor([0.25, 0.5])

    got = region_metrics(a, b, region, Recorder())
    assert torch.equal(seen[0][0], a * region) and torch.equal(seen[0][1], b * region)
    assert got["lpips"].tolist() == [0.25, 0.5]


def test_empty_region_gives_nan_and_is_counted():
    a, b, region = _pair()
    region[1] = 0
    got = region_metrics(a, b, region)
    for name in ("psnr", "mse", "ssim", "lpips"):
        assert not torch.isnan(got[name][0]) or name == "lpips"
        assert torch.isnan(got[name][1])
    metrics = EditMetrics(lpips="off", clip="off", structure="off")
    masks = torch.zeros(3, 1, 12, 12)
    masks[0] = 1  # all edited: nothing unedited left
    masks[1, :, 4:8, 4:8] = 1
    scores = metrics(torch.rand(3, 3, 12, 12), torch.rand(3, 3, 12, 12), masks, ["x"] * 3)
    for name in edit_metrics.UNEDITED_METRICS:
        assert torch.isnan(scores[name][0]) and not torch.isnan(scores[name][1]) or name == "lpips_unedited"
    counts = empty_region_counts(scores["unedited_pixels"].tolist(), scores["edited_pixels"].tolist())
    assert counts == {"empty_unedited": 1, "empty_edited": 1, "rows": 3}


def test_identical_images_and_shape_checks():
    a, _, region = _pair()
    got = region_metrics(a, a.clone(), region)
    assert torch.isinf(got["psnr"]).all() and (got["mse"] == 0).all()
    assert torch.allclose(got["ssim"], torch.ones(2))
    with pytest.raises(ValueError, match="mask size"):
        region_metrics(a, a, region[:, :, :8])


def test_clip_score_real_path_with_a_tiny_model(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    clip = ClipSimilarity(str(clip_dir))
    assert clip.available
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a handwritten digit eight", "digit three"]
    region = torch.zeros(2, 1, 16, 16)
    region[0, :, 4:12, 4:12] = 1  # row 1: empty edit region
    whole, masked = clip(images, prompts), clip(images, prompts, region=region)

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)

    def reference(pixels: torch.Tensor, prompt: str) -> float:
        with torch.no_grad():
            pixel_values = processor(images=[pixels], return_tensors="pt")["pixel_values"]
            image = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
            text_in = processor(text=[prompt], return_tensors="pt", padding=True)
            text = model.text_projection(model.text_model(**text_in).pooler_output)
        return max(100 * float(F.cosine_similarity(image, text)), 0.0)

    pixels = to_uint8(images)
    for i in range(2):
        assert whole[i] == pytest.approx(reference(pixels[i], prompts[i]), abs=1e-3)
    assert masked[0] == pytest.approx(reference(pixels[0] * region[0].to(torch.uint8), prompts[0]), abs=1e-3)
    assert torch.isnan(masked[1])
    assert masked[0] != pytest.approx(float(whole[0]), abs=1e-3)


def test_structure_distance_matches_the_reference_definition(vit_dir):
    from transformers import ViTModel

    structure = StructureDistance(str(vit_dir))
    assert structure.available
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    assert torch.equal(structure(a, a.clone()), torch.zeros(2))
    got = structure(a, b)

    vit = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False, layer_norm_eps=1e-6).eval()

    def self_sim(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x * 255.0, size=(32, 32), mode="bilinear", align_corners=False)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        with torch.no_grad():
            hidden = vit(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # into the last block
            last = vit.layers[-1]
            keys = last.attention.k_proj(last.layernorm_before(hidden))
        unit = keys / keys.norm(dim=2, keepdim=True)
        return unit @ unit.transpose(1, 2)

    expected = (self_sim(a) - self_sim(b)).pow(2).flatten(1).mean(dim=1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7) and (got > 0).all()


def test_missing_weights_give_nan_and_one_message(fresh_notices, caplog):
    images = torch.rand(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="ddim_lab.metrics.edit"):
        clip = ClipSimilarity(MISSING)
        again = ClipSimilarity(MISSING)
        structure = StructureDistance(MISSING + "-dino")
    assert not clip.available and torch.isnan(clip(images, ["a", "b"])).all() and not again.available
    assert torch.isnan(structure(images, images)).all()
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 2  # once per model and process
    assert "CLIP similarity is unavailable" in notices[0] and MISSING in notices[0]
    assert "huggingface-cli download" in notices[0] and "NaN" in notices[0]
    assert "Structure distance (DINO)" in notices[1]


def test_missing_weights_required_raises_and_off_is_silent(fresh_notices, caplog):
    with pytest.raises(WeightsUnavailable, match=MISSING):
        ClipSimilarity(MISSING, mode="required")
    with caplog.at_level(logging.WARNING, logger="ddim_lab.metrics.edit"):
        assert not StructureDistance(MISSING, mode="off").available
    assert not caplog.records
    with pytest.raises(ValueError, match="mode"):
        ClipSimilarity(MISSING, mode="maybe")


def test_edit_metrics_on_the_digits_mini_benchmark(clip_dir, vit_dir):
    items = load_pie(ROOT / "ddim_lab" / "assets" / "digits-pie", 16)[:4]
    source = torch.stack([it.image for it in items])
    masks = torch.stack([it.mask for it in items])
    metrics = EditMetrics(lpips="off", clip_model=str(clip_dir), structure_model=str(vit_dir))
    same = metrics(source, source.clone(), masks, [it.target_prompt for it in items])
    assert torch.isinf(same["psnr_unedited"]).all() and (same["mse_unedited"] == 0).all()
    assert torch.allclose(same["ssim_unedited"], torch.ones(4)) and (same["structure_distance"] == 0).all()
    assert torch.isfinite(same["clip_whole"]).all() and torch.isfinite(same["clip_edited"]).all()
    edited = source.flip(-1)  # a different image: finite, worse background scores
    other = metrics(edited, source, masks, [it.target_prompt for it in items])
    assert torch.isfinite(other["psnr_unedited"]).all() and (other["mse_unedited"] > 0).all()
    assert np.all(np.isnan(other["lpips_unedited"].numpy()))
    assert empty_region_counts(other["unedited_pixels"].tolist(), other["edited_pixels"].tolist())["rows"] == 4
