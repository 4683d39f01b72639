"""Checks of the control, controlnet and sampler settings that run before any model loads."""

from __future__ import annotations

from omegaconf import DictConfig

from ddim_lab.errors import ConfigError

SAMPLER_NAMES = ("ddim", "unipc", "dpmpp")  # task=controlnet: the lab's DDIM, UniPC, DPM-Solver++


def check_control(cfg: DictConfig) -> None:
    """Raise ConfigError when control and ControlNet settings cannot run together (no model needed)."""
    control = (cfg.get("control") or {}).get("name", "none")
    controlnet = cfg.get("controlnet") or {}
    has_net = controlnet.get("source", "none") != "none"
    if cfg.task == "controlnet" and (control == "none" or not has_net):
        raise ConfigError("task=controlnet needs control=canny|openpose|image and controlnet=... (not none)")
    if cfg.task in ("reconstruct", "edit") and (control == "none") != (not has_net):
        which = "controlnet=... (the ControlNet to run)" if has_net is False else "control=... (its input)"
        raise ConfigError(
            f"control={control} with controlnet={controlnet.get('name', 'none')}: also set {which}"
        )
    if cfg.task in ("sample", "alpha_plot") and has_net:
        raise ConfigError(f"task={cfg.task} does not use a ControlNet: use task=controlnet")
    if cfg.get("sampler", "ddim") not in SAMPLER_NAMES:
        raise ConfigError(f"sampler={cfg.get('sampler')!r} is not one of {', '.join(SAMPLER_NAMES)}")
    if has_net:
        lo, hi = float(controlnet.get("guidance_start", 0.0)), float(controlnet.get("guidance_end", 1.0))
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"controlnet.guidance_start={lo} / guidance_end={hi}: need 0 <= start < end <= 1")
        if cfg.task in ("reconstruct", "edit") and (lo, hi) != (0.0, 1.0):
            raise ConfigError(
                "controlnet.guidance_start/end apply to task=controlnet only; inversion uses all steps"
            )
