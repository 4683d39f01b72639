"""Seed replicates in the report (``seed=[0,1,2]``, issue 17): a stochastic method's rows repeat each image
under several seeds. The seeds are nested in the image: intervals resample images, each carrying the mean of its
seeds (a cluster bootstrap: the image, not the trajectory, is the unit drawn), and the seed-to-seed spread is
reported beside the interval; paired comparisons pair on the image, and on the seed too where both arms ran
replicates (only the seeds both ran are compared)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ddim_lab.schema import IMAGE

SEED = "seed"
RUN_DIR = "run_dir"  # the run a row came from (``ddim-lab-report`` adds it)


def replicated(df: pd.DataFrame) -> bool:
    """Whether one run (``run_dir``) has an image under several seeds: then seeds are replicates, pooled in
    their image, not a key (separate runs of one seed each stay apart, as any differing config)."""
    if not {SEED, IMAGE, RUN_DIR} <= set(df.columns) or df[SEED].isna().all():
        return False
    return bool((df.groupby([RUN_DIR, IMAGE])[SEED].nunique() > 1).any())


def without_seed(keys: list[str], df: pd.DataFrame) -> list[str]:
    """The grouping ``keys`` less ``seed`` where its values are replicates (:func:`replicated`)."""
    return [k for k in keys if k != SEED or not replicated(df)]


def image_means(group: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per image: the mean of its seeds' values (NaN-skipping) of each metric."""
    return group.groupby(IMAGE, sort=True)[metrics].mean()


def seed_spread(group: pd.DataFrame, metrics: list[str]) -> dict[str, float]:
    """Per metric, the standard deviation across seeds (ddof = 1) of the group's mean at each seed: how far the
    headline number moves with the seed alone; NaN with one seed."""
    per_seed = group.groupby(SEED, sort=True)[metrics].mean()
    if len(per_seed) < 2:
        return dict.fromkeys(metrics, float("nan"))
    return {m: float(np.std(per_seed[m].to_numpy("float64"), ddof=1)) for m in metrics}


def matched_seeds(arms: pd.DataFrame, unit: str, level: str, seed: str, base: str, other: str) -> pd.DataFrame:
    """The rows of two arms (column ``level``: ``base`` or ``other``) to pair: where both ran replicates (more
    than one seed each), only the (unit, seed) pairs both have; otherwise all of them (paired on the unit)."""
    seeds = arms.groupby(level)[seed].nunique()
    if arms[seed].isna().any() or seeds.get(base, 0) < 2 or seeds.get(other, 0) < 2:
        return arms
    units = arms[unit].astype(str) + "\t" + arms[seed].astype(str)
    common = set(units[arms[level] == base]) & set(units[arms[level] == other])
    return arms[units.isin(common)]
