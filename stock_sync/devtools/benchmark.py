"""``python -m stock_sync.devtools.benchmark`` (``make benchmark``): see
:mod:`stock_sync.devtools.bench.cli` for what it measures and how."""

from __future__ import annotations

import sys

from stock_sync.devtools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
