"""The composition root: builds the real collaborators once per process.

Celery's prefork children call :func:`reset_services` (``worker_process_init``) so each child
builds its own engine and HTTP pool instead of sharing its parent's sockets.

It sits above the services and below the entrypoints: the Celery app (``tasks``) passes its
dispatcher in with :func:`use_dispatcher` when it is imported, so nothing here imports upward.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from stock_sync.adapters.db import Database, get_database
from stock_sync.adapters.error_reporting import ErrorReporter, process_error_reporter
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.notifications import LoggingNotifier, Notifier, load_sender
from stock_sync.adapters.settings import Settings, get_settings
from stock_sync.domain.errors import ConfigurationError
from stock_sync.services.dispatch import Dispatcher
from stock_sync.services.marketplace_audit import MarketplaceAudit
from stock_sync.services.operation_cancellation_service import OperationCancellationService
from stock_sync.services.recovery import OperationRecoveryService
from stock_sync.services.stage_runner import StageRunner
from stock_sync.services.standardized_logger import StandardizedLogger
from stock_sync.services.stock_synchronization_service import StockSynchronizationService
from stock_sync.services.sweeps import StuckOperationSweeper


@dataclass
class Services:
    settings: Settings
    database: Database
    client: MicroserviceClient
    logger: StandardizedLogger
    dispatcher: Dispatcher
    synchronization: StockSynchronizationService
    cancellation: OperationCancellationService
    recovery: OperationRecoveryService


def build_services(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    database: Database | None = None,
    client: MicroserviceClient | None = None,
    notifier: Notifier | None = None,
    error_reporter: ErrorReporter | None = None,
) -> Services:
    """Wire the real services for ``settings`` (defaults: the environment, Celery dispatch,
    Sentry when SENTRY_DSN is set)."""
    settings = settings or get_settings()
    database = database or get_database(settings)
    if dispatcher is None:
        dispatcher = _default_dispatcher()
    client = client or MicroserviceClient(
        settings.microservice_url,
        timeout_s=settings.microservice_timeout_s,
        connect_timeout_s=min(settings.microservice_timeout_s, 3.0),
        deadline_s=settings.microservice_deadline_s,
        max_response_bytes=settings.microservice_max_response_bytes,
        max_line_quantity=settings.max_line_quantity,
    )
    logger = StandardizedLogger()
    runner = StageRunner(
        database=database,
        logger=logger,
        notifier=notifier or LoggingNotifier(load_sender(settings.notification_sender)),
        settings=settings,
        error_reporter=error_reporter or process_error_reporter(),
    )
    cancellation = OperationCancellationService(
        database=database, client=client, logger=logger, dispatcher=dispatcher, runner=runner
    )
    synchronization = StockSynchronizationService(
        database=database, client=client, logger=logger, runner=runner, cancellation=cancellation
    )
    recovery = OperationRecoveryService(database=database, logger=logger, dispatcher=dispatcher)
    return Services(
        settings, database, client, logger, dispatcher, synchronization, cancellation, recovery
    )


_dispatcher_factory: Callable[[], Dispatcher] | None = None


def use_dispatcher(factory: Callable[[], Dispatcher]) -> None:
    """Make ``factory`` the dispatcher of the services built without one (the Celery app
    calls this when it is imported)."""
    global _dispatcher_factory
    _dispatcher_factory = factory


def _default_dispatcher() -> Dispatcher:
    if _dispatcher_factory is None:
        raise ConfigurationError(
            "no dispatcher: import tasks first (the Celery app passes its dispatcher in)"
        )
    return _dispatcher_factory()


_services: dict[int, Services] = {}
_lock = threading.Lock()


def get_services() -> Services:
    """This process's services, built on first use."""
    with _lock:
        services = _services.get(os.getpid())
        if services is None:
            services = _services[os.getpid()] = build_services()
        return services


def reset_services() -> None:
    """Forget the built services (after a fork, or when tests change the settings)."""
    with _lock:
        _services.clear()


def audit_for(services: Services) -> MarketplaceAudit:
    """The marketplace audit wired to this process's services."""
    return MarketplaceAudit(
        database=services.database,
        client=services.client,
        synchronization=services.synchronization,
        cancellation=services.cancellation,
        rate_per_s=services.settings.marketplace_audit_rate_per_s,
        batch_size=services.settings.marketplace_audit_batch_size,
    )


def sweeper_for(services: Services) -> StuckOperationSweeper:
    """The sweeper wired to this process's services."""
    return StuckOperationSweeper(
        database=services.database,
        settings=services.settings,
        dispatcher=services.dispatcher,
        synchronization=services.synchronization,
        logger=services.logger,
    )
