"""The Celery side of stock-sync: ``celery -A tasks worker|beat|flower``."""

from tasks.app import app

# Importing the task modules registers them on the app.
from tasks import maintenance, monitoring, stages  # noqa: F401  isort: skip

celery = app
__all__ = ["app", "celery"]
