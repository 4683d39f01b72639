"""``ddim-lab``: the Hydra app. ``ddim-lab task=edit edit_prompt=... -m num_steps=25,50`` and so on."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ddim_lab.config import CONF_DIR, ConfigError, register_resolvers, validate

log = logging.getLogger("ddim_lab")


def run(cfg: DictConfig, run_dir: Path, group: str | None = None, name: str | None = None) -> None:
    """Validate, load the model, run the task, log. Raises ConfigError / ModelUnavailable on bad input."""
    validate(cfg)  # before anything heavy
    from ddim_lab.experiment import reconstruct_or_edit
    from ddim_lab.loggers import open_logger
    from ddim_lab.metrics import LpipsUnavailable, lpips_backbone_path, lpips_missing_message
    from ddim_lab.models.loading import load_model
    from ddim_lab.tasks import alpha_plot, text_to_image

    net = cfg.metrics.lpips_net
    if cfg.metrics.lpips == "required" and not lpips_backbone_path(net).exists():
        raise LpipsUnavailable(lpips_missing_message(net))
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.runtime, cfg.cache.dir)
    if cfg.task == "alpha_plot":
        alpha_plot(cfg, model, run_dir)
        return
    with open_logger(cfg.logger, resolved, run_dir, group, name) as logger:
        if cfg.task == "sample":
            text_to_image(cfg, model, run_dir, logger)
        else:
            reconstruct_or_edit(cfg, model, run_dir, logger)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    from ddim_lab.data import DataError
    from ddim_lab.metrics import LpipsUnavailable
    from ddim_lab.models.loading import ModelUnavailable

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if multirun else None
    name = hydra_cfg.job.override_dirname or run_dir.name
    try:
        run(cfg, run_dir, group, name)
    except (ConfigError, ModelUnavailable, DataError, FileNotFoundError, LpipsUnavailable) as err:
        log.error("%s", err)
        sys.exit(2)
    log.info("results in %s", run_dir)


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars; the lab's own loops have theirs
    transformers.utils.logging.disable_progress_bar()
    register_resolvers()
    app()


if __name__ == "__main__":
    main()
