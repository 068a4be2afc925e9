"""The real clock and RNG, for the I/O shells only (the core receives them as arguments)."""

from __future__ import annotations

import secrets
import time

__all__ = ["SystemRandom", "monotonic", "wall_time"]


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
