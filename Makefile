# stock-sync: `make demo` runs the whole thing with no server; `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint typecheck services tools demo worker beat flower metrics fake-microservice benchmark soak chaos clean

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

# Flower on 127.0.0.1:5555 behind basic auth read from FLOWER_BASIC_AUTH (user:password, never
# on the command line where ps shows it); without it Flower is refused, unless the dashboard is
# declared local-only: `make flower FLOWER_LOCAL_ONLY=1` (no authentication, loopback only).
flower: install
	$(BIN)/stock-sync flower $(if $(filter 1 yes true,$(FLOWER_LOCAL_ONLY)),--local-only)

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

# The fault suite: 2,000 orders under broker crashes, worker kills, microservice faults,
# racing submits and random cancels, then the invariants (README: "Fault suite: make chaos").
chaos: install services
	$(BIN)/python -m stock_sync.chaos

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache
