"""Retry policy: how long to wait before the next attempt, and when to give up.

Pure arithmetic so it can be tested without a broker; the Celery tasks pass the computed
countdown to ``Task.retry`` (Celery's own ``retry_backoff`` rounds to whole seconds).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


def compute_backoff(
    retries: int,
    *,
    base_s: float,
    max_s: float,
    jitter: bool = True,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``retries`` (1-based): ``base * 2**(n-1)``, capped.

    With jitter the wait is drawn from [half, full] of that value ("equal jitter"), so a crowd
    of failures spreads out without ever retrying immediately.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    exponent = min(retries - 1, 62)  # 2**62 already exceeds any sane maximum
    delay: float = min(max_s, base_s * float(2**exponent))
    if not jitter:
        return delay
    return delay / 2 + rand() * delay / 2


@dataclass(frozen=True)
class RetryPolicy:
    """A stage's retry budget and backoff."""

    max_retries: int
    base_s: float
    max_s: float

    def exhausted(self, retries_done: int) -> bool:
        """True once ``retries_done`` retries have already been used."""
        return retries_done >= self.max_retries

    def delay_for(
        self, retry_number: int, *, at_least_s: float | None = None, jitter: bool = True
    ) -> float:
        """Wait before retry ``retry_number``; never shorter than a server's Retry-After."""
        delay = compute_backoff(retry_number, base_s=self.base_s, max_s=self.max_s, jitter=jitter)
        if at_least_s is not None:
            delay = max(delay, min(at_least_s, self.max_s))
        return delay
