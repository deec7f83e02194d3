"""Notifications to people (validation failures, failed operations): a small pluggable port."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from stock_sync.domain.errors import ConfigurationError

NOTIFICATIONS_LOGGER = "stock_sync.notifications"


@dataclass(frozen=True)
class Notification:
    """What happened to which operation, for a human."""

    kind: str
    operation_id: UUID
    order_id: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "operation_id": str(self.operation_id),
            "order_id": self.order_id,
            "message": self.message,
            "details": self.details,
        }


class Notifier(Protocol):
    def notify(self, notification: Notification) -> None: ...


Sender = Callable[[Notification], None]


class LoggingNotifier:
    """Logs every notification at WARNING, then hands it to the configured sender, if any.

    A sender that fails is logged and never breaks the stage that notified.
    """

    def __init__(self, sender: Sender | None = None, logger: logging.Logger | None = None) -> None:
        self._sender = sender
        self._logger = logger or logging.getLogger(NOTIFICATIONS_LOGGER)

    def notify(self, notification: Notification) -> None:
        self._logger.warning(
            "notification: %s",
            notification.message,
            extra={
                "notification": notification.to_dict(),
                "operation_id": str(notification.operation_id),
            },
        )
        if self._sender is None:
            return
        try:
            self._sender(notification)
        except Exception as error:
            self._logger.error(
                "notification sender failed: %s: %s",
                type(error).__name__,
                error,
                extra={"operation_id": str(notification.operation_id)},
            )


def load_sender(dotted_path: str) -> Sender | None:
    """Import ``package.module:function`` as the notification sender ('' for none)."""
    if not dotted_path:
        return None
    module_name, _, attribute = dotted_path.partition(":")
    try:
        sender = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigurationError(
            f"STOCK_SYNC_NOTIFICATION_SENDER: cannot import {dotted_path!r}: {error}"
        ) from None
    if not callable(sender):
        raise ConfigurationError(f"STOCK_SYNC_NOTIFICATION_SENDER: {dotted_path!r} is not callable")
    return sender  # type: ignore[no-any-return]
