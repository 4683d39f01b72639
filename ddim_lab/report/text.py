"""Values and tables as the report writes them: cells, labels, GitHub markdown and LaTeX (booktabs).

A cell is ``n/a`` when missing and a float with 4 significant digits (:func:`fmt`); a config value names a
reconstruction for an empty edit prompt (:func:`key_text`); a legend or caption writes a configuration as
``key=value, …`` (:func:`config_label`); a mean with its bootstrap interval is ``mean [low, high]``
(:func:`interval_cell`). :func:`markdown` and :func:`latex` write a table of such string cells.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from ddim_lab.schema import QUALIFIES

MISSING = "n/a"
RECONSTRUCTION = "(reconstruction)"
MARK = "†"  # beside scores by construction (ddim_lab.report.analysis.BY_CONSTRUCTION)


def fmt(value: object) -> str:
    """A cell as text: missing as ``n/a``, floats with 4 significant digits."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_text(key: str, value: object) -> str:
    """A config value as text; an empty (or, in older tables, missing) ``edit_prompt`` is a reconstruction."""
    missing = value is None or (pd.api.types.is_scalar(value) and pd.isna(value))
    if key == "edit_prompt" and (missing or value == ""):
        return RECONSTRUCTION
    return fmt(value)


def short_value(key: str, value: object) -> str:
    """A config value for a legend or caption: knobs (a JSON object) as ``k=v, k=v`` (empty for none), other
    values as :func:`key_text` writes them."""
    text = key_text(key, value)
    if text.startswith("{"):
        try:
            knobs = json.loads(text)
        except ValueError:
            return text
        if isinstance(knobs, dict):
            return ", ".join(f"{k}={json.dumps(v)}" for k, v in knobs.items())
    return text


def config_label(keys: list[str], values: tuple) -> str:
    """``key=value, …`` for a legend, a caption or an arm: a qualifier (``inverter_knobs``) in parentheses
    after the key it qualifies when both are shown, and left out when it holds no knobs."""
    given = dict(zip(keys, values, strict=True))
    parts = []
    for k, v in given.items():
        if QUALIFIES.get(k) in given:
            continue  # written after the key it qualifies
        text = f"{k}={short_value(k, v) or 'none'}"
        knobs = [short_value(q, given[q]) for q, of in QUALIFIES.items() if of == k and q in given]
        parts.append(text + "".join(f" ({t})" for t in knobs if t and t != MISSING))
    return ", ".join(parts)


def interval_cell(mean: float, low: float, high: float) -> str:
    """``mean [low, high]``; just the mean when there is no interval (one value, or every value equal);
    ``n/a`` when unmeasured."""
    if mean is None or not math.isfinite(mean):
        return MISSING
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low == high:
        return fmt(float(mean))
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-markdown table of string cells."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    if table.empty and not len(table.columns):
        return "(none)"
    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "−": "$-$",
    "Δ": r"$\Delta$",
    "→": r"$\to$",
    MARK: r"\dag{}",
}


def latex_escape(text: object) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex(table: pd.DataFrame, caption: str, label_: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): text columns left-aligned, the rest right."""
    if table.empty:
        return f"% {latex_escape(caption)}: no rows\n"
    numeric_like = [
        all(v == MISSING or v[:1].isdigit() or v[:1] in "-." + MARK for v in table[c].astype(str))
        for c in table.columns
    ]
    spec = "".join("r" if num else "l" for num in numeric_like)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
        *(" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label_}}}",
        r"\end{table}",
        "",
    ]
    return "\n".join(lines)
