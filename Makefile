# The two set-up commands of the README. Both create .venv on first use (2.5-4 minutes from a fresh clone;
# for a CPU-only torch, install it into .venv first: see the README, "Set up and run").
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHECK := $(BIN)/python -c "import torch, torchvision, diffusers"
VERSIONS := $(BIN)/python -c "from importlib.metadata import version as v; \
	print('torch', v('torch'), 'and torchvision', v('torchvision'))"
# The stamp alone is not trusted: a .venv whose stamp exists but which does not import torch, torchvision and
# diffusers together (a torch/torchvision pair that does not match, a half-finished install) is rebuilt from
# scratch. Checked when make reads this file (a second or two), so `make -n` shows the rebuild and runs nothing.
BROKEN := $(if $(wildcard $(STAMP)),$(shell $(CHECK) >/dev/null 2>&1 || echo yes))

.PHONY: quickstart test lint imports kill-test venv broken-venv

$(STAMP): pyproject.toml $(if $(BROKEN),broken-venv)
	$(PY) -m venv $(if $(BROKEN),--clear) $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@$(CHECK) || { echo "make: $(VENV) does not import torch, torchvision and diffusers together" \
		"($$($(VERSIONS) 2>&1 | tail -n 1)): install a matching torch/torchvision pair into $(VENV)" \
		"(README, 'Set up and run'), then rerun make" >&2; exit 1; }
	touch $(STAMP)

broken-venv:
	@echo "make: $(VENV) is broken (torch, torchvision and diffusers do not import together): rebuilding it" >&2

venv: $(STAMP)

quickstart: venv
	HF_HUB_OFFLINE=1 $(BIN)/ddim-lab +experiment=quickstart

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist worksteal -q

lint: imports
	$(BIN)/ruff check ddim_lab scripts tests && $(BIN)/ruff format --check ddim_lab scripts tests

# the layers contract (pyproject.toml, [tool.importlinter]): a lower layer importing a higher one fails
imports: venv
	$(BIN)/lint-imports --no-cache

kill-test: venv
	$(BIN)/python scripts/kill_test.py --kills 20
