"""Shared fixtures: offline hub, the `tiny` random-weight model built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once, when diffusers/transformers are first imported
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ddim_lab.config import CONF_DIR, register_resolvers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR

register_resolvers()
torch.set_num_threads(1)  # tiny models gain nothing from more; `pytest -n 2` uses both cores


def model_spec(name: str, **arch_overrides) -> dict:
    spec = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"), resolve=True)
    for key, value in arch_overrides.items():
        spec["arch"][key] = value
    return spec


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddim_lab_cache")


@pytest.fixture(scope="session")
def tiny(cache_dir):
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("tiny"), {"device": "cpu"}, cache_dir)


@pytest.fixture(scope="session")
def tiny_v(cache_dir):
    from ddim_lab.models.loading import load_model

    spec = model_spec("tiny", scheduler={"prediction_type": "v_prediction"})
    return load_model(spec, {"device": "cpu"}, cache_dir)


@pytest.fixture(scope="session")
def digits(cache_dir):
    """The shipped digits model (16 px, 8×8×4 latents), loaded once per session."""
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("digits"), {"device": "cpu"}, cache_dir)


DIGITS = ROOT / "ddim_lab" / "assets" / "digits-heldout"


def lab_config(*overrides: str, model: str = "tiny", steps: int = 8, cache: Path | None = None):
    """The lab's config composed as the CLI composes it, for tests: CPU, no LPIPS, no progress bars;
    ``cache=None`` disables the inversion cache."""
    from ddim_lab.config import compose_config

    base = [
        f"model={model}",
        f"num_steps={steps}",
        "metrics.lpips=off",
        "runtime.device=cpu",
        "runtime.progress=false",
        f"cache.enabled={cache is not None}",
        f"cache.dir='{cache or 'unused'}'",
    ]
    return compose_config([*base, *overrides])
