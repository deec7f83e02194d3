"""Celery settings the design relies on, read from the same settings the workers use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

import celeryconfig
from stock_sync.adapters.settings import load_settings, prepare_broker_folders
from stock_sync.domain.errors import ConfigurationError
from tasks import app


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> dict[str, object]:
    monkeypatch.setenv("STOCK_SYNC_BROKER_URL", "redis://localhost:6379/0")
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STOCK_SYNC_RETRY_BACKOFF_MAX_S", "5000")
    return celeryconfig.build(load_settings())


def test_json_only_late_acks_prefetch_one_and_reject_on_worker_lost(
    config: dict[str, object],
) -> None:
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] is True and config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_ignore_result"] is True
    assert config["worker_send_task_events"] is False and config["task_send_sent_event"] is False
    soft, hard = config["task_soft_time_limit"], config["task_time_limit"]
    assert isinstance(soft, float) and isinstance(hard, float) and soft < hard


def test_task_events_are_sent_only_when_asked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STOCK_SYNC_TASK_EVENTS", "on")
    config = celeryconfig.build(load_settings())
    assert config["worker_send_task_events"] is True and config["task_send_sent_event"] is True


def test_the_visibility_timeout_outlasts_any_countdown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Waits longer than STOCK_SYNC_RETRY_PARK_AFTER_S are parked in the database, so the
    longest countdown message is that long, whatever the backoff's maximum."""
    monkeypatch.setenv("STOCK_SYNC_BROKER_URL", "redis://localhost:6379/0")
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STOCK_SYNC_RETRY_BACKOFF_MAX_S", "80000")
    monkeypatch.setenv("STOCK_SYNC_RETRY_PARK_AFTER_S", "5000")
    config = celeryconfig.build(load_settings())
    broker = config["broker_transport_options"]
    results = config["result_backend_transport_options"]
    assert isinstance(broker, dict) and isinstance(results, dict)
    assert broker["visibility_timeout"] == results["visibility_timeout"]
    assert broker["visibility_timeout"] > 5000 + float(str(config["task_time_limit"]))
    assert broker["visibility_timeout"] < 80000


def test_every_beat_entry_expires_and_names_a_registered_task(config: dict[str, object]) -> None:
    schedule = config["beat_schedule"]
    assert isinstance(schedule, dict)
    assert {entry["task"] for entry in schedule.values()} == {
        "stock_sync.sweep_stuck_operations",
        "stock_sync.release_due_retries",
        "stock_sync.marketplace_audit",
        "stock_sync.evaluate_alerts",
        "stock_sync.reconcile",
    }
    for entry in schedule.values():
        assert entry["options"]["expires"] > 0
        assert entry["task"] in app.tasks


def queue_names(config: dict[str, object]) -> list[str]:
    declared = config["task_queues"]
    assert isinstance(declared, tuple)
    return [queue.name for queue in declared]


def test_beat_tasks_have_a_queue_of_their_own_named_after_the_pipeline_queue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("STOCK_SYNC_QUEUE_NAME", raising=False)  # the pipeline tests set theirs
    monkeypatch.delenv("STOCK_SYNC_MAINTENANCE_QUEUE_NAME", raising=False)
    config = celeryconfig.build(load_settings())
    assert config["task_default_queue"] == "stock_sync"
    # A worker started without -Q consumes every declared queue: both.
    assert queue_names(config) == ["stock_sync", "stock_sync_maintenance"]
    routes = config["task_routes"]
    schedule = config["beat_schedule"]
    assert isinstance(routes, dict) and isinstance(schedule, dict)
    for entry in schedule.values():
        assert routes[entry["task"]] == {"queue": "stock_sync_maintenance"}
    assert "stock_sync.load_line_items" not in routes and "stock_sync.rollback" not in routes


def test_the_routes_send_beat_tasks_to_the_maintenance_queue_and_stages_to_the_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STOCK_SYNC_QUEUE_NAME", "orders")
    monkeypatch.setenv("STOCK_SYNC_MAINTENANCE_QUEUE_NAME", "housekeeping")
    probe = Celery("probe", set_as_current=False)
    probe.config_from_object(celeryconfig.build(load_settings()))

    def queue_of(task: str) -> str:
        return str(probe.amqp.router.route({}, task)["queue"].name)

    assert queue_of("stock_sync.sweep_stuck_operations") == "housekeeping"
    assert queue_of("stock_sync.evaluate_alerts") == "housekeeping"
    assert queue_of("stock_sync.reconcile") == "housekeeping"
    assert queue_of("stock_sync.load_line_items") == "orders"
    assert queue_of("stock_sync.rollback") == "orders"


def test_the_maintenance_queue_must_not_be_the_pipeline_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCK_SYNC_QUEUE_NAME", "orders")
    monkeypatch.setenv("STOCK_SYNC_MAINTENANCE_QUEUE_NAME", "orders")
    with pytest.raises(ConfigurationError, match="STOCK_SYNC_MAINTENANCE_QUEUE_NAME must differ"):
        load_settings()


def test_the_stage_tasks_are_registered() -> None:
    for name in (
        "load_line_items",
        "validate_stock",
        "deduct_stock",
        "sync_microservice",
        "rollback",
    ):
        assert f"stock_sync.{name}" in app.tasks


# --- a bad setting when a Celery process starts ------------------------------------------------

CELERY = str(Path(sys.executable).with_name("celery"))


def start(command: list[str], **variables: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a clean working directory with ``variables`` added to the
    environment; a good configuration would start a long-running process, so it is cut short."""
    environment = {**os.environ, "STOCK_SYNC_BROKER_URL": "redis://127.0.0.1:1/0", **variables}
    return subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=60, cwd="/"
    )


@pytest.mark.parametrize(
    ("command", "variable", "value", "expected"),
    [
        (
            [CELERY, "-A", "tasks", "worker"],
            "STOCK_SYNC_MAX_RETRIES_PENDING",
            "many",
            "error: invalid configuration: STOCK_SYNC_MAX_RETRIES_PENDING: ",
        ),
        (
            [CELERY, "-A", "tasks", "worker"],
            "STOCK_SYNC_DATABASE_URL",
            "mysql://stock:S3CRETPW@db/stock",
            "error: invalid configuration: STOCK_SYNC_DATABASE_URL: unsupported database",
        ),
        (
            [CELERY, "-A", "tasks", "beat"],
            "STOCK_SYNC_RETRY_BACKOFF_MAX_S",
            "inf",
            "error: invalid configuration: STOCK_SYNC_RETRY_BACKOFF_MAX_S: ",
        ),
        (
            [sys.executable, "-c", "import tasks"],
            "STOCK_SYNC_SWEEP_BATCH_SIZE",
            "1" + "0" * 30,
            "error: invalid configuration: STOCK_SYNC_SWEEP_BATCH_SIZE: ",
        ),
        (
            [sys.executable, "-c", "import celeryconfig"],
            "STOCK_SYNC_ALERT_WINDOW_S",
            "1e300",
            "error: invalid configuration: STOCK_SYNC_ALERT_WINDOW_S: ",
        ),
    ],
    ids=["worker", "worker-database-url", "beat", "import-tasks", "import-celeryconfig"],
)
def test_a_bad_setting_stops_a_celery_process_with_one_line(
    command: list[str], variable: str, value: str, expected: str
) -> None:
    result = start(command, **{variable: value})

    assert result.returncode == 1
    assert result.stderr.startswith(expected) and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout and "S3CRETPW" not in result.stderr


def test_a_data_dir_that_is_a_file_stops_an_embedded_worker_with_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")

    result = start(
        [CELERY, "-A", "tasks", "worker"],
        STOCK_SYNC_EMBEDDED="1",
        STOCK_SYNC_DATABASE_URL="",
        STOCK_SYNC_BROKER_URL="",
        STOCK_SYNC_DATA_DIR=str(afile),
    )

    assert result.returncode == 1
    assert result.stderr == f"error: STOCK_SYNC_DATA_DIR: {afile} is a file, not a folder\n"


def embedded_in(monkeypatch: pytest.MonkeyPatch, data_dir: str) -> None:
    """The embedded set-up (no broker URL: its folders) with its data in ``data_dir``."""
    monkeypatch.setenv("STOCK_SYNC_EMBEDDED", "1")
    monkeypatch.setenv("STOCK_SYNC_BROKER_URL", "")
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", data_dir)


def test_the_broker_folders_name_a_data_dir_that_cannot_be_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    embedded_in(monkeypatch, "/proc/stock-sync-data")
    with pytest.raises(ConfigurationError, match="STOCK_SYNC_DATA_DIR: cannot create"):
        prepare_broker_folders(load_settings())


def test_building_the_configuration_creates_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every process reads it, commands that only read included: the embedded set-up's
    folders are made by the processes that use them (worker, beat, a producer)."""
    data_dir = tmp_path / "data"
    embedded_in(monkeypatch, str(data_dir))

    config = celeryconfig.build(load_settings())

    assert config["broker_url"] == "filesystem://"
    assert config["broker_transport_options"]["data_folder_in"] == str(
        data_dir / "broker" / "queue"
    )
    assert not data_dir.exists()


# --- RabbitMQ -----------------------------------------------------------------------------------


@pytest.fixture
def rabbitmq_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    monkeypatch.setenv("STOCK_SYNC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/stock")
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STOCK_SYNC_QUEUE_NAME", "orders")
    monkeypatch.delenv("STOCK_SYNC_MAINTENANCE_QUEUE_NAME", raising=False)
    return celeryconfig.build(load_settings())


def test_on_rabbitmq_both_queues_are_durable_quorum_queues_with_a_delivery_limit(
    rabbitmq_config: dict[str, object],
) -> None:
    declared = rabbitmq_config["task_queues"]
    assert isinstance(declared, tuple)
    assert [queue.name for queue in declared] == ["orders", "orders_maintenance"]
    for queue in declared:
        assert queue.durable and not queue.auto_delete
        assert queue.queue_arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": celeryconfig.QUORUM_DELIVERY_LIMIT,
        }
        # native delayed delivery skips queues bound to a direct exchange
        assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
            queue.name,
            "topic",
            queue.name,
        )


def test_on_rabbitmq_publishes_are_confirmed_and_countdowns_wait_in_the_broker(
    rabbitmq_config: dict[str, object],
) -> None:
    assert rabbitmq_config["broker_transport_options"] == {"confirm_publish": True}
    assert rabbitmq_config["worker_detect_quorum_queues"] is True
    assert rabbitmq_config["broker_native_delayed_delivery_queue_type"] == "quorum"
    # what Redis needs stays Redis's
    assert "visibility_timeout" not in str(rabbitmq_config["result_backend_transport_options"])


def test_on_redis_the_queues_stay_classic_on_direct_exchanges(config: dict[str, object]) -> None:
    for queue in config["task_queues"]:  # type: ignore[attr-defined]
        assert queue.queue_arguments is None and queue.exchange.type == "direct"
    assert "worker_detect_quorum_queues" not in config
    assert set(config["broker_transport_options"]) == {  # type: ignore[call-overload]
        "visibility_timeout",
        "socket_timeout",
        "socket_connect_timeout",
    }


@pytest.mark.parametrize("name", ["orders.eu", "orders*", "#orders"])
def test_on_rabbitmq_a_queue_name_with_a_topic_character_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("STOCK_SYNC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    monkeypatch.setenv("STOCK_SYNC_QUEUE_NAME", name)
    monkeypatch.delenv("STOCK_SYNC_MAINTENANCE_QUEUE_NAME", raising=False)
    with pytest.raises(ConfigurationError, match="STOCK_SYNC_QUEUE_NAME: on RabbitMQ a queue name"):
        load_settings()
    monkeypatch.setenv("STOCK_SYNC_BROKER_URL", "redis://localhost:6379/0")
    assert load_settings().queue_name == name  # Redis has no such routing


def probe_app(config: dict[str, object]) -> Celery:
    probe = Celery("probe", set_as_current=False)
    probe.config_from_object(config)
    return probe


@pytest.mark.parametrize(("wait_s", "countdown"), [(0.05, 1.0), (1.0, 1.0), (2.2, 3.0)])
def test_on_rabbitmq_a_countdown_is_rounded_up_to_whole_seconds(
    rabbitmq_config: dict[str, object], wait_s: float, countdown: float
) -> None:
    from tasks.base import broker_countdown

    assert broker_countdown(probe_app(rabbitmq_config), wait_s) == countdown


def test_on_redis_a_countdown_is_kept_as_computed(config: dict[str, object]) -> None:
    from tasks.base import broker_countdown

    assert broker_countdown(probe_app(config), 0.05) == 0.05
