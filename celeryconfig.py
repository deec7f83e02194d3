"""Celery configuration, read from stock-sync's settings (``app.config_from_object``).

The database row is the truth, so results are ignored; messages are acknowledged late and
re-queued when a worker dies; every countdown stays far below the Redis visibility timeout,
or Redis would hand a waiting retry to a second worker.

On RabbitMQ (an ``amqp://`` broker URL) both queues are durable quorum queues with a delivery
limit, publishes are confirmed, and countdowns wait in the broker (Celery's native delayed
delivery) instead of in a worker's memory; see :func:`quorum_queue`.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab
from kombu.entity import Exchange, Queue

from stock_sync.adapters.settings import Settings, exit_on_configuration_error, get_settings

MIN_VISIBILITY_TIMEOUT_S = 3600
# A quorum queue drops a message returned to it more than this many times (on RabbitMQ 3.x
# every return counts: its worker died, lost its connection or shut down holding it). A stage
# never counts such a death, so without a limit a message that kills its worker (memory, a
# native crash) would loop forever; past it the message is lost, and the stuck sweep re-drives
# the operation on its stage's retry budget. RabbitMQ 4 defaults to 20; 3.x has no default.
QUORUM_DELIVERY_LIMIT = 10
# Beat's tasks; they are routed to the maintenance queue.
MAINTENANCE_TASKS = (
    "stock_sync.sweep_stuck_operations",
    "stock_sync.release_due_retries",
    "stock_sync.marketplace_audit",
    "stock_sync.evaluate_alerts",
    "stock_sync.reconcile",
)


def visibility_timeout_s(settings: Settings) -> int:
    """Longer than the longest countdown plus the hard time limit, with room to spare (a
    longer wait is parked in the database, never a countdown message)."""
    countdown = min(settings.retry_backoff_max_s, settings.retry_park_after_s)
    longest = countdown + settings.task_time_limit_s
    return int(max(MIN_VISIBILITY_TIMEOUT_S, 2 * longest))


def _every(task: str, interval_s: float) -> dict[str, Any]:
    """Beat's entry for the task ``stock_sync.<task>`` every ``interval_s`` seconds."""
    return {
        "task": f"stock_sync.{task}",
        "schedule": interval_s,
        "options": {"expires": interval_s},
    }


def maintenance_schedule(settings: Settings) -> dict[str, Any]:
    """Sweeps, alerts and the daily reconciliation; each expires before its next run so a
    backlog never piles up copies of the same maintenance job."""
    return {
        "sweep-stuck-operations": _every("sweep_stuck_operations", settings.sweep_interval_s),
        "release-due-retries": _every("release_due_retries", settings.retry_release_interval_s),
        "evaluate-alerts": _every("evaluate_alerts", settings.alert_interval_s),
        "marketplace-audit": _every("marketplace_audit", settings.marketplace_audit_interval_s),
        "reconcile-daily": {
            "task": "stock_sync.reconcile",
            "schedule": crontab(hour=3, minute=17),
            "options": {"expires": 3600},
        },
    }


def _direct_queue(name: str) -> Queue:
    """A queue as Celery declares its default one: a direct exchange and routing key of its
    name (so the pipeline queue is the same queue as before the maintenance queue existed)."""
    return Queue(name, Exchange(name), routing_key=name)  # type: ignore[no-untyped-call]


def quorum_queue(name: str) -> Queue:
    """A durable quorum queue (RabbitMQ) with the delivery limit above, on a topic exchange of
    its name: Celery's native delayed delivery routes a countdown back to its queue through a
    topic binding, and skips a queue on a direct exchange (its worker would then hold every
    waiting retry, unacknowledged, until its time comes)."""
    return Queue(  # type: ignore[no-untyped-call]
        name,
        Exchange(name, type="topic"),  # type: ignore[no-untyped-call]
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": QUORUM_DELIVERY_LIMIT},
    )


def queues(settings: Settings) -> dict[str, Any]:
    """The pipeline queue and the maintenance queue, with the routes to them.

    Beat's tasks expire after one interval: behind a pipeline backlog in a shared queue they
    would expire unrun, and the alerts would go silent exactly when processing is slow. With a
    queue of their own, a worker consuming both (``celery -A tasks worker`` with no ``-Q``
    consumes every queue listed here, taking from each in turn) runs them as soon as it frees
    a slot, and a dedicated ``-Q <maintenance queue>`` worker runs them whatever the backlog.
    """
    pipeline, maintenance = settings.queue_name, settings.effective_maintenance_queue_name
    declare = quorum_queue if settings.uses_amqp_broker else _direct_queue
    return {
        "task_default_queue": pipeline,
        "task_queues": (declare(pipeline), declare(maintenance)),
        "task_routes": {name: {"queue": maintenance} for name in MAINTENANCE_TASKS},
    }


def build(settings: Settings) -> dict[str, Any]:
    """Every Celery setting stock-sync relies on, for ``settings``."""
    transport_options: dict[str, Any] = {"visibility_timeout": visibility_timeout_s(settings)}
    # Nothing is created here: every process reads this, commands that only read included.
    # The filesystem transport's folders are made by the processes that use the broker
    # (tasks/app.py, tasks/dispatch.py), beat's schedule folder by its scheduler.
    config: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": dict(transport_options),
        "task_ignore_result": True,
        "result_expires": 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        **queues(settings),
        "task_send_sent_event": settings.task_events,
        "worker_send_task_events": settings.task_events,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # A producer must not hang when the broker is down: fail fast, the sweep re-drives.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "broker_connection_timeout": 3,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": maintenance_schedule(settings),
        # Celery's persistent scheduler, recording each send (beat's health: tasks/beat.py).
        "beat_scheduler": "tasks.beat:RecordingScheduler",
        "beat_schedule_filename": str(settings.data_dir / "celerybeat-schedule"),
    }
    _fit_to_broker(settings, config)
    return config


def _fit_to_broker(settings: Settings, config: dict[str, Any]) -> None:
    """What each kind of broker needs on top of the common settings, written into ``config``."""
    transport_options = config["broker_transport_options"]
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder
        transport_options.update(
            data_folder_in=str(folder / "queue"),
            data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"),
            store_processed=False,
            # kombu's default is "control" relative to the working directory
            control_folder=str(folder / "control"),
            # an idle worker re-lists the queue folder this often (kombu's default: 1 s)
            polling_interval=0.1,
        )
    elif settings.uses_amqp_broker:
        config.update(rabbitmq_settings())
        transport_options.clear()  # a visibility timeout means nothing to RabbitMQ
        transport_options.update(confirm_publish=True)
        config["result_backend_transport_options"] = {}
    else:
        transport_options.update(socket_timeout=5, socket_connect_timeout=3)


def rabbitmq_settings() -> dict[str, Any]:
    """What quorum queues need from Celery (5.5 or later).

    Quorum queues refuse a global QoS: Celery sees them among the declared queues and sets the
    prefetch per consumer instead (it then no longer raises the prefetch for a waiting
    countdown, which is why countdowns must wait in the broker). A countdown is published to
    Celery's chain of ``celery_delayed_*`` queues, each holding it 2**n seconds, and comes back
    to its queue when due; those queues are quorum queues too, so a waiting retry survives a
    broker restart or the loss of a node. Native delayed delivery counts whole seconds
    (``tasks.base.broker_countdown`` rounds up).
    """
    return {
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
    }


# Celery imports this module while starting a worker, beat or Flower: a bad setting, or no
# broker configured outside the embedded set-up, ends the process with one line instead of a
# traceback.
with exit_on_configuration_error():
    globals().update(build(get_settings()))
