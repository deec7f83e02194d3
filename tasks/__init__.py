"""The Celery side of stock-sync: ``celery -A tasks worker|beat|flower``."""

from tasks.app import app

# Importing the task modules registers them on the app.
from tasks import maintenance, monitoring, stages  # noqa: F401  isort: skip
from stock_sync.composition import use_dispatcher
from tasks.dispatch import CeleryDispatcher

# The composition root builds services with this app's dispatcher (it never imports tasks).
use_dispatcher(CeleryDispatcher)

celery = app
__all__ = ["app", "celery"]
