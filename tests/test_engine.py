"""The sweep engine: inversion cache key and entries, batched grids, UNet-evaluation accounting.

Everything runs on the ``tiny`` random-weight model, 8 DDIM steps, two held-out digits at 32 px.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pandas as pd
import pytest
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from ddim_lab.data.folders import Item, load_dataset
from ddim_lab.models.identity import fingerprint
from ddim_lab.models.loading import load_model
from ddim_lab.study.cache import InversionCache
from ddim_lab.study.loggers import LocalLogger
from ddim_lab.study.runner import Runner, reconstruct_or_edit
from tests.conftest import lab_config

DIGITS = Path(__file__).resolve().parents[1] / "ddim_lab" / "assets" / "digits-heldout"
STEPS = 8


def make_cfg(cache: Path | None, *overrides: str) -> DictConfig:
    """The lab's config composed like the CLI would, for the tiny model; ``cache=None`` disables the cache."""
    return lab_config(*overrides, steps=STEPS, cache=cache)


@pytest.fixture(scope="module")
def items(tiny) -> list[Item]:
    """Two different held-out digits (a zero and a one) at the tiny model's 32 px."""
    everything = load_dataset(DIGITS, tiny.resolution, "")
    return [everything[0], everything[2]]


def encode(model, items: list[Item]) -> torch.Tensor:
    return model.encode(torch.stack([it.image for it in items]))


def invert_all(runner: Runner, items: list[Item], x0: torch.Tensor) -> tuple[list[torch.Tensor], list[bool]]:
    """DDIM trajectories (M+1, C, h, w) per item and whether each came from the cache."""
    artifacts, costs = runner.artifacts(items, x0)
    n = range(len(items))
    return [artifacts[i, None]["trajectory"] for i in n], [costs[i, None][1] for i in n]


def sample_grid(runner: Runner, items: list[Item], trajectories: list[torch.Tensor]) -> torch.Tensor:
    return runner.sample_grid(items, {(i, None): {"trajectory": t} for i, t in enumerate(trajectories)})


def per_step(guidance: float) -> int:
    """Written out again here so that the test does not trust the engine's own helper."""
    return 1 if guidance in (0, 1) else 2


# -- 1. the cache key ------------------------------------------------------------------------------------


SAMPLING_SIDE = [
    ["guidance_scale=[1,7.5]"],
    ["start_step=[0,4]"],
    ["task=edit", "edit_prompt=[a dog,a cat]"],
    ["eta=0.5"],
    ["batch_size=2"],
    ["logger=wandb"],
    ["runtime.progress=true"],
    ["metrics.lpips_net=squeeze"],
    ["num_images=1"],
    ["seed=1"],  # DDIM inversion draws no randomness
]
INVERSION_SIDE = [
    ["runtime.dtype=bf16"],
    ["runtime.vae_fp32=false"],
    ["scheduler=ddim-trailing"],
    ["scheduler=ddim-linspace"],
    ["inverter=course"],
    [f"num_steps={STEPS + 2}"],
    ["inversion.guidance_scale=3.5"],
    ["negative_prompt=blurry"],
]


def _key(tiny, tmp_path: Path, item: Item, *overrides: str) -> str:
    return Runner(make_cfg(tmp_path, *overrides), tiny).inversion_key(item)


@pytest.mark.parametrize("overrides", SAMPLING_SIDE, ids=lambda o: " ".join(o))
def test_sampling_side_settings_keep_the_key(tiny, items, tmp_path, overrides):
    assert _key(tiny, tmp_path, items[0], *overrides) == _key(tiny, tmp_path, items[0])


@pytest.mark.parametrize("overrides", INVERSION_SIDE, ids=lambda o: " ".join(o))
def test_inversion_side_settings_change_the_key(tiny, items, tmp_path, overrides):
    assert _key(tiny, tmp_path, items[0], *overrides) != _key(tiny, tmp_path, items[0])


def test_key_follows_image_content_and_source_prompt_only(tiny, items, tmp_path):
    base = _key(tiny, tmp_path, items[0])
    renamed = dataclasses.replace(items[0], name="elsewhere/copy.png", path=tmp_path / "copy.png")
    assert _key(tiny, tmp_path, renamed) == base  # same pixels under another name
    assert _key(tiny, tmp_path, items[1]) != base  # other pixels
    assert _key(tiny, tmp_path, dataclasses.replace(items[0], prompt="a handwritten digit six")) != base
    # where the cache lives is not part of what it stores
    assert Runner(make_cfg(tmp_path / "other"), tiny).inversion_key(items[0]) == base


def test_key_follows_the_loaded_model(tiny, items, tmp_path, cache_dir):
    base = _key(tiny, tmp_path, items[0])
    other_cfg = make_cfg(tmp_path, "model.seed=1")  # the same architecture, other weights
    other = load_model(other_cfg.model, other_cfg.runtime, cache_dir)
    assert Runner(other_cfg, other).inversion_key(items[0]) != base
    other_revision = dataclasses.replace(tiny, revision="0123abcd")  # e.g. another hub commit
    assert _key(other_revision, tmp_path, items[0]) != base


def test_key_changes_when_the_weights_behind_a_path_change(tiny, tmp_path):
    src = Path(tiny.pipe.name_or_path)
    copy = shutil.copytree(src, tmp_path / "model")
    assert fingerprint(copy) == fingerprint(src)  # location-independent
    cfg = make_cfg(tmp_path, "model=local", f"model.path='{copy}'")
    item = load_dataset(DIGITS / "digit0_0.png", tiny.resolution, "")[0]
    before = Runner(cfg, load_model(cfg.model, cfg.runtime)).inversion_key(item)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1e-3  # "retrained": same file names, same sizes
    save_file(tensors, weights)
    after = Runner(cfg, load_model(cfg.model, cfg.runtime)).inversion_key(item)
    assert after != before


# -- 1. cache entries: reuse, concurrency, corruption -----------------------------------------------------


def test_second_identical_run_reuses_every_inversion(tiny, items, tmp_path):
    cfg = make_cfg(tmp_path / "cache", "guidance_scale=[1,3]", "start_step=[0,4]", "inversion.guidance_scale=2")
    x0 = encode(tiny, items)
    first = Runner(cfg, tiny)
    traj_a, cached_a = invert_all(first, items, x0)
    out_a = sample_grid(first, items, traj_a)
    assert cached_a == [False, False]
    assert first.evals["inversion"] == len(items) * STEPS * 2

    second = Runner(cfg, tiny)
    traj_b, cached_b = invert_all(second, items, x0)
    assert cached_b == [True, True]
    assert second.denoiser.unet_evals == 0 and second.evals["inversion"] == 0
    out_b = sample_grid(second, items, traj_b)
    for a, b in zip(traj_a, traj_b, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out_a, out_b)
    assert out_a.abs().max() > 0.1

    rows, _ = Runner(cfg, tiny).run_group(items)
    assert [r["inversion_cached"] for r in rows] == [True] * len(rows)
    # a cached inversion is reported at its formula cost (M steps × 2 at inversion guidance 2), flagged cached
    assert [r["inversion_unet_evals"] for r in rows] == [STEPS * 2] * len(rows)


def test_second_run_of_the_whole_task_spends_no_inversion_evaluations(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("digit0_0.png", "digit1_0.png"):
        shutil.copy(DIGITS / name, data / name)
    overrides = [
        "data=folder",
        f"data.path='{data}'",
        "prompt=a digit",
        "guidance_scale=[1,3]",
        "start_step=[0,5]",
    ]
    cfg = make_cfg(tmp_path / "cache", *overrides)
    summaries, tables = [], []
    for run in ("a", "b"):
        with LocalLogger() as logger:
            tables.append(reconstruct_or_edit(cfg, tiny, tmp_path / run, logger))
        summaries.append(json.loads((tmp_path / run / "run.json").read_text()))
    first, second = summaries
    assert first["inversion"] == 2 * STEPS and first["inversions_computed"] == 2
    assert second["inversion"] == 0 and second["inversions_cached"] == 2 and second["inversions_computed"] == 0
    assert second["sampling"] == first["sampling"] > 0
    for summary in summaries:
        assert summary["unet_evals"] == summary["minimum_unet_evals"]
    assert not tables[0]["inversion_cached"].any() and tables[1]["inversion_cached"].all()
    # the cached run reports what each inversion costs, not the 0 it spent on it this time
    assert (tables[1]["inversion_unet_evals"] == STEPS).all()
    assert tables[1]["inversion_unet_evals"].tolist() == tables[0]["inversion_unet_evals"].tolist()
    same = ["image", "guidance_scale", "start_step", "latent_mse", "psnr", "ssim"]
    pd.testing.assert_frame_equal(tables[0][same], tables[1][same])


WRITER = """
import sys, time, torch
from pathlib import Path
from ddim_lab.study.cache import InversionCache
root, key, value, rounds, sync = sys.argv[1:]
payload = torch.full((24, 4, 96, 96), float(value))
cache = InversionCache(root)
(Path(sync) / f"ready-{value}").touch()
while not (Path(sync) / "go").exists():  # start together, once every writer has imported torch
    time.sleep(0.001)
for _ in range(int(rounds)):
    cache.save(key, {"trajectory": payload}, {"writer": value})
"""


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    root, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    cache, key, writers = InversionCache(root), "c0ffee" * 10 + "beef", 4
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), key, str(w), "15", str(sync)], stderr=PIPE)
        for w in range(writers)
    ]
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < writers and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.01)
    (sync / "go").touch()
    payloads = [torch.full((24, 4, 96, 96), float(w)) for w in range(writers)]
    reads = 0
    while any(p.poll() is None for p in procs):  # read while they write: never a torn entry
        if cache._path(key).exists():
            entry = cache.load(key)
            assert entry is not None, "an existing entry could not be read"
            assert any(torch.equal(entry["trajectory"], p) for p in payloads)
            reads += 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    entry = cache.load(key)
    assert entry is not None and any(torch.equal(entry["trajectory"], p) for p in payloads)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files == [cache._path(key)]  # no temporary files left behind
    assert reads > 0


def test_corrupt_entry_is_recomputed_with_a_warning(tiny, items, tmp_path, caplog):
    cfg = make_cfg(tmp_path / "cache", "inversion.guidance_scale=1")
    x0 = encode(tiny, items[:1])
    runner = Runner(cfg, tiny)
    (expected,), _ = invert_all(runner, items[:1], x0)
    path = runner.cache._path(runner.inversion_key(items[0]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write from some older tool
    again = Runner(cfg, tiny)
    with caplog.at_level(logging.WARNING, logger="ddim_lab.study.cache"):
        (traj,), cached = invert_all(again, items[:1], x0)
    assert cached == [False] and again.evals["inversion"] == STEPS
    assert any("unreadable cache entry" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(traj, expected, atol=1e-6, rtol=0)
    assert torch.equal(InversionCache(tmp_path / "cache" / "inversions").load(path.stem)["trajectory"], traj)


def test_disabled_cache_writes_nothing(tiny, items, tmp_path):
    runner = Runner(make_cfg(None), tiny)
    _, cached = invert_all(runner, items, encode(tiny, items))
    assert cached == [False, False]
    assert not any(tmp_path.rglob("*.safetensors"))


# -- 2. batched grid = one grid point at a time -----------------------------------------------------------


def test_batched_grid_equals_each_point_alone(tiny, items, tmp_path):
    targets = "edit_prompt=[a photograph of a cat,a dog]"
    grid = ["task=edit", targets, "guidance_scale=[0,1,3]", "start_step=[0,5]"]
    batched = Runner(make_cfg(None, *grid, "batch_size=3", "inversion.guidance_scale=2"), tiny)
    P = len(batched.points)
    assert P == 12
    trajectories, _ = invert_all(batched, items, encode(tiny, items))
    out = sample_grid(batched, items, trajectories)  # (2 × 12, C, h, w), image-major
    scale = float(out.abs().max())
    for j, p in enumerate(batched.points):
        alone_cfg = make_cfg(
            None,
            "task=edit",
            f"edit_prompt='{p.target}'",
            f"guidance_scale={p.guidance}",
            f"start_step={p.start_step}",
            "batch_size=1",
            "inversion.guidance_scale=2",
        )
        for i, item in enumerate(items):
            alone = Runner(copy.deepcopy(alone_cfg), tiny)  # a runner of its own for each image and point
            # the same inverted latents sampled alone: only the batch composition differs
            (same_start,) = sample_grid(alone, [item], [trajectories[i]])
            torch.testing.assert_close(out[i * P + j], same_start, atol=1e-4 * scale, rtol=1e-4)
            # everything alone (encode, invert, sample at batch 1): CPU kernels round differently per batch
            # size and the random model's 8-step ODE amplifies that (~1e-3 of the scale); a wrong row,
            # start step or guidance differs by the order of the scale itself
            (one,) = sample_grid(alone, [item], invert_all(alone, [item], encode(tiny, [item]))[0])
            torch.testing.assert_close(out[i * P + j], one, atol=5e-3 * scale, rtol=1e-3)
    # the grid points really differ, so a mix-up of rows would not pass unnoticed
    assert (out[0] - out[1]).abs().max() > 0.1 * scale and (out[0] - out[P]).abs().max() > 0.1 * scale


# -- 3. UNet-evaluation accounting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inverter", "inversion_guidance", "inversion_steps"), [("ddim", 3, STEPS), ("course", 1, STEPS - 2)]
)
def test_engine_spends_exactly_the_minimum(
    tiny, items, tmp_path, inverter, inversion_guidance, inversion_steps
):
    guidance, starts = [1, 0, 3], [0, 2, 5]
    cfg = make_cfg(
        None,
        f"inverter={inverter}",
        f"inversion.guidance_scale={inversion_guidance}",
        "guidance_scale=[1,0,3]",
        "start_step=[0,2,5]",
        "batch_size=4",
    )
    runner = Runner(cfg, tiny)
    rows, _ = runner.run_group(items)
    expected_inversion = len(items) * inversion_steps * per_step(inversion_guidance)
    expected_sampling = len(items) * sum((STEPS - k) * per_step(g) for g in guidance for k in starts)
    assert runner.evals["inversion"] == expected_inversion
    assert runner.evals["sampling"] == expected_sampling
    assert runner.denoiser.unet_evals == expected_inversion + expected_sampling
    assert runner.minimum.forwards == expected_inversion + expected_sampling
    assert runner.summary(len(items))["minimum_unet_evals"] == runner.denoiser.unet_evals
    assert sum(r["unet_evals"] for r in rows) == expected_sampling
    assert {r["inversion_unet_evals"] for r in rows} == {inversion_steps * per_step(inversion_guidance)}
