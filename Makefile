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

.PHONY: install demo test lint wheel-test bench
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/saesteer demo --out-dir figures

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check saesteer tests experiments .ci
	$(VENV)/bin/ruff format --check saesteer tests experiments .ci

# Build the wheel, install it (with its dependencies) into a fresh virtual environment and run the smoke
# test from an empty temporary folder outside the repository.
wheel-test: install
	rm -rf dist .wheel-venv
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	$(PYTHON) -m venv .wheel-venv
	.wheel-venv/bin/python -m pip install -q --upgrade pip
	.wheel-venv/bin/python -m pip install -q torch==2.13.0
	.wheel-venv/bin/python -m pip install -q dist/saesteer-*.whl
	cd "$$(mktemp -d)" && $(CURDIR)/.wheel-venv/bin/python $(CURDIR)/.ci/wheel_smoke.py $(CURDIR)/README.md

bench: install
	$(PY) experiments/bench_generation.py
