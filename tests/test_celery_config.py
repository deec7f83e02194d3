"""Celery settings the design relies on, read from the same settings the workers use."""

from __future__ import annotations

import pytest

import celeryconfig
from stock_sync.settings import load_settings
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
    assert config["worker_send_task_events"] is True and config["task_send_sent_event"] is True
    soft, hard = config["task_soft_time_limit"], config["task_time_limit"]
    assert isinstance(soft, float) and isinstance(hard, float) and soft < hard


def test_the_visibility_timeout_outlasts_any_countdown(config: dict[str, object]) -> None:
    broker = config["broker_transport_options"]
    results = config["result_backend_transport_options"]
    assert isinstance(broker, dict) and isinstance(results, dict)
    assert broker["visibility_timeout"] == results["visibility_timeout"]
    assert broker["visibility_timeout"] > 5000 + float(str(config["task_time_limit"]))


def test_every_beat_entry_expires_and_names_a_registered_task(config: dict[str, object]) -> None:
    schedule = config["beat_schedule"]
    assert isinstance(schedule, dict)
    assert {entry["task"] for entry in schedule.values()} == {
        "stock_sync.sweep_stuck_operations",
        "stock_sync.evaluate_alerts",
        "stock_sync.reconcile",
    }
    for entry in schedule.values():
        assert entry["options"]["expires"] > 0
        assert entry["task"] in app.tasks


def test_the_stage_tasks_are_registered() -> None:
    for name in (
        "load_line_items",
        "validate_stock",
        "deduct_stock",
        "sync_microservice",
        "rollback",
    ):
        assert f"stock_sync.{name}" in app.tasks
