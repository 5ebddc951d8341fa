# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/deferq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[postgres,demo,dev]'
	touch $(BIN)/deferq

demo: $(BIN)/deferq
	$(BIN)/python -m examples.magic_link

test: $(BIN)/deferq
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(BIN)/deferq
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

bench: $(BIN)/deferq
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
