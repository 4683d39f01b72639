"""Scorers: the per-row measures a data set brings, chosen by its config (``scorers:`` in ``conf/data/*.yaml``).

One contract, :class:`Scorer`: built once per run from a :class:`ScoringContext`, it reads a :class:`ScoreBatch`
(result rows with their prompts and, for rows made from an input image, the input and its item) and returns the
columns it measures, one value per row. A batch it does not apply to gets no column (``{}``); a row it does not
apply to gets NaN. Its columns are declared in :mod:`ddim_lab.schema`, the one definition of the result columns,
and named in ``columns``.

A config names a scorer by its registry name (:data:`SCORERS`) or as ``"module:Class"`` (a researcher's own
scorer: nothing to register, the runner unchanged). Classes are imported on first use; :func:`scorer_classes`
resolves and checks every name, and the config validation calls it before any model loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ddim_lab import schema

if TYPE_CHECKING:
    from ddim_lab.data.folders import Item

# name → "module:class"; imported on first use
SCORERS: dict[str, str] = {
    "pie_masked": "ddim_lab.metrics.edit:MaskedEditScorer",
    "digit_edit_success": "ddim_lab.data.digits_pie:DigitEditSuccess",
    "digit_judge_agreement": "ddim_lab.data.judge:JudgeAgreement",
}


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer may need of the run besides its rows: where to compute and the metric settings."""

    device: str | torch.device = "cpu"
    lpips_net: str = "alex"  # metrics.lpips_net
    lpips: str = "auto"  # metrics.lpips: auto | required | off
    model_source: str | None = None  # model.source: which model made the images (``digits``, ``hub``, …)

    @classmethod
    def of(cls, cfg: Any, device: str | torch.device) -> ScoringContext:
        """The context of a composed lab config whose model runs on ``device``."""
        return cls(
            device=device,
            lpips_net=str(cfg.metrics.lpips_net),
            lpips=str(cfg.metrics.lpips),
            model_source=cfg.model.get("source"),
        )


@dataclass(frozen=True)
class ScoreBatch:
    """B result rows to score, row-aligned."""

    results: torch.Tensor  # (B, 3, R, R) in [0, 1]: each row's result image
    prompts: Sequence[str]  # each row's prompt: an edit's target, else the source (or generation) prompt
    sources: torch.Tensor | None = None  # (B, 3, R, R) in [0, 1]: the input each row remakes; None: generated
    items: Sequence[Item] | None = None  # each row's input item (a PieItem carries its annotation)
    edits: Sequence[bool] | None = None  # whether each row is an edit (else a reconstruction); None: generated

    @property
    def generated(self) -> bool:
        """Rows generated from noise (``task=sample``, ``task=controlnet``), with no input image."""
        return self.sources is None


class Scorer:
    """The scorer contract. Subclasses set ``name`` and ``columns`` (schema columns, none of them core) and
    implement :meth:`score`; :meth:`summary` adds run-wide counts to ``run.json``."""

    name: str = ""
    columns: tuple[str, ...] = ()

    def __init__(self, context: ScoringContext) -> None:
        self.context = context

    def score(self, batch: ScoreBatch) -> dict[str, list[float]]:
        """``{column: one float per row}`` for the columns this batch has; ``{}`` when it does not apply."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Counts over every batch scored so far, for ``run.json`` (none by default)."""
        return {}


def scorer_class(spec: str) -> type[Scorer]:
    """The class a ``data.scorers`` entry names: a registry name or ``"module:Class"``; ValueError (one line)
    when it cannot be imported or is no :class:`Scorer` whose columns the schema declares."""
    if spec in SCORERS:
        target = SCORERS[spec]
    elif ":" in spec:
        target = spec
    else:
        raise ValueError(f"unknown scorer {spec!r}: choose one of {', '.join(SCORERS)}, or give 'module:Class'")
    module, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ValueError(f"scorer {spec!r}: cannot import {module!r} ({err})".replace("\n", " ")) from err
    except AttributeError as err:
        raise ValueError(f"scorer {spec!r}: {module!r} has no {name!r}") from err
    if not (isinstance(cls, type) and issubclass(cls, Scorer)) or not cls.name or not cls.columns:
        raise ValueError(f"scorer {spec!r} is not a ddim_lab.data.scoring.Scorer with a name and columns")
    undeclared = [c for c in cls.columns if c not in schema.BY_NAME]
    if undeclared:
        raise ValueError(f"scorer {spec!r} writes undeclared columns {undeclared}: declare them in schema.py")
    core = [c for c in cls.columns if schema.BY_NAME[c].core]
    if core:
        raise ValueError(f"scorer {spec!r} writes the core columns {core}, which the run itself measures")
    return cls


def scorer_classes(specs: Sequence[str]) -> list[type[Scorer]]:
    """:func:`scorer_class` of every entry; also a ValueError when two scorers would write the same column."""
    classes = [scorer_class(str(s)) for s in specs]
    seen: dict[str, str] = {}
    for spec, cls in zip(specs, classes, strict=True):
        for column in cls.columns:
            if column in seen:
                raise ValueError(f"scorers {seen[column]!r} and {spec!r} both write {column!r}; keep one")
            seen[column] = str(spec)
    return classes


def make_scorers(specs: Sequence[str], context: ScoringContext) -> list[Scorer]:
    """The scorers ``specs`` names (``data.scorers``), built for ``context``."""
    return [cls(context) for cls in scorer_classes(specs)]


def score_rows(scorers: Sequence[Scorer], batch: ScoreBatch) -> dict[str, list[float]]:
    """Every scorer's columns for ``batch``, each one value per row."""
    rows = len(batch.results)
    out: dict[str, list[float]] = {}
    for scorer in scorers:
        scores = scorer.score(batch)
        stray = sorted(set(scores) - set(scorer.columns))
        if stray:
            raise ValueError(f"scorer {scorer.name!r} wrote {stray}, which its columns do not name")
        for column, values in scores.items():
            if len(values) != rows:
                raise ValueError(f"scorer {scorer.name!r}: {len(values)} values of {column!r} for {rows} rows")
        out.update(scores)
    return out


def scorer_summary(scorers: Sequence[Scorer]) -> dict[str, Any]:
    """The scorers' run-wide counts for ``run.json``, merged."""
    out: dict[str, Any] = {}
    for scorer in scorers:
        out.update(scorer.summary())
    return out
