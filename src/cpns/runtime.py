"""The real clock, RNG and event loop, for the I/O shells only (the core receives time
and randomness as arguments and never runs a loop)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Coroutine
from typing import Any

__all__ = ["SystemRandom", "monotonic", "run_event_loop", "wall_time"]


class SystemRandom:
    """The OS CSPRNG, satisfying :class:`cpns.types.Random`."""

    def token_bytes(self, n: int) -> bytes:
        """Return ``n`` bytes from :func:`secrets.token_bytes`."""
        return secrets.token_bytes(n)


def wall_time() -> int:
    """Seconds since the epoch, as carried in the ``Time`` fields of 003."""
    return int(time.time())


def monotonic() -> float:
    """Monotonic seconds, for deadlines."""
    return time.monotonic()


def run_event_loop[T](main: Coroutine[Any, Any, T]) -> T:
    """Run a daemon's main coroutine on uvloop (DESIGN §8), or asyncio's loop without it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(main)
    return uvloop.run(main)
