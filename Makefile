# sorajax: `make demo` trains the toy model end to end on CPU; `make test` runs the test suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Python >= 3.12 is required (jax >= 0.11). Override with `make PYTHON=/path/to/python3.12 ...`.
PYTHON ?= $(shell for p in python3.12 python3.13 /root/.pyenv/versions/3.12.1/bin/python3 python3; do \
	  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then command -v $$p; break; fi; done)
DEMO_RUN ?= runs/toy
DEMO_SAMPLES ?= samples
# extra config overrides for the demo, e.g. `make demo DEMO_RUN=runs/toy_s1 DEMO_SAMPLES=samples_s1
# DEMO_ARGS=--config.seed=1` (another training seed: parameter init, data order, noise)
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv aot-deps demo test clean help

help:
	@echo "make demo   - create $(VENV), build the synthetic world, train the toy model, sample, evaluate"
	@echo "              (DEMO_RUN=dir DEMO_SAMPLES=dir DEMO_ARGS='--config.seed=1' for another training seed)"
	@echo "make test   - create/update $(VENV) and run the test suite (8 fake CPU devices)"
	@echo "make aot-deps - install libtpu into $(VENV)/aot-libtpu for scripts/aot_compile.py"
	@echo "make clean  - remove runs/, samples/, data/"

# Bytecode is compiled at install time (pip default): where PYTHONDONTWRITEBYTECODE is set,
# as on this machine, nothing would be cached at import and every process would recompile it
# (measured: jax+flax+tfds imports 5.5 s instead of 2 s per test subprocess).
$(VENV)/.installed: requirements.txt pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: sorajax needs Python >= 3.12 (jax >= 0.11); none found on PATH. Install python3.12 or run: make PYTHON=/path/to/python3.12"; exit 2; fi
	@echo "using $(PYTHON) ($$($(PYTHON) --version))"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

# libtpu for the AOT planner (scripts/aot_compile.py), kept off the venv's import path: JAX on a
# CPU-only machine would otherwise probe for a TPU at every start and print warnings.
$(VENV)/aot-libtpu/.installed: requirements-aot.txt | $(VENV)/.installed
	$(PY) -m pip install -q --upgrade --target $(VENV)/aot-libtpu -r requirements-aot.txt
	@touch $@

aot-deps: $(VENV)/aot-libtpu/.installed

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py --workdir $(DEMO_RUN) --samples $(DEMO_SAMPLES) $(DEMO_ARGS)

# --dist loadfile: a test file runs on one worker, so its session fixtures (a trained run, a
# converted checkpoint) are built once; --no-loadscope-reorder keeps tests/conftest.py's order
# (the most expensive files first); --durations=15 prints the slowest tests in every log.
test: venv aot-deps
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests $(PYTEST_ARGS)

clean:
	rm -rf runs samples data
