# stock-sync: `make demo` runs the whole thing with no server; `make test` the unit and
# integration tests (a few minutes); `make test-all` everything, which is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The development tools (stock_sync_dev) are not installed with the project: they run from here.
export PYTHONPATH := $(CURDIR)

.PHONY: install lock test test-all lint typecheck services tools netlab demo worker beat flower metrics fake-microservice benchmark profile soak backoff-rss chaos chaos-partition clean

install: $(STAMP)

# Re-installs only when pyproject.toml or the test lock changed. Every package comes from the
# test lock with its hashes checked (pip refuses a file whose sha256 is not the locked one),
# then the project itself, editable, with nothing else (--no-deps): the tests run on the
# versions the image ships (requirements.lock is a subset), the [test], [otel] and [sentry]
# extras included.
$(STAMP): pyproject.toml requirements-test.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-test.lock 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -m pip install --quiet --no-deps -e . 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@touch $(STAMP)

# `make lock` after changing a dependency in pyproject.toml: uv (installed in a throwaway
# virtual environment) resolves pyproject.toml and pins every package with the sha256 hashes
# of all its published files. Pins already in the locks are kept while pyproject's ranges
# allow them; `make lock UPGRADE=1` moves everything to the newest versions allowed.
# requirements.lock: the runtime dependencies with the otel and sentry extras (docker/Dockerfile
# installs it, so tracing and error reporting are switched on by environment alone);
# requirements-test.lock: those plus the [test] extra, resolved with the runtime pins as
# constraints so both agree. Run it with Python 3.11 on Linux, as the image is.
LOCK_TOOL := uv==0.13.8
IMAGE_EXTRAS := --extra otel --extra sentry

lock:
	@set -euo pipefail; \
	work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	$(PYTHON) -m venv "$$work/venv"; \
	"$$work/venv/bin/python" -m pip install --quiet '$(LOCK_TOOL)' 2> >(grep -v '^WARNING: Location' >&2); \
	compile() { "$$work/venv/bin/uv" pip compile --quiet --generate-hashes \
		--python "$$work/venv/bin/python" --custom-compile-command 'make lock' \
		$(if $(filter 1 yes true,$(UPGRADE)),--upgrade) pyproject.toml $(IMAGE_EXTRAS) "$$@"; }; \
	compile -o requirements.lock; \
	compile --extra test -c requirements.lock -o requirements-test.lock; \
	echo "requirements.lock: $$(grep -c '==' requirements.lock) pins; requirements-test.lock: $$(grep -c '==' requirements-test.lock) pins, every one with its hashes"

services:
	@bash tests/ensure_services.sh

# The checkers of docker/: Debian's docker-compose; promtool and the prometheus server
# (tests/integration/test_prometheus.py) unpacked into .venv/bin; Debian's pgbouncer
# (tests/integration/test_pgbouncer.py starts its own in front of the test database).
tools: install
	@bash tests/ensure_docker_compose.sh
	@bash tests/ensure_promtool.sh
	@bash tests/ensure_pgbouncer.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# `make test`: the unit and integration tests (real PostgreSQL and Redis, the in-process worker,
# killed worker processes, the CLI) on every core, a few minutes; the 15 slowest are listed.
# Each pytest-xdist worker is a run of its own (database, queues, virtual host: tests/conftest.py).
# Hypothesis runs its `default` profile (100 examples per property) unless HYPOTHESIS_PROFILE says.
FAST_TESTS := tests/unit tests/integration
# worksteal: a worker that runs out of tests takes some from a busy one (a few run for 30 s).
XDIST := -n auto --dist worksteal
test: install services tools
	$(BIN)/pytest -q $(XDIST) --durations=15 $(FAST_TESTS)

# `make test-all` (what CI runs): lint and types; the same tests with 1,000 examples per property
# (HYPOTHESIS_PROFILE=ci); the system tests one at a time (the fault suites, the partition
# suite, the benchmark smoke run, the demo, packaging, the backlog: each starts its own workers
# and brokers and runs for minutes); then the pipeline, cancellation and fault tests again on
# RabbitMQ (quorum queues, in a virtual host of each run's own: tests/conftest.py).
RABBITMQ_TESTS := tests/integration/test_pipeline.py tests/integration/test_cancellation.py \
	tests/integration/test_agreement_under_faults.py tests/integration/test_worker_kill.py \
	tests/integration/test_sweeps.py tests/integration/test_rabbitmq.py
test-all: install services tools netlab lint typecheck
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest -q $(XDIST) --durations=15 $(FAST_TESTS)
	STOCK_SYNC_TEST_REQUIRE_NAMESPACES=1 $(BIN)/pytest -q --durations=15 tests/system
	STOCK_SYNC_TEST_BROKER=rabbitmq $(BIN)/pytest -q $(XDIST) --durations=15 $(RABBITMQ_TESTS)

demo: install
	$(BIN)/python -m stock_sync_dev.demo

# The development commands run on the embedded demo set-up (a SQLite file and Celery's
# filesystem transport under data/) for whichever URL is not set; production processes never
# do: without STOCK_SYNC_DATABASE_URL and STOCK_SYNC_BROKER_URL they refuse to start.
# (`make demo` sets it itself.)
DEV := STOCK_SYNC_EMBEDDED=1

worker: install
	$(DEV) $(BIN)/celery -A tasks worker --loglevel=INFO

beat: install
	$(DEV) $(BIN)/celery -A tasks beat --loglevel=INFO

# Flower on 127.0.0.1:5555 behind basic auth read from FLOWER_BASIC_AUTH (user:password, never
# on the command line where ps shows it); without it Flower is refused, unless the dashboard is
# declared local-only: `make flower FLOWER_LOCAL_ONLY=1` (no authentication, loopback only).
flower: install
	$(DEV) $(BIN)/stock-sync flower $(if $(filter 1 yes true,$(FLOWER_LOCAL_ONLY)),--local-only)

metrics: install
	$(DEV) $(BIN)/stock-sync metrics-server --port 9808

fake-microservice: install
	$(BIN)/stock-sync fake-microservice --port 8765

benchmark: install services
	$(BIN)/python -m stock_sync_dev.benchmark

# The ratio alone, with py-spy profiles of the worker's processes and the producer during its
# pipeline run (raw collapsed stacks: speedscope opens them) and their summary, in PROFILE_DIR.
PROFILE_DIR ?= data/profile
profile: install services
	$(BIN)/python -m stock_sync_dev.benchmark --ratio-only --profile $(PROFILE_DIR)

# The worker's memory over 20,000 operations (about 5-10 minutes on 2 cores): apart from
# `make benchmark`, which it would more than double.
soak: install services
	$(BIN)/python -m stock_sync_dev.benchmark --soak-only --soak 20000

# A worker's memory with 20,000 operations waiting in backoff (about 10 minutes): flat, as the
# long waits are parked in the database. COUNTDOWNS=1 keeps every wait in the worker instead.
backoff-rss: install services
	$(BIN)/python -m stock_sync_dev.backoff_memory $(if $(filter 1,$(COUNTDOWNS)),--countdowns)

# The fault suite: 2,000 orders under broker crashes, worker kills, microservice faults,
# racing submits and random cancels, then the invariants (docs/fault-suites.md).
# MODE=backlog: 1,200 orders queued with no worker for 12 stuck thresholds; MODE=outage: the
# microservice down longer than the retry budgets, then `stock-sync retry --failed`.
# BROKER=rabbitmq (storm mode): RabbitMQ on a node of its own, stopped and started mid-run.
MODE ?= storm
BROKER ?= redis
chaos: install services
ifeq ($(MODE),storm)
	$(BIN)/python -m stock_sync_dev.chaos --broker $(BROKER)
else
	$(BIN)/python -m stock_sync_dev.chaos_time --mode $(MODE)
endif

# What the partition suite needs from Debian: iproute2, nftables, PostgreSQL 15's binaries.
netlab:
	@bash tests/ensure_netlab.sh

# The partition suite: 1,000 orders on separate hosts (network namespaces, root needed) while
# links are cut and healed, then the invariants of `make chaos` (about 5 minutes). It runs
# its own PostgreSQL and Redis, so it does not need `make services`.
chaos-partition: install netlab
	$(BIN)/python -m stock_sync_dev.chaos_partition

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache
