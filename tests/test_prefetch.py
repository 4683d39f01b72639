"""``ddim-lab-prefetch --check``: offline, it lists what a config needs as present or missing, with sizes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ddim_lab import prefetch
from ddim_lab.metrics import lpips_backbone_path


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch caches under tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def fake_hub_model(root, model_id: str, files: dict[str, bytes]) -> None:
    repo = root / "hf" / f"models--{model_id.replace('/', '--')}"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ddim_lab.prefetch"]


def test_check_lists_missing_hub_model_and_lpips_backbone(caches, caplog):
    with caplog.at_level(logging.INFO, logger="ddim_lab.prefetch"):
        code = prefetch.main(["--check", "model=sd15"])
    out = lines(caplog)
    assert code == 1
    assert any(
        line.startswith("missing  hub model stable-diffusion-v1-5/stable-diffusion-v1-5") for line in out
    )
    assert any(line.startswith("missing  LPIPS backbone alex") and "MB" in line for line in out)


def test_check_finds_a_complete_pipeline_and_the_backbone(caches, caplog):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    fake_hub_model(
        caches,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        {
            "model_index.json": json.dumps(index).encode(),
            "unet/config.json": b"{}",
            "unet/diffusion_pytorch_model.safetensors": b"0" * 4096,
        },
    )
    backbone = lpips_backbone_path("alex")
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(b"0" * 2048)
    with caplog.at_level(logging.INFO, logger="ddim_lab.prefetch"):
        code = prefetch.main(["--check", "model=sd15"])
    out = lines(caplog)
    assert code == 0, out
    assert any(line.startswith("present  hub model") and "4.1 KB" in line for line in out)
    assert any(line.startswith("present  LPIPS backbone alex") and "2.0 KB" in line for line in out)


def test_alpha_plot_needs_only_the_scheduler_config(caches, caplog):
    with caplog.at_level(logging.INFO, logger="ddim_lab.prefetch"):
        assert prefetch.main(["--check", "model=sd15", "task=alpha_plot"]) == 1
    assert lines(caplog)[0].startswith(
        "missing  hub file stable-diffusion-v1-5/stable-diffusion-v1-5/scheduler/"
    )
    fake_hub_model(
        caches, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"scheduler/scheduler_config.json": b"{}"}
    )
    assert prefetch.main(["--check", "model=sd15", "task=alpha_plot"]) == 0


def test_shipped_model_needs_nothing_and_bad_overrides_are_one_line(caches, caplog):
    assert prefetch.main(["--check", "metrics.lpips=off"]) == 0
    with caplog.at_level(logging.ERROR, logger="ddim_lab.prefetch"):
        assert prefetch.main(["--check", "model=sd51"]) == 2
    assert "model=sd51" in lines(caplog)[-1]
