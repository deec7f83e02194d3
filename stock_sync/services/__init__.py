"""The service layer: the seed's stage logic (StockSynchronizationService), cancellation
(OperationCancellationService), the StandardizedLogger, sweeps, reconciliation, metrics,
alerts, health checks and the read models the command line shows. Imports the domain and the
adapters, never an entrypoint, the composition root or Celery.
"""
