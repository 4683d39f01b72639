"""The vocabulary of a study's ``report:`` section (typed in ``config.schema.ReportSchema``) and its checks.

A preset declares its tables and figures; ``ddim-lab-report DIR`` draws them (``ddim_lab/report/studies.py``).
Everything here runs on the plain section, before any row is read: each problem is one line naming its key.

Row tests (``where:`` and a case's ``when:``) map a column to a test:

- a value: equal to it (``start_step: 0``); a list: one of its values (``inverter: [ddim, edict]``)
- a mapping, every entry holding: ``not`` (a value or list it is not), ``present`` (true: has a value),
  ``empty`` (true: missing or ``""``), ``same_as`` / ``not_same_as`` (another column of the same row),
  ``any`` (a list of tests, one of which holds).

Templates (a derived ``format``, a cell ``template``, headers and titles) are Python format strings over
named fields (``"{psnr_mean:.2f} ({nfe_mean:.0f} @ {num_steps})"``); a missing value is written ``n/a``.
"""

from __future__ import annotations

import difflib
import math
import string
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

TESTS = ("not", "present", "empty", "same_as", "not_same_as", "any")
DERIVATIONS = ("cases", "format", "sum", "difference", "per_image_of_job")
TABLE_KINDS = ("groups", "paired")
SHOWS = ("interval", "mean", "n", "template")
LAYOUTS = ("long", "wide")
XSCALES = ("linear", "log")
STATS = ("mean", "low", "high", "n")  # a template's <metric>_<stat> fields
MISSING_TEXT = "n/a"


class ReportSpecError(ValueError):
    """A ``report:`` section that cannot be drawn; the message is one line naming the key."""


def template_fields(text: str, where: str) -> list[str]:
    """The field names of template ``text`` (ReportSpecError naming ``where`` when it does not parse)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise ReportSpecError(f"{where}={text!r} is not a template: {err}") from err
    names = [name for _, name, _, _ in parsed if name is not None]
    if any(not n or not n.isidentifier() for n in names):
        raise ReportSpecError(f"{where}={text!r}: every {{field}} must name a column (no positional {{}})")
    return names


def is_missing(value: Any) -> bool:
    """None, NaN and pandas' NA."""
    if value is None:
        return True
    try:
        return bool(value != value) or type(value).__name__ == "NAType"
    except (TypeError, ValueError):
        return type(value).__name__ == "NAType"


def fill_template(text: str, values: dict[str, Any], where: str) -> str:
    """``text`` with each ``{name:spec}`` replaced by ``format(values[name], spec)``; a missing value as n/a."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(text):
        out.append(literal)
        if name is None:
            continue
        if name not in values:
            raise ReportSpecError(f"{where}: no field {name!r} (fields: {', '.join(sorted(values))})")
        value = values[name]
        if is_missing(value):
            out.append(MISSING_TEXT)
            continue
        value = str(value) if conversion == "s" else repr(value) if conversion == "r" else value
        try:
            out.append(format(value, spec or ""))
        except (TypeError, ValueError) as err:
            raise ReportSpecError(
                f"{where}: cannot write {name}={value!r} as {{{name}:{spec}}}: {err}"
            ) from err
    return "".join(out)


def check_number_format(spec: str | None, where: str) -> None:
    """A number format such as ``.2f`` or ``.3g``."""
    if spec is None:
        return
    try:
        format(1.5, spec)
    except (TypeError, ValueError) as err:
        raise ReportSpecError(f"{where}={spec!r} is not a number format (e.g. .2f, .3g): {err}") from err


def check_test(test: Any, where: str) -> None:
    """One column's test (see the module docstring)."""
    if isinstance(test, dict):
        unknown = sorted(set(test) - set(TESTS))
        if unknown or not test:
            raise ReportSpecError(f"{where}: unknown test {unknown or '{}'} (tests: {', '.join(TESTS)})")
        for name in ("present", "empty"):
            if name in test and not isinstance(test[name], bool):
                raise ReportSpecError(f"{where}.{name}={test[name]!r} must be true or false")
        for name in ("same_as", "not_same_as"):
            if name in test and not isinstance(test[name], str):
                raise ReportSpecError(f"{where}.{name}={test[name]!r} must name a column")
        if "any" in test:
            if not isinstance(test["any"], list) or not test["any"]:
                raise ReportSpecError(f"{where}.any must be a non-empty list of tests")
            for i, one in enumerate(test["any"]):
                check_test(one, f"{where}.any[{i}]")
        if "not" in test:
            check_test(test["not"], f"{where}.not")
    elif isinstance(test, list):
        if not test or any(isinstance(v, dict | list) for v in test):
            raise ReportSpecError(f"{where}: a list test is a non-empty list of values")
    elif isinstance(test, float) and math.isnan(test):
        raise ReportSpecError(f"{where}: test for a missing value with {{present: false}}, not NaN")


def check_where(where_: dict, where: str) -> None:
    for column, test in (where_ or {}).items():
        check_test(test, f"{where}.{column}")


def check_path(path: str, suffix: str, where: str) -> None:
    """A relative path inside the output folder, ending in ``suffix``."""
    pure = PurePosixPath(str(path))
    if pure.is_absolute() or ".." in pure.parts or not pure.name:
        raise ReportSpecError(f"{where}={path!r} must be a relative path inside the output folder")
    if pure.suffix != suffix:
        raise ReportSpecError(f"{where}={path!r} must end in {suffix}")


def check_one_of(value: Any, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ReportSpecError(f"{where}={value!r} must be one of {', '.join(choices)}")


def check_derived(name: str, spec: dict, where: str) -> None:
    """A derived column: exactly one derivation, with what it needs."""
    given = [d for d in DERIVATIONS if spec.get(d) not in (None, [], "")]
    if len(given) != 1:
        raise ReportSpecError(
            f"{where} needs exactly one of {', '.join(DERIVATIONS)} (got {', '.join(given) or 'none'})"
        )
    for i, case in enumerate(spec.get("cases") or []):
        check_where(case.get("when") or {}, f"{where}.cases[{i}].when")
    for key in ("format", "default"):
        if spec.get(key) is not None:
            template_fields(spec[key], f"{where}.{key}")
    if spec.get("difference") and len(spec["difference"]) != 2:
        raise ReportSpecError(f"{where}.difference must name two columns [a, b] (a − b)")


def check_cells(table: dict, where: str) -> None:
    """The columns of a ``groups`` table."""
    if not table.get("columns"):
        raise ReportSpecError(f"{where}.columns: a groups table needs at least one column")
    for j, cell in enumerate(table["columns"]):
        at = f"{where}.columns[{j}]"
        check_one_of(cell.get("show", "interval"), SHOWS, f"{at}.show")
        if cell.get("show") == "template":
            if not cell.get("template"):
                raise ReportSpecError(f"{at}: show=template needs template: ...")
            template_fields(cell["template"], f"{at}.template")
            if not cell.get("header"):
                raise ReportSpecError(f"{at}: a template column needs a header")
        elif cell.get("show") in ("interval", "mean") and not cell.get("metric"):
            raise ReportSpecError(f"{at}: show={cell.get('show')} needs metric: ...")
        check_number_format(cell.get("format"), f"{at}.format")
        if table.get("spread") and cell.get("header"):
            template_fields(cell["header"], f"{at}.header")


def check_table(table: dict, where: str) -> None:
    check_path(table.get("file", ""), ".md", f"{where}.file")
    if table.get("csv") is not None:
        check_path(table["csv"], ".csv", f"{where}.csv")
    check_one_of(table.get("kind", "groups"), TABLE_KINDS, f"{where}.kind")
    check_where(table.get("where") or {}, f"{where}.where")
    group_by = list(table.get("group_by") or [])
    if len(set(group_by)) != len(group_by):
        raise ReportSpecError(f"{where}.group_by={group_by} names a column twice")
    if table.get("kind", "groups") == "groups":
        if table.get("spread") in group_by:
            raise ReportSpecError(f"{where}.spread={table['spread']!r} is also in group_by")
        check_cells(table, where)
        return
    if not table.get("compare"):
        raise ReportSpecError(f"{where}: a paired table needs compare: <the column whose values are paired>")
    if table["compare"] in group_by:
        raise ReportSpecError(f"{where}.compare={table['compare']!r} is also in group_by")
    if not table.get("metrics"):
        raise ReportSpecError(f"{where}.metrics: a paired table needs the metrics it compares")
    check_one_of(table.get("layout", "long"), LAYOUTS, f"{where}.layout")
    if table.get("baselines") and table.get("baseline") is not None:
        raise ReportSpecError(f"{where}: give baseline (one) or per + baselines (one per value), not both")
    if bool(table.get("baselines")) != bool(table.get("per")):
        raise ReportSpecError(f"{where}: per and baselines go together (per: model, baselines: {{model: arm}})")
    if table.get("per") and table.get("layout", "long") == "wide":
        raise ReportSpecError(f"{where}: per-value baselines need layout=long")
    check_number_format(table.get("format"), f"{where}.format")
    check_number_format(table.get("p_format", ".3g"), f"{where}.p_format")


def check_figure(figure: dict, where: str) -> None:
    check_path(figure.get("file", ""), ".png", f"{where}.file")
    if not figure.get("x"):
        raise ReportSpecError(f"{where}.x is required: the column on the x axis")
    if not figure.get("y"):
        raise ReportSpecError(f"{where}.y: name at least one metric")
    check_one_of(figure.get("xscale", "linear"), XSCALES, f"{where}.xscale")
    check_where(figure.get("where") or {}, f"{where}.where")
    along = figure.get("along") or figure["x"]
    keys = [*(figure.get("lines") or []), along, *([figure["panels"]] if figure.get("panels") else [])]
    if len(set(keys)) != len(keys):
        raise ReportSpecError(f"{where}: lines, along and panels must be different columns ({keys})")
    for key in ("xlabel", "ylabel", "title", "suptitle"):
        if figure.get(key):
            template_fields(figure[key], f"{where}.{key}")


def check_report(report: dict) -> None:
    """Raise ReportSpecError (one line) for a ``report:`` section that cannot be drawn from any rows."""
    rows = report.get("rows") or {}
    check_where(rows.get("where") or {}, "report.rows.where")
    for name, spec in (rows.get("derive") or {}).items():
        check_derived(name, spec or {}, f"report.rows.derive.{name}")
    files: dict[str, str] = {}
    for i, table in enumerate(report.get("tables") or []):
        check_table(table, f"report.tables[{i}]")
        files.setdefault(str(table["file"]), f"report.tables[{i}]")  # tables naming one file share it
        if table.get("csv"):
            if table["csv"] in files:
                raise ReportSpecError(
                    f"report.tables[{i}].csv={table['csv']!r} is also written by {files[table['csv']]}"
                )
            files[table["csv"]] = f"report.tables[{i}]"
    for i, figure in enumerate(report.get("figures") or []):
        at = f"report.figures[{i}]"
        check_figure(figure, at)
        if figure["file"] in files:
            raise ReportSpecError(f"{at}.file={figure['file']!r} is also written by {files[figure['file']]}")
        files[figure["file"]] = at
    if not report.get("tables") and not report.get("figures"):
        raise ReportSpecError("report: declares no table and no figure")


# -- the columns named, against the rows' columns --------------------------------------------------------------
def _need(have: set[str], columns: Iterable[str], where: str) -> None:
    for column in columns:
        if column not in have:
            close = difflib.get_close_matches(column, sorted(have), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ReportSpecError(f"{where}: no column {column!r} in the rows{hint}")


def _where_columns(where: dict) -> list[str]:
    def targets(test) -> list[str]:
        if not isinstance(test, dict):
            return []
        found = [test[k] for k in ("same_as", "not_same_as") if k in test]
        for one in [*test.get("any", []), *([test["not"]] if "not" in test else [])]:
            found += targets(one)
        return found

    return [c for column, test in (where or {}).items() for c in (column, *targets(test))]


def _template_columns(fields: list[str], have: set[str]) -> list[str]:
    """The columns behind a cell template's fields: ``psnr_mean`` → psnr, ``n`` → none."""
    out = []
    for name in fields:
        base, _, stat = name.rpartition("_")
        if name in have or name == "n":
            out += [name] if name != "n" else []
        else:
            out.append(base if stat in STATS and base else name)
    return out


def check_columns(columns: Iterable[str], report: dict) -> None:
    """Every column the section names is a column of the rows (or derived before it is used)."""
    have = set(columns) | {"run_dir"}
    rows = report["rows"]
    for name, spec in rows["derive"].items():
        at = f"report.rows.derive.{name}"
        for key in ("format", "default"):
            if spec.get(key):
                _need(have, template_fields(spec[key], f"{at}.{key}"), f"{at}.{key}")
        for case in spec["cases"]:
            _need(have, _where_columns(case["when"]), f"{at}.cases")
        _need(have, [*spec["sum"], *spec["difference"]], at)
        _need(have, [spec["per_image_of_job"]] if spec.get("per_image_of_job") else [], at)
        have.add(name)
    _need(have, _where_columns(rows["where"]), "report.rows.where")
    _need(have, rows["unique"], "report.rows.unique")
    for i, t in enumerate(report["tables"]):
        at = f"report.tables[{i}]"
        named = [*t["group_by"], *(c for c in (t["spread"], t["compare"], t["per"]) if c), *t["metrics"]]
        for cell in t["columns"]:
            named += [cell["metric"]] if cell.get("metric") else []
            if cell.get("template"):
                named += _template_columns(template_fields(cell["template"], at), have)
        _need(have, [*named, *_where_columns(t["where"])], at)
    for i, f in enumerate(report["figures"]):
        named = [f["x"], *f["y"], *f["lines"], *_where_columns(f["where"])]
        named += [c for c in (f["along"], f["panels"], f["annotate"], f["styles"], f["marks"]) if c]
        _need(have, named, f"report.figures[{i}]")
