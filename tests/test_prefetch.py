"""``ddim-lab-prefetch --check``: offline, it prints what a config needs as a table on stdout (present or
missing, required or optional, with sizes) and fails only when a required item is missing."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ddim_lab.cli import prefetch
from ddim_lab.metrics.image import lpips_backbone_path


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


def rows(capsys) -> list[list[str]]:
    """The table printed on stdout, as rows of words (the header and the verdict line included)."""
    return [line.split() for line in capsys.readouterr().out.splitlines()]


def row_of(table: list[list[str]], kind: str) -> list[str]:
    (row,) = [r for r in table if " ".join(r[2:]).startswith(kind)]
    return row


def test_check_lists_missing_hub_model_and_lpips_backbone(caches, capsys):
    code = prefetch.main(["--check", "model=sd15"])
    table = rows(capsys)
    assert code == 1  # the model is required
    assert table[0][:4] == ["status", "need", "kind", "name"]
    model = row_of(table, "hub model")
    assert model[:2] == ["missing", "required"] and "stable-diffusion-v1-5/stable-diffusion-v1-5" in model
    lpips = row_of(table, "LPIPS backbone")
    assert lpips[:2] == ["missing", "optional"] and "MB" in " ".join(lpips) and "NaN" in " ".join(lpips)
    assert " ".join(table[-1]).startswith("NOT READY: 1 required item(s) missing (hub model")
    assert "1 optional item(s) missing (LPIPS backbone" in " ".join(table[-1])


def test_only_optional_items_missing_is_ready(caches, capsys):
    """The shipped model needs nothing; the absent LPIPS backbone, which runs tolerate, does not fail it."""
    assert prefetch.main(["--check", "model=digits"]) == 0
    table = rows(capsys)
    assert row_of(table, "shipped model")[:2] == ["present", "required"]
    assert row_of(table, "LPIPS backbone")[:2] == ["missing", "optional"]
    assert " ".join(table[-1]).startswith("ready: every required item of 2 is present; 1 optional item(s)")
    assert prefetch.main(["--check", "model=digits", "metrics.lpips=required"]) == 1  # then it is required
    assert row_of(rows(capsys), "LPIPS backbone")[:2] == ["missing", "required"]


def test_check_finds_a_complete_pipeline_and_the_backbone(caches, capsys):
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
    code = prefetch.main(["--check", "model=sd15"])
    table = rows(capsys)
    assert code == 0, table
    assert row_of(table, "hub model")[0] == "present" and "4.1 KB" in " ".join(row_of(table, "hub model"))
    assert row_of(table, "LPIPS backbone")[0] == "present" and "2.0 KB" in " ".join(row_of(table, "LPIPS"))
    assert " ".join(table[-1]) == "ready: every required item of 2 is present"


def test_alpha_plot_needs_only_the_scheduler_config(caches, capsys):
    assert prefetch.main(["--check", "model=sd15", "task=alpha_plot"]) == 1
    table = rows(capsys)
    assert len(table) == 3 and table[1][:4] == ["missing", "required", "hub", "file"]
    assert table[1][4].startswith("stable-diffusion-v1-5/stable-diffusion-v1-5/scheduler/")
    fake_hub_model(
        caches, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"scheduler/scheduler_config.json": b"{}"}
    )
    assert prefetch.main(["--check", "model=sd15", "task=alpha_plot"]) == 0


def test_shipped_model_needs_nothing_and_bad_overrides_are_one_line(caches, caplog):
    assert prefetch.main(["--check", "metrics.lpips=off"]) == 0
    with caplog.at_level(logging.ERROR, logger="ddim_lab.cli.prefetch"):
        assert prefetch.main(["--check", "model=sd51"]) == 2
    assert "model=sd51" in [r.getMessage() for r in caplog.records if r.name == "ddim_lab.cli.prefetch"][-1]
