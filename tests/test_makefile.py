"""The Makefile trusts ``.venv`` only while torch, torchvision and diffusers import together: a broken venv
behind a fresh stamp is rebuilt, and a rebuild that is still broken stops with one message and no stamp.

Run against the real Makefile with a stand-in ``python3`` (``PY=``) whose venvs "import" only when a marker file
exists, so no package is installed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

# `python3 -m venv [--clear] DIR`: a venv whose python passes the import check only when DIR/works exists, and
# whose pip makes it work when PIP_FIXES=1; every venv creation and pip install is logged to $MAKE_LOG
FAKE_PY = r"""#!/bin/sh
for dir; do :; done
if [ "$3" = --clear ]; then rm -rf "$dir"; echo "venv--clear" >> "$MAKE_LOG"
else echo "venv" >> "$MAKE_LOG"; fi
mkdir -p "$dir/bin"
cat > "$dir/bin/python" <<'EOF'
#!/bin/sh
here=$(dirname "$0")
case "$*" in
  *"import torch, torchvision, diffusers"*)
    [ -f "$here/../works" ] || { echo "RuntimeError: operator torchvision::nms does not exist" >&2; exit 1; } ;;
  *importlib.metadata*) echo "torch 2.14.1+cpu and torchvision 0.29.1" ;;
esac
EOF
cat > "$dir/bin/pip" <<'EOF'
#!/bin/sh
echo "pip $*" >> "$MAKE_LOG"
[ "$PIP_FIXES" = 1 ] && touch "$(dirname "$0")/../works"
exit 0
EOF
chmod +x "$dir/bin/python" "$dir/bin/pip"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text("")
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    return tmp_path


def make(project: Path, pip_fixes: bool) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "MAKE_LOG": str(project / "log"), "PIP_FIXES": "1" if pip_fixes else "0"}
    return subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), "venv", f"PY={project / 'fake-python3'}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def log(project: Path) -> list[str]:
    return [line.split()[0] for line in (project / "log").read_text().splitlines()]


def test_make_builds_trusts_a_working_venv_and_rebuilds_a_broken_one(project):
    stamp = project / ".venv" / ".installed-stamp"
    first = make(project, pip_fixes=True)
    assert first.returncode == 0, first.stderr
    assert stamp.exists() and log(project) == ["venv", "pip"]

    again = make(project, pip_fixes=True)  # working: nothing reinstalled
    assert again.returncode == 0 and log(project) == ["venv", "pip"]

    (project / ".venv" / "works").unlink()  # torchvision stops importing; the stamp stays fresh
    rebuilt = make(project, pip_fixes=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "is broken" in rebuilt.stderr and "rebuilding" in rebuilt.stderr
    assert log(project) == ["venv", "pip", "venv--clear", "pip"] and stamp.exists()


def test_a_venv_that_stays_broken_stops_make_with_one_message_and_no_stamp(project):
    stamp = project / ".venv" / ".installed-stamp"
    failed = make(project, pip_fixes=False)
    assert failed.returncode != 0
    message = [line for line in failed.stderr.splitlines() if line.startswith("make: .venv does not import")]
    assert len(message) == 1, failed.stderr
    assert "torch 2.14.1+cpu and torchvision 0.29.1" in message[0]
    assert "install a matching torch/torchvision pair" in message[0]
    assert not stamp.exists()  # the next make tries again instead of trusting it
