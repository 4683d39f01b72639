"""Shared fixtures: offline hub, the `tiny` random-weight model built once per session, the session's cache
folder (a pytest tmp dir), and a guard that fails the session when tests wrote into the checkout."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once, when diffusers/transformers are first imported
os.environ.setdefault("WANDB_MODE", "disabled")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ddim_lab.config.compose import CONF_DIR, register_resolvers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR

register_resolvers()
torch.set_num_threads(1)  # tiny models gain nothing from more; `pytest -n 2` uses both cores


def model_spec(name: str, **arch_overrides) -> dict:
    spec = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"), resolve=True)
    for key, value in arch_overrides.items():
        spec["arch"][key] = value
    return spec


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Iterator[Path]:
    """The session's cache folder (built models; inversions where a test enables the cache without its own
    folder), a pytest tmp dir. ``DDIM_LAB_CACHE`` points at it for the whole session, so a config composed
    without ``cache.dir`` never writes into the checkout either."""
    path = tmp_path_factory.mktemp("ddim_lab_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDIM_LAB_CACHE", str(path))
        yield path


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


@pytest.fixture(scope="module")
def digits_flow(cache_dir):
    """The shipped digits flow model (SD3 architecture), loaded per test module (tests may hook its layers)."""
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("digits-flow"), {"device": "cpu"}, cache_dir)


@pytest.fixture(scope="module")
def tiny_flow(cache_dir):
    """Seeded random weights in the SD3 classes (built once into the session cache, loaded per module)."""
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("tiny-flow"), {"device": "cpu"}, cache_dir)


@pytest.fixture(scope="module")
def tiny_flux(cache_dir):
    """Seeded random weights in the FLUX classes (built once into the session cache, loaded per module)."""
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("tiny-flux"), {"device": "cpu"}, cache_dir)


def lab_config(*overrides: str, model: str = "tiny", steps: int = 8, cache: Path | None = None):
    """The lab's config composed as the CLI composes it, for tests: CPU, no LPIPS, no progress bars;
    ``cache=None`` disables the inversion cache, and built models then go to the session's cache folder
    (``cache_dir``, under pytest's tmp dir)."""
    from ddim_lab.config.compose import compose_config

    base = [
        f"model={model}",
        f"num_steps={steps}",
        "metrics.lpips=off",
        "runtime.device=cpu",
        "runtime.progress=false",
        f"cache.enabled={cache is not None}",
        f"cache.dir='{cache or os.environ['DDIM_LAB_CACHE']}'",
    ]
    return compose_config([*base, *overrides])


# -- the suite never writes into the checkout ------------------------------------------------------------------
# where a run (or a test that forgot its tmp dir) writes by default: the cache, Hydra's run folders, W&B, and
# the folder an old test helper used
WATCHED = (".cache", "outputs", "multirun", "wandb", "unused")
ENTRIES = pytest.StashKey[dict]()


def checkout_entries(root: Path = ROOT) -> dict[str, frozenset[str] | None]:
    """Each watched path under ``root``: the names in it (a file: none), or None when it does not exist."""
    found: dict[str, frozenset[str] | None] = {}
    for name in WATCHED:
        path = root / name
        if path.is_dir():
            found[name] = frozenset(p.name for p in path.iterdir())
        else:
            found[name] = frozenset() if path.exists() else None
    return found


def written_into(
    before: dict[str, frozenset[str] | None], after: dict[str, frozenset[str] | None]
) -> list[str]:
    """What appeared between two ``checkout_entries``: watched paths created, new names in watched folders."""
    new = []
    for name, names in after.items():
        if names is None:
            continue
        if before.get(name) is None:
            new.append(f"{name}/")
        else:
            new.extend(f"{name}/{entry}" for entry in sorted(names - before[name]))
    return new


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist) watches
        session.config.stash[ENTRIES] = checkout_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if ENTRIES not in session.config.stash:
        return
    written = written_into(session.config.stash[ENTRIES], checkout_entries())
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = f"tests wrote into the checkout ({', '.join(written)}): write under tmp_path or cache_dir"
        if reporter is not None:
            reporter.write_line("\n" + line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
