"""Tests for ddim_lab.report.stats: bootstrap intervals (coverage, determinism) and paired comparisons."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from ddim_lab.report.stats import (
    Bootstrap,
    bootstrap_means,
    frame_intervals,
    group_intervals,
    mean_interval,
    paired_comparisons,
    wilcoxon_p,
)


@pytest.mark.parametrize(
    ("method", "draw", "true_mean"),
    [
        ("percentile", lambda rng, n: rng.normal(3.0, 2.0, n), 3.0),
        ("bca", lambda rng, n: rng.exponential(1.5, n), 1.5),  # skewed: where BCa earns its keep
    ],
)
def test_intervals_cover_the_true_mean_about_95_percent(method, draw, true_mean):
    rng = np.random.default_rng(1234)
    trials = 200
    covered = 0
    for t in range(trials):  # each trial: a fresh sample and its own bootstrap seed
        iv = mean_interval(draw(rng, 60), Bootstrap(resamples=1000, seed=t, method=method))
        covered += iv.low <= true_mean <= iv.high
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_interval_is_deterministic_given_the_seed():
    x = np.random.default_rng(0).normal(size=50)
    a = mean_interval(x, Bootstrap(seed=3))
    assert a == mean_interval(x, Bootstrap(seed=3))
    assert a != mean_interval(x, Bootstrap(seed=4))
    assert a.low < a.mean < a.high and a.n == 50
    assert a.mean == pytest.approx(x.mean())


def test_degenerate_inputs():
    s = Bootstrap(resamples=100)
    assert mean_interval([], s).n == 0 and math.isnan(mean_interval([], s).mean)
    one = mean_interval([2.0, math.nan], s)  # NaN is missing, not a value
    assert one.n == 1 and one.mean == 2.0 and math.isnan(one.low) and math.isnan(one.high)
    const = mean_interval([5.0] * 4, s)
    assert (const.mean, const.low, const.high) == (5.0, 5.0, 5.0)


def test_bootstrap_means_shares_resamples_across_columns():
    x = np.arange(20.0)
    both = bootstrap_means(np.c_[x, 2 * x], 300, np.random.default_rng(0))
    np.testing.assert_allclose(both[:, 1], 2 * both[:, 0])
    alone = bootstrap_means(x, 300, np.random.default_rng(0))
    np.testing.assert_allclose(alone, both[:, 0])


def test_frame_intervals_with_missing_values():
    df = pd.DataFrame({"a": np.arange(10.0), "b": [np.nan] * 5 + list(np.arange(5.0))})
    ivs = frame_intervals(df, Bootstrap(resamples=200))
    assert ivs["a"].n == 10 and ivs["b"].n == 5 and ivs["b"].mean == 2.0


def test_settings_are_validated():
    with pytest.raises(ValueError, match="method"):
        Bootstrap(method="normal")
    with pytest.raises(ValueError, match="confidence"):
        Bootstrap(confidence=95)
    assert "2000 resamples, seed 0" in Bootstrap().describe()


def _paired_frame(shift: float, images: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.normal(25, 3, images)
    rows = []
    for inverter, values in (("ddim", base), ("null_text", base + shift + rng.normal(0, 0.5, images))):
        for i, v in enumerate(values):
            rows.append({"image": f"img{i}", "inverter": inverter, "num_steps": 10, "psnr": v, "ssim": 0.5})
    return pd.DataFrame(rows)


def test_paired_identical_columns_give_zero_difference_and_no_crash():
    df = _paired_frame(0.0)
    df.loc[df.inverter == "null_text", "psnr"] = df.loc[df.inverter == "ddim", "psnr"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = paired_comparisons(df, "inverter", ["inverter"], ["psnr", "ssim"], Bootstrap(resamples=200))
    assert list(out["metric"]) == ["psnr", "ssim"]
    assert (out["diff_mean"] == 0).all() and (out["diff_low"] == 0).all() and (out["diff_high"] == 0).all()
    assert (out["p_wilcoxon"] == 1.0).all() and (out["pairs"] == 30).all()


def test_paired_detects_a_shift_per_stratum_and_pairs_only_shared_images():
    a, b = _paired_frame(1.0), _paired_frame(-2.0, seed=1).assign(num_steps=20)
    df = pd.concat([a, b], ignore_index=True)
    df = df[~((df.inverter == "null_text") & (df.image == "img0"))]  # img0 has no partner: not paired
    out = paired_comparisons(df, "inverter", ["inverter", "num_steps"], ["psnr"], Bootstrap(resamples=500))
    by_steps = out.set_index("num_steps")
    assert by_steps.loc[10, "pairs"] == 29 and by_steps.loc[10, "baseline"] == "ddim"
    assert by_steps.loc[10, "diff_low"] < 1.0 < by_steps.loc[10, "diff_high"]
    assert by_steps.loc[20, "diff_mean"] == pytest.approx(-2.0, abs=0.3)
    assert (out["p_wilcoxon"] < 1e-4).all()
    again = paired_comparisons(df, "inverter", ["inverter", "num_steps"], ["psnr"], Bootstrap(resamples=500))
    pd.testing.assert_frame_equal(out, again)  # deterministic


def test_paired_compares_methods_across_their_knobs_and_tells_knob_values_apart():
    # each inverter has its own knobs (a qualifier column): the comparison must still pair ddim with null_text
    df = _paired_frame(1.0)
    df["inverter_knobs"] = np.where(df.inverter == "ddim", "{}", '{"inner_steps": 10}')
    keys = ["inverter", "inverter_knobs"]
    out = paired_comparisons(df, "inverter", keys, ["psnr"], Bootstrap(resamples=200))
    assert list(out[["baseline", "other", "pairs"]].iloc[0]) == ["ddim", "null_text", 30]
    # two knob values of one method are two levels, labelled by their knobs
    more = df[df.inverter == "null_text"].assign(inverter_knobs='{"inner_steps": 2}')
    more["psnr"] += 5.0
    out = paired_comparisons(pd.concat([df, more]), "inverter", keys, ["psnr"], Bootstrap(resamples=200))
    assert sorted(out["other"]) == ['null_text {"inner_steps": 10}', 'null_text {"inner_steps": 2}']
    shift = out.set_index("other")["diff_mean"]
    assert shift['null_text {"inner_steps": 2}'] - shift['null_text {"inner_steps": 10}'] == pytest.approx(5.0)


def test_paired_baseline_choice_and_errors():
    df = _paired_frame(1.0)
    out = paired_comparisons(
        df, "inverter", ["inverter"], ["psnr"], Bootstrap(resamples=100), baseline="null_text"
    )
    assert out.loc[0, "other"] == "ddim" and out.loc[0, "diff_mean"] < 0
    with pytest.raises(ValueError, match="baseline"):
        paired_comparisons(df, "inverter", ["inverter"], ["psnr"], baseline="edict")
    with pytest.raises(ValueError, match="protocol"):
        paired_comparisons(df.assign(protocol="p1"), "protocol", ["protocol"], ["psnr"])


def test_wilcoxon_edge_cases():
    assert math.isnan(wilcoxon_p(np.array([])))
    assert wilcoxon_p(np.zeros(5)) == 1.0
    assert 0 < wilcoxon_p(np.array([0.5, 1.0, 1.5, -0.1, 2.0, 0.7])) < 1


def test_group_interval_does_not_depend_on_other_groups():
    df = _paired_frame(1.0)
    s = Bootstrap(resamples=300)
    alone = group_intervals(df[df.inverter == "ddim"], ["inverter"], ["psnr"], s)
    both = group_intervals(df, ["inverter"], ["psnr"], s)
    pd.testing.assert_series_equal(alone.iloc[0], both.iloc[0], check_names=False)
    assert list(both.columns) == ["inverter", "n", "psnr_mean", "psnr_low", "psnr_high", "psnr_n"]


def test_num_steps_is_no_stratum_when_every_row_has_a_budget():
    from ddim_lab.report.stats import derived_keys, paired_strata

    df = _paired_frame(1.0).assign(budget_nfe=20)
    df.loc[df.inverter == "null_text", "num_steps"] = 5  # each method's N at the same budget
    assert derived_keys(df) == ["num_steps"]
    keys = ["inverter", "num_steps", "budget_nfe"]
    assert paired_strata(keys, "inverter", derived_keys(df)) == ["budget_nfe"]
    out = paired_comparisons(df, "inverter", keys, ["psnr"], Bootstrap(resamples=200))
    assert list(out["pairs"]) == [30] and out.loc[0, "diff_mean"] == pytest.approx(1.0, abs=0.3)
    partial = df.astype({"budget_nfe": "Int64"})
    partial.loc[0, "budget_nfe"] = pd.NA  # a row without a budget: N is a setting again
    assert derived_keys(partial) == []
    assert paired_comparisons(partial, "inverter", keys, ["psnr"], Bootstrap(resamples=200)).empty
