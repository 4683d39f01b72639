"""Validation of a composed config before any model loads: each check raises ConfigError with one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddim_lab.config.budget import budget_steps, check_budget_input
from ddim_lab.config.compose import FLOW_FAMILIES, as_list, config_family, known_family
from ddim_lab.config.control_checks import check_control
from ddim_lab.config.report_spec import check_report
from ddim_lab.errors import ConfigError

TASKS = ("reconstruct", "edit", "sample", "alpha_plot", "controlnet")
INPUT_TASKS = ("reconstruct", "edit", "controlnet")  # the tasks that read data.path
GRIDS = ("sheet", "groups")  # reconstruct/edit images: one contact sheet per job, or also one grid per group
LPIPS_NETS = ("alex", "vgg", "squeeze")


def _annotated(cfg: DictConfig) -> bool:
    """Whether ``data.path`` is a PIE-Bench-format folder (images with their own edit annotation)."""
    from ddim_lab.data.pie import is_pie_dir

    path = OmegaConf.select(cfg, "data.path", throw_on_missing=False)
    return path is not None and is_pie_dir(path)


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
        if n == 1 and k != 0 and not budgeted:
            raise ConfigError(
                f"start_step={k}: at num_steps=1 the one sampling step starts from the fully inverted latent"
                " (the top timestep, t=999 with trailing spacing), so start_step must be 0"
            )
    if cfg.eta < 0:
        raise ConfigError(f"eta={cfg.eta!r} must be >= 0")
    seeds = as_list(cfg.seed)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"seed={seeds!r} must be an integer >= 0 or a list of them")
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"seed={seeds!r} repeats a seed: replicates need distinct seeds")
    if cfg.task in ("reconstruct", "edit"):
        if budgeted:
            budget_steps(cfg)  # the inverter's check at the step count the budget gives, or too small a budget
        else:
            check_inverter(cfg, starts)
        check_editor(cfg)
        if len(seeds) > 1:
            check_replicates(cfg, seeds)
    elif len(seeds) > 1:
        raise ConfigError(
            f"seed={seeds}: seed lists replicate reconstruct and edit runs; task={cfg.task} takes one"
        )
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
    check_control(cfg)
    check_model_fit(cfg)
    if cfg.get("grids", "sheet") not in GRIDS:
        raise ConfigError(f"grids={cfg.grids!r} must be one of {', '.join(GRIDS)}")
    if cfg.get("tune") is not None:
        from ddim_lab.config.tune import check_tune  # pandas loads only for a tuning preset

        if cfg.task != "edit":
            raise ConfigError(f"tune (an Optuna objective over edit rows) needs task=edit, got task={cfg.task}")
        check_tune(cfg.tune)
    if cfg.get("report") is not None:
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


def check_editor_fits(editor: str, model: str, family: str | None) -> None:
    """Raise ConfigError when ``editor`` cannot run on a model of ``family`` (p2p needs a UNet)."""
    if editor == "p2p" and family in FLOW_FAMILIES:
        raise ConfigError(
            f"editor=p2p controls a UNet's cross-attention; model={model} is a flow model ({family}) without"
            " one: use editor=prompt_swap, or a UNet model"
        )


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
        from ddim_lab.models.configs import controlnet_config, network_configs
        from ddim_lab.models.controlnet import check_controlnet_fit

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
        editor = make_editor(spec)
    except (ValueError, KeyError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from err
    inverter = (cfg.get("inverter") or {}).get("name")
    if not editor.needs_inversion and inverter != "none":
        raise ConfigError(
            f"editor={editor.name} starts from the clean image and inverts nothing: use inverter=none, not"
            f" inverter={inverter}"
        )
    if editor.needs_inversion and inverter == "none":
        raise ConfigError(
            f"inverter=none inverts nothing, and editor={editor.name} samples from an inverted latent: use"
            " editor=sdedit or editor=flowedit, or an inverter"
        )
    if getattr(editor, "requires_data_mask", False) and not _annotated(cfg):
        raise ConfigError(
            f"editor={editor.name} mask=data needs the data's edit masks; data.path={cfg.data.path} has none"
            " (no mapping_file.json): use editor.mask=derived (a mask from the prompts) or PIE-format data"
        )
    family = config_family(cfg.model)
    if editor.flow_only and family is not None and family not in FLOW_FAMILIES:
        raise ConfigError(
            f"editor={editor.name} runs on flow models only; model={cfg.model.name} is a {family} UNet model:"
            " use editor=sdedit, or a flow model"
        )


def check_replicates(cfg: DictConfig, seeds: list[int]) -> None:
    """A seed list replicates stochastic methods only: under a deterministic one every seed gives the same
    rows."""
    from ddim_lab.methods.editing import make_editor
    from ddim_lab.methods.inversion import make_inverter

    inverter = make_inverter(OmegaConf.to_container(cfg.inverter, resolve=True))
    editor = make_editor(OmegaConf.to_container(cfg.editor, resolve=True) if "editor" in cfg else None)
    if not (inverter.stochastic or editor.stochastic or float(cfg.eta) > 0):
        raise ConfigError(
            f"seed={seeds} changes nothing: inverter={inverter.name} with editor={editor.name} at"
            f" eta={cfg.eta:g} is deterministic, so every seed gives the same rows; give one seed (seed lists"
            " replicate sdedit, flowedit, edit_friendly, rf_inversion, or eta > 0)"
        )
