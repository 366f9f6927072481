# The two commands: `make up` runs the whole system, `make test` runs the whole suite.
# Both create .venv and install the project (editable, with dev extras) when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint format clean proto notebooks bench install config-table readme

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,notebooks]'
	$(BIN)/python -m pms.contracts
	@touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/pms up

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m tests.tools.check_notebooks_clean

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# README.md is assembled from docs/readme/*.md with the configuration table generated from pms/settings.py
# (tests/test_readme_config.py and tests/test_readme_sections.py fail when it is out of date).
readme: $(STAMP)
	$(BIN)/python -m tests.tools.readme --write

config-table: readme

proto: $(STAMP)
	$(BIN)/python -m pms.contracts

notebooks: $(STAMP)
	$(BIN)/pms notebooks

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info test-artifacts
	rm -f pms/contracts/*_pb2*.py pms/contracts/*_pb2*.pyi
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
