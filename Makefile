# stock-sync: `make demo` runs the whole thing with no server; `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint typecheck services tools demo worker beat flower metrics fake-microservice benchmark soak clean

install: $(STAMP)

# Re-installs only when pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install --quiet -e '.[test]' 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@touch $(STAMP)

services:
	@bash tests/ensure_services.sh

# The checkers of docker/: Debian's docker-compose, and promtool unpacked into .venv/bin.
tools: install
	@bash tests/ensure_docker_compose.sh
	@bash tests/ensure_promtool.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

test: install services tools lint typecheck
	$(BIN)/pytest -q

demo: install
	$(BIN)/python -m stock_sync.demo

worker: install
	$(BIN)/celery -A tasks worker --loglevel=INFO

beat: install
	$(BIN)/celery -A tasks beat --loglevel=INFO

flower: install
	$(BIN)/celery -A tasks flower

metrics: install
	$(BIN)/stock-sync metrics-server --port 9808

fake-microservice: install
	$(BIN)/stock-sync fake-microservice --port 8765

benchmark: install services
	$(BIN)/python -m stock_sync.benchmark

# The worker's memory over 20,000 operations (about 5-10 minutes on 2 cores): apart from
# `make benchmark`, which it would more than double.
soak: install services
	$(BIN)/python -m stock_sync.benchmark --soak-only --soak 20000

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache
