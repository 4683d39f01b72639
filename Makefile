# The two set-up commands of the README. Both create .venv on first use (2.5-4 minutes from a fresh clone;
# for a CPU-only torch, install it into .venv first: see the README, "Set up and run").
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: quickstart test lint kill-test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ddim-lab +experiment=quickstart

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check ddim_lab scripts tests && $(BIN)/ruff format --check ddim_lab scripts tests

kill-test: $(STAMP)
	$(BIN)/python scripts/kill_test.py --kills 20
