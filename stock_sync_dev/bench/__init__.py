"""The benchmark (``make benchmark``, ``python -m stock_sync_dev.benchmark``), by concern:

- ``harness``: the throwaway database, the processes a run starts (worker, producer, fake
  microservice) and their environment;
- ``procstat``: CPU and memory of those processes from ``/proc``;
- ``producer_main``: the producer process (``submit_operation`` one by one, the batch, the
  bare chains);
- ``noop_tasks``: the bare chain's tasks, loaded only by the benchmark's worker;
- ``phases``: what is measured (ratio, batch, counts, latency, contention, soak);
- ``queries``: the sweep and metrics queries over a big table;
- ``profiling``: py-spy profiles of the worker and the producer, summarised;
- ``report``: metrics, targets and tables; ``cli``: the command line.

This package imports nothing at import time: the worker imports ``noop_tasks`` alone.
"""

NOOP_TASKS_MODULE = "stock_sync_dev.bench.noop_tasks"
NOOP = "stock_sync.benchmark.noop"
NOOP_DONE = "stock_sync.benchmark.noop_done"
