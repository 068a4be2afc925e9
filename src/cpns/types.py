"""Small shared types: the injected randomness source and the entity kinds.

The sans-I/O core never reads the clock or the OS RNG. Callers pass ``now`` values and an
object satisfying :class:`Random`; the I/O layer passes :class:`cpns.runtime.SystemRandom`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

__all__ = ["EntityKind", "Random"]


class Random(Protocol):
    """Source of random bytes injected into the core (``secrets.token_bytes`` shaped)."""

    def token_bytes(self, n: int) -> bytes:
        """Return ``n`` unpredictable bytes."""
        ...


class EntityKind(IntEnum):
    """The three CPNS entities of 002 §3.2 ("CPNS Entity"); wire values are ours."""

    #: Personal Network Element.
    PNE = 1
    #: Personal Network Gateway.
    PN_GW = 2
    #: The CPNS Server itself (only as a message source or destination).
    SERVER = 3
