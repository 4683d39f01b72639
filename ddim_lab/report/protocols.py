"""Protocols in the report: rows of different protocols (``protocol``, ``ddim_lab.study.protocol``) are never
averaged together nor paired across; these say when a frame mixes them."""

from __future__ import annotations

import pandas as pd

from ddim_lab.schema import PROTOCOL, nunique


def mixes_protocols(df: pd.DataFrame) -> bool:
    """Whether ``df``'s rows come from more than one protocol (a missing one counting as one)."""
    return PROTOCOL in df.columns and nunique(df[PROTOCOL]) > 1


def protocol_problem(df: pd.DataFrame) -> str | None:
    """One line when ``df`` mixes protocols (their numbers must not be averaged together), else None."""
    if not mixes_protocols(df):
        return None
    values = sorted(df[PROTOCOL].dropna().astype(str).unique())
    values += ["(none)"] if df[PROTOCOL].isna().any() else []
    return (
        f"rows come from {len(values)} protocols ({', '.join(values)}): numbers from different protocols are "
        "not comparable, so the report groups by protocol and never averages or pairs rows across them"
    )
