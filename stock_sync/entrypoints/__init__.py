"""The entrypoints: the ``stock-sync`` command line, its rendering and the metrics server.
The producer API stays ``stock_sync.producer`` (the shop backend imports that path) and the
Celery tasks stay in ``tasks/``.
"""
