"""A study's declared tables and figures (the ``report:`` section of its preset), drawn from saved results.

``ddim-lab-report DIR`` finds the section in the saved config of DIR's runs (:func:`saved_report`), checks
every column it names against the rows (:func:`check_columns`) and writes it (:func:`write_study`):

1. rows: the declared columns derived, the ``where`` rows kept, one row per ``unique`` combination;
2. tables (:mod:`ddim_lab.report.study_tables`) as markdown, and CSV numbers where asked; tables naming one
   file are written into it one after another, each under its caption;
3. figures (:mod:`ddim_lab.report.study_figures`), PNG files whose bytes depend only on the saved rows.

The vocabulary and its checks are in :mod:`ddim_lab.config.report_spec`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ddim_lab.config.report_spec import (
    ReportSpecError,
    check_columns,
    check_report,
    fill_template,
    template_fields,
)
from ddim_lab.report.stats import Bootstrap
from ddim_lab.report.text import markdown
from ddim_lab.study.records import atomic_write

logger = logging.getLogger(__name__)

SAVED_CONFIG = "config.yaml"  # each run's resolved config (ddim_lab/cli/main.py)
HYDRA_CONFIGS = ("multirun.yaml", ".hydra/hydra.yaml")  # where Hydra records the preset chosen


# -- finding the section ------------------------------------------------------------------------------------
def typed_report(section: dict, source: str) -> dict:
    """``section`` typed by ``ddim_lab.config.schema.ReportSchema`` (defaults filled), checked; a plain
    dict."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ddim_lab.config.schema import ReportSchema

    try:
        typed = OmegaConf.merge(OmegaConf.structured(ReportSchema), section)
        report = OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        message = " ".join(str(err).split()).split(" full_key:")[0]
        node = getattr(err, "object_type", None)
        where = f" (key {err.full_key} of a {node.__name__})" if getattr(err, "full_key", None) and node else ""
        raise ReportSpecError(f"report ({source}): {message}{where}") from err
    check_report(report)
    return report


def preset_name(root: Path) -> str | None:
    """The ``+experiment=`` preset Hydra recorded for the runs under ``root`` (None when none)."""
    for path in [root / HYDRA_CONFIGS[0], *sorted(root.rglob(HYDRA_CONFIGS[1]))]:
        if path.is_file():
            hydra = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("hydra") or {}
            name = ((hydra.get("runtime") or {}).get("choices") or {}).get("experiment")
            if name:
                return str(name)
    return None


def saved_report(root: Path) -> dict | None:
    """The ``report:`` section the runs under ``root`` were saved with, typed and checked; None without one.

    Runs saved before the section existed (no ``report`` key) take the current section of the preset Hydra
    recorded for them. Raises ReportSpecError when runs disagree or the section cannot be drawn."""
    from ddim_lab.config.compose import config_dir

    root = Path(root)
    saved = sorted(p for p in root.rglob(SAVED_CONFIG) if ".hydra" not in p.relative_to(root).parts)
    sections: dict[str, tuple[dict, Path]] = {}
    unsaved = False
    for path in saved:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "report" not in config:
            unsaved = True
        elif config["report"] is not None:
            sections.setdefault(yaml.safe_dump(config["report"], sort_keys=True), (config["report"], path))
    if len(sections) > 1:
        paths = ", ".join(str(p.relative_to(root)) for _, p in sections.values())
        raise ReportSpecError(
            f"the runs under {root} declare {len(sections)} different report sections ({paths})"
        )
    if sections:
        section, path = next(iter(sections.values()))
        return typed_report(section, str(path))
    name = preset_name(root) if unsaved else None
    if name is None or not (config_dir() / "experiment" / f"{name}.yaml").is_file():
        return None
    preset = config_dir() / "experiment" / f"{name}.yaml"
    section = (yaml.safe_load(preset.read_text(encoding="utf-8")) or {}).get("report")
    if section is None:
        return None
    logger.info(
        "the runs under %s predate report sections: drawing +experiment=%s's from %s", root, name, preset
    )
    return typed_report(section, str(preset))


# -- rows ---------------------------------------------------------------------------------------------------
def _equal(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Row by row ``a == b``; a missing value equals nothing."""
    same = a.astype(object).eq(b.astype(object)).fillna(False).to_numpy(dtype=bool)
    return same & a.notna().to_numpy() & b.notna().to_numpy()


def column_mask(df: pd.DataFrame, column: str, test) -> np.ndarray:
    """Rows of ``df`` whose ``column`` passes ``test`` (the tests of :mod:`ddim_lab.config.report_spec`)."""
    col = df[column]
    if isinstance(test, dict):
        mask = np.ones(len(df), dtype=bool)
        for name, arg in test.items():
            if name == "not":
                part = ~column_mask(df, column, arg)
            elif name == "present":
                part = col.notna().to_numpy() == arg
            elif name == "empty":
                part = (col.isna() | col.astype(object).eq("")).to_numpy(dtype=bool) == arg
            elif name in ("same_as", "not_same_as"):
                part = _equal(col, df[arg]) == (name == "same_as")
            else:  # any
                part = np.logical_or.reduce([column_mask(df, column, one) for one in arg])
            mask &= part
        return mask
    if test is None:
        return col.isna().to_numpy()
    values = test if isinstance(test, list) else [test]
    return col.astype(object).isin(values).to_numpy(dtype=bool) & col.notna().to_numpy()


def where_mask(df: pd.DataFrame, where: dict) -> np.ndarray:
    """Rows passing every test of ``where``."""
    mask = np.ones(len(df), dtype=bool)
    for column, test in (where or {}).items():
        mask &= column_mask(df, column, test)
    return mask


def _templated(df: pd.DataFrame, text: str, where: str) -> list[str]:
    fields = template_fields(text, where)
    records = df[fields].astype(object).to_dict("records") if fields else [{}] * len(df)
    return [fill_template(text, r, where) for r in records]


def derive(df: pd.DataFrame, spec: dict, where: str) -> pd.Series:
    """One derived column of ``df`` (``StudyColumnSchema``)."""
    if spec.get("cases"):
        out = pd.Series([None] * len(df), index=df.index, dtype=object)
        done = np.zeros(len(df), dtype=bool)
        for case in spec["cases"]:
            hit = where_mask(df, case["when"]) & ~done
            out[hit] = case["value"]
            done |= hit
        if spec.get("default") is not None and (~done).any():
            out[~done] = _templated(df[~done], spec["default"], f"{where}.default")
        return out
    if spec.get("format"):
        return pd.Series(_templated(df, spec["format"], f"{where}.format"), index=df.index, dtype=object)
    if spec.get("per_image_of_job"):
        jobs = df.groupby("run_dir", sort=False)
        total = pd.to_numeric(df[spec["per_image_of_job"]], errors="coerce").astype("float64")
        return total.groupby(df["run_dir"]).transform("sum") / jobs["image"].transform("nunique")
    columns = spec.get("sum") or spec["difference"]
    values = df[columns].apply(pd.to_numeric, errors="coerce").astype("float64")
    if spec.get("fill") is not None:
        values = values.fillna(float(spec["fill"]))
    if spec.get("sum"):
        return values.sum(axis=1, skipna=False)
    return values[columns[0]] - values[columns[1]]


def study_rows(df: pd.DataFrame, rows: dict) -> pd.DataFrame:
    """``df`` with the derived columns, filtered by ``where``, one row per ``unique`` combination."""
    for column in rows.get("require") or []:
        if column not in df.columns or df[column].isna().all():
            raise ReportSpecError(f"report.rows.require: no row carries {column} (a sweep of another preset?)")
    df = df.copy()
    for name, spec in (rows.get("derive") or {}).items():
        df[name] = derive(df, spec, f"report.rows.derive.{name}")
    df = df[where_mask(df, rows.get("where") or {})]
    if rows.get("unique"):
        df = df.drop_duplicates(list(rows["unique"]))
    if df.empty:
        raise ReportSpecError("report.rows: no row passes report.rows.where")
    return df.reset_index(drop=True)


# -- writing ------------------------------------------------------------------------------------------------
def write_study(df: pd.DataFrame, report: dict, out_dir: Path, settings: Bootstrap) -> list[Path]:
    """Write the section's tables (markdown; CSV where asked) and figures into ``out_dir``; their paths."""
    from ddim_lab.report.study_figures import study_figure
    from ddim_lab.report.study_tables import study_table

    check_columns(df.columns, report)
    rows = study_rows(df, report["rows"])
    out_dir, written = Path(out_dir), []
    texts: dict[str, list[str]] = {}
    for i, table in enumerate(report["tables"]):
        part = rows[where_mask(rows, table["where"])]
        shown, numbers = study_table(part, table, settings, f"report.tables[{i}]")
        texts.setdefault(table["file"], []).extend(
            [*([table["caption"]] if table["caption"] else []), markdown(shown)]
        )
        if table.get("csv"):
            written.append(
                atomic_write(out_dir / table["csv"], lambda tmp, n=numbers: n.to_csv(tmp, index=False))
            )
    for name, parts in texts.items():
        text = "\n\n".join(parts) + "\n"
        written.append(atomic_write(out_dir / name, lambda tmp, t=text: tmp.write_text(t, encoding="utf-8")))
    for i, figure in enumerate(report["figures"]):
        part = rows[where_mask(rows, figure["where"])]
        path = study_figure(part, figure, settings, out_dir / figure["file"], f"report.figures[{i}]")
        written += [path] if path is not None else []
    return written
