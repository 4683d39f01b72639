"""The package's layers are a contract (pyproject.toml, ``[tool.importlinter]``): ``lint-imports`` keeps it on
the checkout and breaks it when a lower layer imports a higher one. Every module stays at ≤ 400 lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` (its pyproject.toml's contracts), no cache written."""
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layers_contract_is_kept():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "0 broken" in proc.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_it(tmp_path):
    """A copy of the package whose engine reaches up into the runner, lazily inside a function: the layers
    contract names that import and ``lint-imports`` fails."""
    shutil.copytree(
        ROOT / "ddim_lab", tmp_path / "ddim_lab", ignore=shutil.ignore_patterns("assets", "__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    schedule = tmp_path / "ddim_lab" / "engine" / "schedule.py"
    schedule.write_text(
        schedule.read_text() + "\n\ndef upward():\n    from ddim_lab.study import runner\n\n    return runner\n"
    )
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "ddim_lab.engine.schedule -> ddim_lab.study.runner" in proc.stdout


def test_no_module_of_the_package_exceeds_400_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "ddim_lab").rglob("*.py")
    }
    assert len(sizes) > 50
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
