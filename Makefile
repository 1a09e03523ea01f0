# medblocks_pipelines: the commands a newcomer and CI run. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help setup demo test lint format typecheck check bench ui serve sandbox clean

help:
	@echo "make demo       set up, start the sandbox, run every pattern end to end, print results"
	@echo "                (starts from an empty data/: deletes control.db, lake, warehouse, dagster_home)"
	@echo "make test       set up and run the test suite (CI runs exactly this)"
	@echo "make check      lint + type check + tests"
	@echo "make lint       ruff check, format check and the import contracts (.importlinter)"
	@echo "make format     ruff format + autofix"
	@echo "make typecheck  mypy"
	@echo "make bench      every benchmark at a quick size (see benchmarks/README.md)"
	@echo "make ui         the Dagster UI on the embedded instance (http://127.0.0.1:3000; PORT=N for another)"

$(STAMP): Makefile pyproject.toml medblocks_sandbox/pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	# --compile-bytecode and compileall: .pyc files written once here, so a process starts without
	# compiling every module it imports, also where PYTHONDONTWRITEBYTECODE is set (containers, and
	# this project's CI machine kind): there a CLI sync compiled ~1 s of Dagster and SQLAlchemy
	# source on every start, and each test subprocess did the same.
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c requirements.lock -e '.[dev]' -e ./medblocks_sandbox
	$(BIN)/python -m compileall -q medblocks_pipelines medblocks_sandbox
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/medblocks-sandbox demo

test: setup
	scripts/test

lint: setup
	scripts/lint

format: setup
	$(BIN)/ruff format medblocks_pipelines medblocks_sandbox medblocks_pipelines_tests benchmarks
	$(BIN)/ruff check --fix medblocks_pipelines medblocks_sandbox medblocks_pipelines_tests benchmarks

typecheck: setup
	scripts/typecheck

check: lint typecheck test

bench: setup
	scripts/bench

ui: setup
	scripts/ui

serve: setup
	$(BIN)/medblocks serve

sandbox: setup
	$(BIN)/medblocks-sandbox serve

clean:
	rm -rf data/control.db* data/lake data/warehouse data/dagster_home data/sandbox
