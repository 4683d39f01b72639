"""The digits training script runs end to end on a few steps and its output loads like any SD model."""

from __future__ import annotations

import json

import torch

from ddim_lab.models.loading import load_model
from tests.conftest import ROOT
from tests.test_cli import as_main, run_here


def test_training_script_smoke_run_produces_a_loadable_model(tmp_path):
    out = tmp_path / "model"
    args = [
        "vae.steps=3",
        "unet.steps=3",
        "unet.warmup=1",
        "log_every=1",
        "threads=1",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    script = ROOT / "scripts" / "train_digits.py"
    # `python SCRIPT ARGS`, run in this process
    proc = run_here(as_main(script), [str(script), *args], tmp_path, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unet step 3/3" in proc.stderr
    stats = json.loads((out / "train_stats.json").read_text())
    assert (stats["vae_steps"], stats["unet_steps"], stats["train_images"], stats["held_out_images"]) == (
        3,
        3,
        1437,
        360,
    )
    model = load_model({"name": "smoke", "source": "local", "path": str(out)}, {"device": "cpu"}, tmp_path)
    assert model.resolution == 16 and abs(model.scaling_factor - stats["scaling_factor"]) < 1e-6
    latents = model.encode(torch.rand(2, 3, 16, 16))
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
