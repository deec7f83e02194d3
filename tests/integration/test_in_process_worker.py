"""The end-to-end tests' worker is pytest-celery's session worker: a real worker in a thread of
the test process, threads pool, on the real Redis, never eager, and none of pytest-celery's
Docker-based fixtures (no Docker engine here)."""

from __future__ import annotations

import pytest

from tests.support import Pipeline

# pytest-celery's fixtures that start containers.
DOCKER_FIXTURES = {
    "celery_setup",
    "celery_worker",
    "celery_worker_cluster",
    "celery_broker",
    "celery_broker_cluster",
    "celery_backend",
    "celery_backend_cluster",
    "default_worker_container",
    "default_redis_broker",
    "default_rabbitmq_broker",
}


def test_the_pipeline_runs_on_pytest_celerys_session_worker(
    request: pytest.FixtureRequest, pipeline: Pipeline
) -> None:
    import pytest_celery.plugin
    from celery.contrib.testing.worker import TestWorkController

    from tasks import app

    assert request.config.pluginmanager.get_plugin("celery") is pytest_celery.plugin
    used = set(request.fixturenames)
    assert {"celery_session_worker", "celery_session_app"} <= used
    assert not used & DOCKER_FIXTURES

    worker = request.getfixturevalue("celery_session_worker")
    assert isinstance(worker, TestWorkController) and worker.app is app
    assert worker.pool_cls.__module__.endswith("thread")
    assert worker.concurrency == 4
    assert app.conf.task_always_eager is False
    assert app.conf.broker_url.startswith("redis://")
    # the run's two queues, as the default worker command consumes them: the pipeline's and
    # the maintenance one (another test may have left the cached settings at their defaults)
    run_queue = request.getfixturevalue("pipeline_environment")
    consumed = {queue.name for queue in worker.consumer.task_consumer.queues}
    assert run_queue == app.conf.task_default_queue
    assert consumed == {run_queue, f"{run_queue}_maintenance"}
