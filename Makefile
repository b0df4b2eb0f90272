# Two set-up commands for a new machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench bench-statemachine bench-replication bench-failover clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/quorumbook demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: bench-statemachine bench-replication bench-failover

bench-statemachine: $(STAMP)
	$(BIN)/python -m bench.statemachine

bench-replication: $(STAMP)
	$(BIN)/python -m bench.replication

bench-failover: $(STAMP)
	$(BIN)/python -m bench.failover

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
