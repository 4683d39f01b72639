"""Config helpers: the typed schema (Hydra ConfigStore), resolvers, and validation before any model loads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from ddim_lab.errors import ConfigError

TASKS = ("reconstruct", "edit", "sample", "alpha_plot", "controlnet")
INPUT_TASKS = ("reconstruct", "edit", "controlnet")  # the tasks that read data.path
FLOW_FAMILIES = ("sd3", "flux")  # model families without a UNet (``model.family``)
GRIDS = ("sheet", "groups")  # reconstruct/edit images: one contact sheet per job, or also one grid per group
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's conf/ (install with pip -e)
SCHEMA_NAME = "ddim_lab_schema"
LPIPS_NETS = ("alex", "vgg", "squeeze")


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


# -- a study's declared tables and figures (``report:``; the vocabulary: ddim_lab/config/report_spec.py) ---------
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
    seed: int = 0
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


def register_resolvers() -> None:
    """``${asset:NAME}`` → the path of ``ddim_lab/assets/NAME`` in the installed package; also stores the
    schema (both are needed before Hydra composes)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver(
            "asset", lambda name: str(resources.files("ddim_lab") / "assets" / name)
        )
    if not OmegaConf.has_resolver("unless_budget"):  # num_steps' default: ${unless_budget:50}
        OmegaConf.register_new_resolver("unless_budget", lambda steps: steps)
    if not OmegaConf.has_resolver("options"):  # `--help` lists each group's options: ${options:inverter}
        OmegaConf.register_new_resolver("options", help_options)
    register_configs()


def group_options(group: str, kind: str = "") -> list[str]:
    """The options of config group ``group`` (its YAML files in :func:`config_dir`), sorted; ``kind``:
    ``unet`` or ``flow`` keeps the models of that kind (by their ``family:`` key)."""
    options = {p.stem: p for p in (config_dir() / group).glob("*.yaml")}
    if kind:
        flow = {name for name, p in options.items() if OmegaConf.load(p).get("family") in FLOW_FAMILIES}
        options = {name: p for name, p in options.items() if (name in flow) == (kind == "flow")}
    return sorted(options)


HELP_INDENT = 16  # the column where `--help` lists a group's options


def help_options(group: str, kind: str = "") -> str:
    """``group_options`` as `--help` shows them: the default marked, wrapped under the first line's column."""
    import textwrap

    defaults = {}
    for entry in OmegaConf.load(config_dir() / "config.yaml").get("defaults", []):
        if isinstance(entry, DictConfig):
            defaults.update({str(k): str(v) for k, v in entry.items()})
    names = [f"{o} (default)" if defaults.get(group) == o else o for o in group_options(group, kind)]
    indent = " " * HELP_INDENT
    lines = textwrap.wrap(", ".join(names), 110 - HELP_INDENT, break_on_hyphens=False)
    return ("\n" + indent).join(lines)


def config_dir() -> Path:
    """The config folder: ``ddim_lab/conf`` inside an installed wheel, else the checkout's ``conf/``."""
    packaged = Path(str(resources.files("ddim_lab"))) / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return CONF_DIR


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The lab's config as the CLI composes it, via Hydra's compose API (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _annotated(cfg: DictConfig) -> bool:
    """Whether ``data.path`` is a PIE-Bench-format folder (images with their own edit annotation)."""
    from ddim_lab.data.pie import is_pie_dir

    path = OmegaConf.select(cfg, "data.path", throw_on_missing=False)
    return path is not None and is_pie_dir(path)


def as_list(value: Any) -> list:
    """A scalar or a list-valued config entry as a list (``None`` → ``[]``)."""
    if value is None:
        return []
    if isinstance(value, ListConfig | Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def check_device(name: str) -> None:
    """Raise ConfigError when ``runtime.device`` names a device this machine does not have."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"runtime.device={name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"runtime.device={name}: CUDA is not available here (torch {torch.__version__}); "
                "use runtime.device=auto or cpu"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"runtime.device={name}: only {count} CUDA device(s) are visible")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"runtime.device={name}: MPS is not available here; use runtime.device=auto")
    elif device.type != "cpu":
        raise ConfigError(f"runtime.device={name!r} is not supported (auto, cpu, cuda, cuda:N, mps)")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one clear line) for values that cannot run."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        hint = " (data=folder takes your images: data.path=/path/to/images)" if key == "data.path" else ""
        raise ConfigError(f"{key} is required: set {key}=...{hint}")
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {', '.join(TASKS)}")
    check_data(cfg)
    check_scorers(cfg)
    budgeted = OmegaConf.select(cfg, "budget.nfe") is not None
    if budgeted:
        from ddim_lab.config.budget import budget_steps, check_budget_input

        check_budget_input(cfg)  # the budget picks num_steps: a num_steps of the user's beside it is refused
    n = cfg.num_steps
    if not isinstance(n, int) or n < 1 or n > 1000:
        raise ConfigError(f"num_steps={n!r} must be an integer in [1, 1000]")
    for key, values in (
        ("guidance_scale", as_list(cfg.guidance_scale)),
        (
            "inversion.guidance_scale",
            [] if cfg.inversion.guidance_scale == "match" else [cfg.inversion.guidance_scale],
        ),
    ):
        for g in values:
            if not isinstance(g, int | float) or isinstance(g, bool) or g < 0:
                raise ConfigError(f"{key}={g!r} must be a number >= 0")
    starts = as_list(cfg.start_step)
    if not starts:
        raise ConfigError("start_step is empty")
    for k in starts:
        if not isinstance(k, int) or isinstance(k, bool):
            raise ConfigError(f"start_step={k!r} must be an integer in [0, num_steps={n})")
    if cfg.eta < 0:
        raise ConfigError(f"eta={cfg.eta!r} must be >= 0")
    if cfg.task in ("reconstruct", "edit"):
        if budgeted:
            budget_steps(cfg)  # the inverter's check at the step count the budget gives, or too small a budget
        else:
            check_inverter(cfg, starts)
        check_editor(cfg)
    if cfg.task == "sample" and len(as_list(cfg.guidance_scale)) != 1:
        raise ConfigError("task=sample takes one guidance_scale; sweep several with -m guidance_scale=a,b")
    if cfg.task == "edit" and not as_list(cfg.edit_prompt) and not _annotated(cfg):
        raise ConfigError(
            "task=edit needs edit_prompt=... (a string or a list), or PIE-Bench-format data (data=pie) whose"
            " images carry their own target prompts"
        )
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} must be >= 1")
    if cfg.metrics.lpips not in ("auto", "required", "off"):
        raise ConfigError(f"metrics.lpips={cfg.metrics.lpips!r} must be auto, required or off")
    if cfg.metrics.lpips_net not in LPIPS_NETS:
        raise ConfigError(f"metrics.lpips_net={cfg.metrics.lpips_net!r} must be one of {', '.join(LPIPS_NETS)}")
    if cfg.runtime.dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"runtime.dtype={cfg.runtime.dtype!r} must be fp32, fp16 or bf16")
    check_device(str(cfg.runtime.device))
    from ddim_lab.config.control_checks import check_control

    check_control(cfg)
    check_model_fit(cfg)
    if cfg.get("grids", "sheet") not in GRIDS:
        raise ConfigError(f"grids={cfg.grids!r} must be one of {', '.join(GRIDS)}")
    if cfg.get("tune") is not None:
        from ddim_lab.config.tune import check_tune

        if cfg.task != "edit":
            raise ConfigError(f"tune (an Optuna objective over edit rows) needs task=edit, got task={cfg.task}")
        check_tune(cfg.tune)
    if cfg.get("report") is not None:
        from ddim_lab.config.report_spec import check_report

        try:
            check_report(OmegaConf.to_container(cfg.report, resolve=True))
        except ValueError as err:
            raise ConfigError(str(err)) from err


def check_data(cfg: DictConfig) -> None:
    """``data.path`` of a task that reads images exists and holds an image (none is decoded here)."""
    from ddim_lab.data.folders import IMAGE_SUFFIXES, find_images

    if cfg.task not in INPUT_TASKS:
        return
    path = Path(str(cfg.data.path))
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"data.path={cfg.data.path} does not exist{where}")
    if path.is_dir() and not find_images(path):
        raise ConfigError(f"data.path={cfg.data.path} holds no image ({', '.join(IMAGE_SUFFIXES)})")


def check_scorers(cfg: DictConfig) -> None:
    """Every ``data.scorers`` entry names an importable scorer of declared columns (``ddim_lab.data.scoring``);
    importing it loads no model."""
    from ddim_lab.data.scoring import scorer_classes

    try:
        scorer_classes(as_list(OmegaConf.select(cfg, "data.scorers")))
    except ValueError as err:
        raise ConfigError(f"data.scorers: {err}") from err


def config_family(model: DictConfig) -> str | None:
    """The model's family from its config: ``family:`` (or a built model's ``arch.family``); ``sd`` for the
    other shipped, built and hub models; None when only the model directory can tell (``model=local``)."""
    family = model.get("family") or (model.get("arch") or {}).get("family")
    if family:
        return str(family)
    return None if model.get("source") == "local" else "sd"


def check_editor_fits(editor: str, model: str, family: str | None) -> None:
    """Raise ConfigError when ``editor`` cannot run on a model of ``family`` (p2p needs a UNet)."""
    if editor == "p2p" and family in FLOW_FAMILIES:
        raise ConfigError(
            f"editor=p2p controls a UNet's cross-attention; model={model} is a flow model ({family}) without"
            " one: use editor=prompt_swap, or a UNet model"
        )


def known_family(model: DictConfig) -> str | None:
    """``config_family``, else (``model=local``) the family its directory's model_index.json names; None
    when that cannot be read (the loaded model tells)."""
    family = config_family(model)
    if family is not None:
        return family
    from ddim_lab.models.loading import ModelUnavailable, model_dir, model_family

    spec = OmegaConf.to_container(model, resolve=True)
    try:
        return model_family(spec, model_dir(spec, ""))
    except (ModelUnavailable, ValueError):
        return None


def check_inverter_fits(inverter: Any, model: DictConfig) -> None:
    """Raise ConfigError when a flow-model knob of the inverter is set for a UNet model: ``inverter.time``
    (where RF-Inversion's inversion evaluates the flow model)."""
    time = inverter.get("time")
    if time is None:
        return
    family = known_family(model)
    if family is not None and family not in FLOW_FAMILIES:
        raise ConfigError(
            f"inverter.time={time} sets where a flow model's inversion evaluates; model={model.name} is a UNet"
            f" model ({family}): drop inverter.time, or use a flow model (model=digits-flow, sd3-medium, ...)"
        )


def check_model_fit(cfg: DictConfig) -> None:
    """The editor, the inverter and the ControlNet against the model, from configs alone (no weights): p2p on
    a flow model, ``inverter.time`` on a UNet model, a ControlNet on a flow model or of another UNet's shape.
    What only the loaded model can tell (a ``model=local`` family, a hub model not cached here) is checked
    after loading (``ddim_lab.cli.main``)."""
    family = config_family(cfg.model)
    editor = (cfg.get("editor") or {}).get("name", "prompt_swap")
    if cfg.task in ("reconstruct", "edit"):
        check_editor_fits(editor, cfg.model.name, family)
        check_inverter_fits(cfg.get("inverter") or {}, cfg.model)
    controlnet = cfg.get("controlnet") or {}
    if controlnet.get("source", "none") != "none" and cfg.task != "alpha_plot":
        from ddim_lab.models.loading import check_controlnet_fit, controlnet_config, network_configs

        if family in FLOW_FAMILIES:
            raise ConfigError(
                f"controlnet={controlnet.name}: ControlNets are UNet-only; model={cfg.model.name} is a flow"
                f" model ({family}): use controlnet=none"
            )
        model = network_configs(cfg.model, cfg.cache.dir)
        net = controlnet_config(controlnet, cfg.cache.dir)
        if model is not None and net is not None:
            check_controlnet_fit(*model, net, controlnet.name, cfg.model.name)


def check_inverter(cfg: DictConfig, starts: list[int]) -> None:
    """The inverter's own check of num_steps, start steps and eta (no model needed)."""
    from ddim_lab.methods.inversion import make_inverter

    spec = OmegaConf.to_container(cfg.inverter, resolve=True)
    try:
        make_inverter(spec).check(cfg.num_steps, starts, float(cfg.eta))
    except (ValueError, KeyError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from err


def check_editor(cfg: DictConfig) -> None:
    """The editor's own check of its knobs (no model needed)."""
    from ddim_lab.methods.editing import make_editor

    spec = OmegaConf.to_container(cfg.editor, resolve=True) if "editor" in cfg else None
    try:
        make_editor(spec)
    except (ValueError, KeyError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from err


def job_environment() -> dict[str, str]:
    """The environment a job sees (kept for provenance of launcher-set variables)."""
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    return {k: os.environ[k] for k in keys if k in os.environ}
