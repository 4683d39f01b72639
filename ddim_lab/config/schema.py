"""The typed schema of the lab's config (Hydra ConfigStore): one dataclass per section of ``conf/config.yaml``,
whose values stay in the YAML; misspelled keys and wrong types fail as Hydra composes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA_NAME = "ddim_lab_schema"


# -- the typed schema of the primary config (conf/config.yaml keeps the values) ---------------------------
@dataclass
class InversionSchema:
    guidance_scale: Any = 1.0  # a number >= 0, or "match": invert at each sampling guidance of the grid


@dataclass
class MetricsSchema:
    lpips: str = "auto"
    lpips_net: str = "alex"


@dataclass
class CacheSchema:
    enabled: bool = True
    dir: str = ".cache/ddim_lab"


@dataclass
class RuntimeSchema:
    device: str = "auto"
    dtype: str = "fp32"
    vae_fp32: bool = True
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    cpu_offload: bool = False
    progress: bool = True


@dataclass
class DataSchema:
    path: str = MISSING
    categories: list[Any] | None = None  # PIE-Bench-format data: editing types to keep (None = all)
    captions: bool = True  # false: ignore the images' captions, every image's source prompt is `prompt`
    scorers: list[str] = field(default_factory=list)  # the data set's row scores: names or "module:Class"
    edit_prompt: str | None = None  # task=edit's target when edit_prompt is not given (digits: into an eight)


@dataclass
class BudgetSchema:
    """``budget.nfe=K``: each method runs at the largest num_steps whose rows cost at most K model evaluations
    (inversion + that row's trajectory, by the method's formulas; ``ddim_lab/config/budget.py``). None: off."""

    nfe: int | None = None


@dataclass
class TuneSchema:
    """An Optuna sweep's objective, read from the results table a job wrote (``ddim_lab/config/tune.py``):
    the mean of ``metric`` over the edit rows, less ``penalty`` when the mean of ``floor_metric`` is under
    ``floor``. Maximised."""

    metric: str = "edit_success"
    floor_metric: str = "psnr_unedited"
    floor: float = 25.0
    penalty: float = 1.0


# -- a study's declared tables and figures (``report:``; the vocabulary: ddim_lab/config/report_spec.py) ------
@dataclass
class StudyCaseSchema:
    when: dict[str, Any] = field(default_factory=dict)  # column → test: all must hold
    value: str = MISSING


@dataclass
class StudyColumnSchema:
    """A column derived from each row: one of ``cases`` (first that holds, else ``default``), ``format`` (a
    template of the row's columns), ``sum``, ``difference`` (a − b) or ``per_image_of_job`` (a job's total over
    its images)."""

    cases: list[StudyCaseSchema] = field(default_factory=list)
    default: str | None = None
    format: str | None = None
    sum: list[str] = field(default_factory=list)
    difference: list[str] = field(default_factory=list)
    fill: float | None = None  # sum/difference: what a missing value counts as (None: the result is missing)
    per_image_of_job: str | None = None


@dataclass
class StudyRowsSchema:
    """The rows every table and figure starts from: derived columns, then the ``where`` filter, then one row
    per ``unique`` combination (a repeated computation kept once)."""

    require: list[str] = field(default_factory=list)  # columns some row must have a value in
    derive: dict[str, StudyColumnSchema] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)
    unique: list[str] = field(default_factory=list)


@dataclass
class StudyCellSchema:
    metric: str | None = None
    show: str = "interval"  # interval | mean | n | template
    template: str | None = None  # fields: <metric>_mean/_low/_high/_n, n, columns
    header: str | None = None
    format: str | None = None  # a number format such as .2f (default: 4 significant digits)


@dataclass
class StudyTableSchema:
    """``groups``: a row per ``group_by`` combination (columns repeated per ``spread`` value: a pivot);
    ``paired``: ``compare``'s values against a baseline on the same images, within ``group_by``."""

    file: str = MISSING  # markdown, relative to the output folder; tables naming one file share it, in order
    kind: str = "groups"
    caption: str = ""
    group_by: list[str] = field(default_factory=list)
    where: dict[str, Any] = field(default_factory=dict)
    columns: list[StudyCellSchema] = field(default_factory=list)
    spread: str | None = None
    compare: str | None = None
    baseline: str | None = None
    per: str | None = None  # with baselines: one baseline per value of this column
    baselines: dict[str, str] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    layout: str = "long"  # paired: long (a row per comparison) | wide (levels side by side)
    format: str | None = None
    p_format: str = ".3g"
    csv: str | None = None  # the numbers behind the table


@dataclass
class StudyFigureSchema:
    """Each ``y`` metric (a row of panels) against ``x`` (a key, or a column's mean per point), a line per
    ``lines`` combination through the values of ``along``, a column of panels per ``panels`` value."""

    file: str = MISSING  # PNG, relative to the output folder
    x: str = MISSING
    y: list[str] = field(default_factory=list)
    along: str | None = None  # default: x
    lines: list[str] = field(default_factory=list)
    panels: str | None = None
    where: dict[str, Any] = field(default_factory=dict)
    bands: bool = True
    xbars: bool = False  # x a column's mean: its interval as horizontal bars (a trade-off plot)
    front: bool = False  # mark the Pareto front of each panel's points (better on both axes)
    annotate: str | None = None
    styles: str | None = None  # a line style per value of this column
    marks: str | None = None  # grey vertical lines at this column's values
    xscale: str = "linear"
    xlabel: str | None = None
    ylabel: str | None = None  # templates: {metric}, {label}, {panel}
    title: str | None = None
    suptitle: str | None = None


@dataclass
class ReportSchema:
    """What ``ddim-lab-report DIR`` writes for a study, read from the sweep's saved config."""

    rows: StudyRowsSchema = field(default_factory=StudyRowsSchema)
    tables: list[StudyTableSchema] = field(default_factory=list)
    figures: list[StudyFigureSchema] = field(default_factory=list)


@dataclass
class SchedulerSchema:
    name: str = MISSING
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabConfig:
    """Every key of ``ddim-lab``; ``model``, ``inverter`` and ``logger`` are free-form (their keys differ per
    option), ``guidance_scale``/``start_step``/``prompt``/``edit_prompt`` take a value or a list."""

    model: dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    inverter: dict[str, Any] = field(default_factory=dict)
    editor: dict[str, Any] = field(default_factory=dict)  # conf/editor: prompt_swap | p2p and its knobs
    data: DataSchema = field(default_factory=DataSchema)
    logger: dict[str, Any] = field(default_factory=dict)
    task: str = "reconstruct"
    num_steps: int = (
        50  # conf/config.yaml: ${unless_budget:50}, replaced by any setting (ddim_lab/config/budget.py)
    )
    guidance_scale: Any = 1.0
    inversion: InversionSchema = field(default_factory=InversionSchema)
    start_step: Any = 0
    prompt: Any = ""
    edit_prompt: Any = None
    negative_prompt: str = ""
    seed: Any = 0  # an integer, or a list of replicate seeds of a stochastic method (seed=[0,1,2])
    eta: float = 0.0
    batch_size: int = 16
    num_images: int = 4
    metrics: MetricsSchema = field(default_factory=MetricsSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    runtime: RuntimeSchema = field(default_factory=RuntimeSchema)
    control: dict[str, Any] = field(default_factory=dict)  # conf/control: the ControlNet input signal
    controlnet: dict[str, Any] = field(default_factory=dict)  # conf/controlnet: the ControlNet model
    sampler: str = "ddim"  # task=controlnet: ddim | unipc | dpmpp
    grids: str = "sheet"  # sheet: one contact sheet per job (grid_sheet.png) | groups: also one grid per group
    budget: BudgetSchema = field(default_factory=BudgetSchema)
    tune: TuneSchema | None = None  # set by a tuning preset: the job returns its objective to the sweeper
    report: ReportSchema | None = None  # set by a study preset: its tables and figures (ddim-lab-report)


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore; ``conf/config.yaml`` lists it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=LabConfig)
