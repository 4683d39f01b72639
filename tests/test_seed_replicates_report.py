"""Seed replicates in the report (issue 17, item 3): images resampled with their seeds nested, the
seed-to-seed spread beside the interval, paired comparisons on image and, where both arms ran replicates, on
seed."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest

from ddim_lab.report.main import varying_columns
from ddim_lab.report.stats import frame_intervals, group_intervals, paired_comparisons

IMAGES = [f"img{i}" for i in range(6)]


def rows(method: str, seeds: list[int], shift: float = 0.0, seed_effect: float = 0.5) -> list[dict]:
    rng = np.random.default_rng([zlib.crc32(method.encode()), *seeds])
    base = {im: 20 + 3 * i for i, im in enumerate(IMAGES)}  # images differ a lot, seeds a little
    return [
        {
            "image": im,
            "run_dir": method,  # one run per method
            "editor": method,
            "seed": s,
            "psnr": base[im] + shift + seed_effect * s + rng.normal(0, 0.1),
        }
        for im in IMAGES
        for s in seeds
    ]


def test_intervals_resample_images_with_their_seeds_nested():
    df = pd.DataFrame(rows("flowedit", [0, 1, 2]))
    out = group_intervals(df, [], ["psnr"]).iloc[0]
    per_image = df.groupby("image")[["psnr"]].mean()
    iv = frame_intervals(per_image)["psnr"]
    assert out["n"] == 18 and out["psnr_n"] == 6  # six images drawn, not eighteen trajectories
    assert (out["psnr_mean"], out["psnr_low"], out["psnr_high"]) == (iv.mean, iv.low, iv.high)
    per_seed = df.groupby("seed")["psnr"].mean()
    assert out["psnr_seed_sd"] == pytest.approx(per_seed.std(ddof=1)) and out["psnr_seed_sd"] > 0.3
    plain = group_intervals(pd.DataFrame(rows("prompt_swap", [0])), [], ["psnr"])
    assert "psnr_seed_sd" not in plain.columns  # one seed: the table is as before


def test_seeds_of_one_run_are_replicates_and_of_separate_runs_keys():
    df = pd.DataFrame(rows("flowedit", [0, 1, 2]) + rows("prompt_swap", [0]))
    assert varying_columns(df) == ["editor"]  # flowedit's run holds each image under three seeds
    separate = pd.DataFrame([{**r, "run_dir": f"seed{r['seed']}"} for r in rows("flowedit", [0, 1])])
    assert varying_columns(separate) == ["seed"]  # two runs of one seed each: two settings, never pooled


def test_pairs_on_image_and_on_seed_where_both_arms_replicate():
    every = rows("a", [0, 1, 2, 3])  # one draw per (image, seed): the same noise under the same seed
    a = [r for r in every if r["seed"] < 3]
    b = [{**r, "editor": "b", "psnr": r["psnr"] + 1.0} for r in every if r["seed"] > 0]  # seeds 1, 2 shared
    det = rows("det", [0], seed_effect=0.0)
    df = pd.DataFrame(a + b + det)
    out = paired_comparisons(df, "editor", ["editor"], ["psnr"], baseline="a").set_index("other")
    # a against b: only seeds 1 and 2 are compared (b's seed 3 and a's seed 0 have no partner); same noise
    # there, so the difference is exactly the shift
    assert out.loc["b", "pairs"] == 6 and out.loc["b", "diff_mean"] == pytest.approx(1.0)
    a_shared = pd.DataFrame(a).query("seed in [1, 2]")["psnr"].mean()
    assert out.loc["b", "baseline_mean"] == pytest.approx(a_shared)
    # a against a deterministic arm (one seed): paired on image, a's seeds averaged
    a_all = pd.DataFrame(a).groupby("image")["psnr"].mean()
    d = pd.DataFrame(det).set_index("image")["psnr"]
    assert out.loc["det", "pairs"] == 6 and out.loc["det", "diff_mean"] == pytest.approx((d - a_all).mean())


def test_editors_with_their_own_inverters_are_paired_on_image():
    """flowedit runs with inverter=none, prompt swap with rf_solver: the inverter follows the editor, so it is
    part of each arm rather than a stratum (which would hold one editor each and pair nothing)."""
    flow = [{**r, "inverter": "none"} for r in rows("flowedit", [0, 1, 2])]
    swap = [{**r, "inverter": "rf_solver"} for r in rows("prompt_swap", [0], shift=-2.0)]
    df = pd.DataFrame(flow + swap)
    out = paired_comparisons(df, "editor", ["inverter", "editor"], ["psnr"], baseline="prompt_swap")
    assert list(out["other"]) == ["flowedit"] and out["pairs"].iloc[0] == 6 and "inverter" not in out.columns
    crossed = pd.DataFrame(flow + [{**r, "inverter": "rf_solver"} for r in flow])  # both inverters per editor
    assert "inverter" in paired_comparisons(crossed, "editor", ["inverter", "editor"], ["psnr"]).columns
