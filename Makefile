# Set-up on a fresh machine: `make demo` (main job) and `make test` (tests) each create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/saesteer demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) experiments/bench_generation.py
