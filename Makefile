# Two commands set everything up: `make lab` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
LABEXT_SOURCES := labextension/package.json labextension/tsconfig.json $(wildcard labextension/src/* labextension/style/*)

.PHONY: lab test lint unit integration fuzz bench soak clean

# `pip install -e .` also builds the JupyterLab panel (labextension/) through hatch-jupyter-builder.
$(STAMP): pyproject.toml $(LABEXT_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --no-browser $(ALLOW_ROOT) --ServerApp.root_dir=notebooks

lint: $(STAMP)
	$(BIN)/ruff format --check jupyter_dist tests
	$(BIN)/ruff check jupyter_dist tests
	$(BIN)/mypy jupyter_dist
	cd labextension && PATH="$(CURDIR)/$(BIN):$$PATH" jlpm lint:check

# The browser tests drive Debian's chromium (never a downloaded browser); installed when missing.
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

test: lint $(CHROMIUM)
	$(BIN)/python -m pytest -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m unit tests

integration: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m integration tests

# The long wire fuzz (FUZZING.md): >= 100,000 generated messages per socket kind; prints the counts.
# `make test` runs the same tests with a few thousand each. No log capture: pytest would keep
# every dropped-message warning in this process, and the subscribers' RSS is measured here.
fuzz: $(STAMP)
	JUPYTER_DIST_FUZZ_MESSAGES=100000 $(BIN)/python -m pytest -p no:cacheprovider -p no:logging -s --timeout 1800 \
		tests/integration/test_wire_fuzz.py

# Installs the peers (ipyparallel, Dask, Ray, accelerate) and prints the side-by-side tables
# (benchmarks/RESULTS.md).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks --json benchmarks/last-run.json

# Load with faults (benchmarks/soak.py): 4 clients x 8 engines, 10,000 tasks and 2,000 actor
# calls each, an engine and a client SIGKILLed mid-run; a few minutes. A short version is in make test.
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak

clean:
	rm -rf $(VENV)
