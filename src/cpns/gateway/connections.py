"""The PN GW daemon's open connections (PAN links and control clients), for shutdown.

The PAN side and the control socket register each connection's handler task and writer
here; the daemon's stop closes them all, gives the handlers a grace period, then cancels
what is left.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Connections"]


class Connections:
    """The daemon's open connections (PAN links and control clients), for shutdown."""

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task[None]] = set()

    def add(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        """Track one connection's handler task and writer."""
        self.handlers.add(task)
        self.writers.add(writer)

    async def finish(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        """Close one connection and stop tracking it."""
        self.writers.discard(writer)
        writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()
        self.handlers.discard(task)

    async def close_all(self, grace: float) -> None:
        """Close every connection; give handlers ``grace`` seconds, then cancel them."""
        for writer in list(self.writers):
            writer.close()
        if self.handlers:
            _, pending = await asyncio.wait(self.handlers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
