"""PIE-Bench-format data through the engine: each image edited to its own target, editing metrics, protocol."""

from __future__ import annotations

import math

import pytest
import torch

from ddim_lab.config.compose import compose_config
from ddim_lab.config.validate import validate
from ddim_lab.errors import ConfigError
from ddim_lab.study.runner import Runner, load_items


def cfg_for(*overrides: str):
    return compose_config(
        [
            "data=digits-pie",
            "task=edit",
            "num_steps=8",
            "guidance_scale=[1,5]",
            "metrics.lpips=off",
            "runtime.device=cpu",
            "runtime.progress=false",
            "cache.enabled=false",
            *overrides,
        ]
    )


def test_each_image_is_edited_to_its_own_target_and_scored_on_the_unedited_region(digits):
    cfg = cfg_for("data.categories=[1]")
    validate(cfg)  # task=edit needs no edit_prompt on annotated data
    items = load_items(cfg, digits.resolution)
    assert len(items) == 10 and all(it.editing_type == "1" for it in items)
    runner = Runner(cfg, digits)
    runner.set_protocol(items)
    rows, columns = runner.run_group(items[:2])
    assert [r["edit_prompt"] for r in rows] == [it.target_prompt for it in items[:2] for _ in range(2)]
    assert all(r["edit_prompt"] != r["prompt"] for r in rows)
    assert {r["protocol"] for r in rows} == {runner.protocol.id()}
    for r in rows:
        assert math.isfinite(r["psnr_unedited"]) and math.isfinite(r["ssim_unedited"])
        assert r["edit_success"] in (0.0, 1.0)
        assert math.isnan(r["clip_whole"])  # no CLIP weights offline: NaN, never a made-up number
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    summary = runner.summary(2)
    assert summary["protocol"]["protocol"] == runner.protocol.id() and summary["empty_unedited"] == 0
    assert any("target" in label for label in columns)


def test_protocol_follows_the_image_subset(digits):
    everything = Runner(cfg_for(), digits)
    everything.set_protocol(load_items(cfg_for(), digits.resolution))
    subset = Runner(cfg_for("data.categories=[0]"), digits)
    subset.set_protocol(load_items(cfg_for("data.categories=[0]"), digits.resolution))
    assert everything.protocol.id() != subset.protocol.id()


def test_edit_without_prompt_on_plain_folders_is_still_an_error():
    cfg = compose_config(["task=edit", "data=photos"])  # the digits data name their own target (an eight)
    with pytest.raises(ConfigError, match="edit_prompt"):
        validate(cfg)


def test_an_explicit_edit_prompt_overrides_the_annotation(digits):
    cfg = cfg_for("edit_prompt=a handwritten digit one")
    runner = Runner(cfg, digits)
    items = load_items(cfg, digits.resolution)[:1]
    rows, _ = runner.run_group(items)
    assert {r["edit_prompt"] for r in rows} == {"a handwritten digit one"}
    assert torch.isfinite(torch.tensor([r["psnr_unedited"] for r in rows])).all()
