"""``python -m stock_sync_dev.benchmark`` (``make benchmark``): see
:mod:`stock_sync_dev.bench.cli` for what it measures and how."""

from __future__ import annotations

import sys

from stock_sync_dev.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
