"""Shared fixtures: a throwaway PostgreSQL database per run, clean tables per test.

The tests live in three folders: ``tests/unit`` (no database, broker or network),
``tests/integration`` (the real PostgreSQL and Redis, the in-process worker, worker processes
killed, the CLI) and ``tests/system`` (the fault suites, the benchmark, the demo, packaging:
minutes each). ``make test`` runs the first two on every core (pytest-xdist: each worker
process is a run of its own here, with its own database, queues and virtual host);
``make test-all`` adds the system tests and the hypothesis profile ``ci``.

Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: ``default`` (100 examples per property)
and ``ci`` (1,000).

PostgreSQL and Redis must answer on localhost (``make test`` makes sure they do). Override with
STOCK_SYNC_TEST_POSTGRES_URL (an admin connection) and STOCK_SYNC_TEST_REDIS_URL.

STOCK_SYNC_TEST_BROKER picks the broker of the pipeline tests: ``redis`` (the default) or
``rabbitmq``, the machine's RabbitMQ (STOCK_SYNC_TEST_RABBITMQ_URL, without a virtual host;
rabbitmqctl must reach its node), in a virtual host of this run's own, removed at the end.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from hypothesis import settings
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.settings import get_settings
from stock_sync.composition import reset_services
from stock_sync_dev import rabbitmq
from stock_sync_dev.databases import ThrowawayDatabases
from stock_sync_fake import FakeMicroservice
from tests.support import Pipeline, TaskRuns, capture_operation_logs

# stock_sync_dev is not installed (it is not part of the wheel): pytest finds it by its
# pythonpath setting, the processes the tests start by this.
REPO = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

ADMIN_URL = os.environ.get(
    "STOCK_SYNC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@localhost:5432/postgres"
)
REDIS_URL = os.environ.get("STOCK_SYNC_TEST_REDIS_URL", "redis://localhost:6379/0")
RABBITMQ_URL = os.environ.get("STOCK_SYNC_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
TEST_BROKERS = ("redis", "rabbitmq")
TEST_BROKER = os.environ.get("STOCK_SYNC_TEST_BROKER", "redis")
if TEST_BROKER not in TEST_BROKERS:
    raise pytest.UsageError(
        f"STOCK_SYNC_TEST_BROKER must be one of {', '.join(TEST_BROKERS)} (got {TEST_BROKER!r})"
    )
RUN_ID = uuid.uuid4().hex[:8]
# Under pytest-xdist each worker process is a run of its own; its id ("gw0", ...) is in the
# names of its databases so that they can be told apart (and "main" without xdist).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
RABBITMQ_VHOST_PREFIX = "stock-sync-test"
RABBITMQ_VHOST = rabbitmq.owned_vhost_name(RABBITMQ_VHOST_PREFIX, RUN_ID)
# The broker of the pipeline tests and of the workers they start.
BROKER_URL = REDIS_URL if TEST_BROKER == "redis" else f"{RABBITMQ_URL}/{RABBITMQ_VHOST}"
# This process's own broker from the start: test modules import celeryconfig (and tasks) before
# any fixture runs, and production settings refuse a Celery configuration without a broker.
# The database URL follows with the postgres_url fixture.
os.environ["STOCK_SYNC_BROKER_URL"] = BROKER_URL
settings.register_profile("default", max_examples=100)
settings.register_profile("ci", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
TABLES = (
    "operation_events",
    "stock_movements",
    "stock_levels",
    "pending_stock_operations",
    "maintenance_runs",
    "alert_states",
    "metric_counters",
    "queue_probes",
)


@pytest.fixture(autouse=True)
def settings_follow_the_environment() -> Iterator[None]:
    """After each test, the process's settings (and the services built from them) match the
    environment again. A test that reads the settings while its environment differs (a
    CliRunner env, a monkeypatched variable, the embedded default) would otherwise leave them
    cached for every test after it."""
    yield
    if get_settings.cache_info().currsize and get_settings().database_url != os.environ.get(
        "STOCK_SYNC_DATABASE_URL", ""
    ):
        get_settings.cache_clear()
        reset_services()


@pytest.fixture(scope="session")
def make_throwaway_database() -> Iterator[Callable[..., str]]:
    """A factory of empty PostgreSQL databases (named for this xdist worker), all dropped at
    the end of the run."""
    databases = ThrowawayDatabases(ADMIN_URL, prefix=f"stock_sync_test_{XDIST_WORKER}")
    yield databases.create
    databases.drop_all()


@pytest.fixture(scope="session")
def postgres_url(make_throwaway_database: Callable[..., str]) -> str:
    """The run's migrated test database; also the configured database of this process."""
    url = make_throwaway_database()
    schema.upgrade(url)
    os.environ["STOCK_SYNC_DATABASE_URL"] = url
    get_settings.cache_clear()
    return url


@pytest.fixture(scope="session")
def database(postgres_url: str) -> Iterator[Database]:
    db = Database(postgres_url)
    yield db
    db.dispose()


@pytest.fixture
def clean_database(database: Database) -> Database:
    """The test database with every table emptied.

    A task a previous test left in flight (a retry, a rollback) may hold row locks while
    TRUNCATE asks for table locks; PostgreSQL then breaks the deadlock, so try again.
    """
    for attempt in range(5):
        try:
            with database.transaction() as session:
                session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
            return database
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    return database


# --- the pipeline: a fake microservice over HTTP, Redis, a real in-process worker ----------

PIPELINE_ENVIRONMENT = {
    "STOCK_SYNC_MAX_RETRIES_PENDING": "3",
    "STOCK_SYNC_MAX_RETRIES_PROCESSING": "3",
    "STOCK_SYNC_MAX_RETRIES_DEDUCTION": "3",
    "STOCK_SYNC_MAX_RETRIES_STOCK_DEDUCTED": "3",
    "STOCK_SYNC_MAX_RETRIES_ROLLBACK": "3",
    "STOCK_SYNC_RETRY_BACKOFF_BASE_S": "0.02",
    "STOCK_SYNC_RETRY_BACKOFF_MAX_S": "0.1",
    "STOCK_SYNC_MICROSERVICE_TIMEOUT_S": "1.0",
    "STOCK_SYNC_LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="session")
def fake_microservice() -> Iterator[FakeMicroservice]:
    with FakeMicroservice() as fake:
        yield fake


def run_queue_name(purpose: str) -> str:
    """A queue name unique to this test run, so its Redis keys can be removed at the end."""
    return f"stock-sync-test-{RUN_ID}-{purpose}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session", autouse=True)
def forget_this_runs_queues() -> Iterator[None]:
    """At the end, delete what kombu left in Redis for this run's queues and bindings."""
    yield
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    marker = f"stock-sync-test-{RUN_ID}-"
    for key in client.scan_iter(match=f"*{marker}*"):
        client.delete(key)
    # Messages of workers the kill tests shot stay in kombu's shared "unacked" hash.
    for tag, payload in client.hgetall("unacked").items():
        if marker.encode() in payload:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    client.close()


@pytest.fixture(scope="session", autouse=True)
def rabbitmq_vhost() -> Iterator[str | None]:
    """With STOCK_SYNC_TEST_BROKER=rabbitmq: this run's virtual host, deleted at the end (and
    those of earlier runs that were killed before deleting theirs)."""
    if TEST_BROKER != "rabbitmq":
        yield None
        return
    rabbitmq.remove_abandoned_vhosts(RABBITMQ_VHOST_PREFIX)
    rabbitmq.add_vhost(RABBITMQ_VHOST)
    try:
        yield RABBITMQ_VHOST
    finally:
        rabbitmq.delete_vhost(RABBITMQ_VHOST)


@pytest.fixture(scope="session")
def pipeline_environment(postgres_url: str, fake_microservice: FakeMicroservice) -> Iterator[str]:
    """Configure this process for the pipeline tests; yields the run's queue name."""
    queue = run_queue_name("pipeline")
    environment = {
        **PIPELINE_ENVIRONMENT,
        "STOCK_SYNC_DATABASE_URL": postgres_url,
        "STOCK_SYNC_BROKER_URL": BROKER_URL,
        "STOCK_SYNC_MICROSERVICE_URL": fake_microservice.url,
        "STOCK_SYNC_QUEUE_NAME": queue,
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    get_settings.cache_clear()
    reset_services()
    yield queue
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()
    reset_services()


# --- the in-process worker: pytest-celery's session fixtures -----------------------------------
# pytest-celery (the design card's test plugin) re-exports celery.contrib.pytest's fixtures:
# celery_session_worker runs a real worker in a thread of this process, here against the real
# Redis (or RabbitMQ), configured by the three overrides below. Its Docker-based fixtures
# (celery_setup, celery_worker, celery_broker, ...) are never requested: this machine has no
# Docker engine (tests/integration/test_in_process_worker.py checks that the pipeline's
# fixtures use none of them).


@pytest.fixture(scope="session")
def celery_session_app(pipeline_environment: str) -> Celery:
    """Our own app rather than pytest-celery's TestApp: the tasks are registered on it and the
    producer sends with it. Configured for the run's queue on the real Redis; never eager."""
    import celeryconfig
    from tasks import app

    app.conf.update(celeryconfig.build(get_settings()))
    # The queues and routes are cached on first use: drop them, so that the worker consumes
    # (and producers route to) this run's queues even if something used the app before.
    app.__dict__.pop("amqp", None)
    return app


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    """start_worker's options: four threads, no ping task (our app has no result backend to
    answer it), and a shutdown that waits for a retry a test left in flight."""
    return {
        "concurrency": 4,
        "perform_ping_check": False,
        "loglevel": "WARNING",  # tasks/app.py: without a command line, STOCK_SYNC_LOG_LEVEL wins
        "shutdown_timeout": 30,
    }


@pytest.fixture
def pipeline(
    celery_session_worker: object, clean_database: Database, fake_microservice: FakeMicroservice
) -> Iterator[Pipeline]:
    """Everything an end-to-end test needs, reset: empty tables, a fresh fake."""
    fake_microservice.reset()
    with capture_operation_logs() as records, TaskRuns().recording() as task_runs:
        yield Pipeline(clean_database, fake_microservice, records, task_runs)


@pytest.fixture
def retry_limits(pipeline_environment: str) -> Iterator[Callable[..., None]]:
    """Change retry settings for one test; the in-process worker picks them up at once."""
    saved: dict[str, str | None] = {}

    def apply(**limits: object) -> None:
        for name, value in limits.items():
            variable = f"STOCK_SYNC_{name.upper()}"
            saved.setdefault(variable, os.environ.get(variable))
            os.environ[variable] = str(value)
        get_settings.cache_clear()
        reset_services()

    yield apply
    for variable, value in saved.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    get_settings.cache_clear()
    reset_services()
