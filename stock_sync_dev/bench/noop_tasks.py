"""The bare chain's no-op tasks, registered on the Celery app of ``tasks`` when imported.

Only the benchmark's worker imports this module (``celery -A tasks worker --include
stock_sync_dev.bench.noop_tasks``): the production app never carries them. The producer
sends them by name (``app.signature``), so it needs no import either.
"""

from __future__ import annotations

import os
import time

import redis

from stock_sync.adapters.settings import get_settings
from stock_sync_dev.bench import NOOP, NOOP_DONE
from tasks.app import app

# KEYS: counter, latest completion time; ARGV: this completion's time (epoch seconds).
RECORD_DONE_LUA = """
local done = redis.call('INCR', KEYS[1])
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > latest then redis.call('SET', KEYS[2], ARGV[1], 'KEEPTTL') end
return done
"""

_redis_clients: dict[int, redis.Redis] = {}


def _worker_redis() -> redis.Redis:
    """This process's Redis client on the configured broker (one per forked child)."""
    client = _redis_clients.get(os.getpid())
    if client is None:
        client = _redis_clients[os.getpid()] = redis.Redis.from_url(
            get_settings().effective_broker_url
        )
    return client


def _noop(value: str) -> str:
    """A link of the bare chain: passes its argument on, like a pipeline stage."""
    return value


def _noop_done(value: str, done_key: str) -> str:
    """The last link: counts the chain as done under ``done_key`` with its completion time."""
    _worker_redis().eval(
        RECORD_DONE_LUA, 2, f"{done_key}:count", f"{done_key}:latest", repr(time.time())
    )
    return value


# Registered without decorator syntax so the bodies above stay typed.
noop = app.task(name=NOOP)(_noop)
noop_done = app.task(name=NOOP_DONE)(_noop_done)
