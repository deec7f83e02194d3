"""Development tools, not the runtime and not in the wheel: the demo, the benchmark and the
fault suites. Run them from the repository (``python -m stock_sync_dev.<tool>``, or the
Makefile's targets); nothing in ``stock_sync`` or ``stock_sync_fake`` imports them.
"""
