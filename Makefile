# Two commands set everything up: `make lab` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lab test lint unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --no-browser --ServerApp.root_dir=notebooks

lint: $(STAMP)
	$(BIN)/ruff format --check jupyter_dist tests
	$(BIN)/ruff check jupyter_dist tests
	$(BIN)/mypy jupyter_dist

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m unit tests

integration: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m integration tests

# Installs the peers (ipyparallel, Dask, Ray) and prints the side-by-side table (benchmarks/RESULTS.md).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks --json benchmarks/last-run.json

clean:
	rm -rf $(VENV)
