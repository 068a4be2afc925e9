"""The PN GW's control socket: a Unix socket in the (0700) data directory speaking JSON
lines, used by ``cpns gateway assign`` / ``status`` / ``stop``.

One request per line, one JSON object back per line. The password key travels over it
(hex); the password itself never reaches the daemon (the CLI derives the key), so the
socket is the owner's only (0600). Ops:

* ``{"op": "status"}``: the daemon's state (IDs, indexes, flags; never key material);
* ``{"op": "shutdown"}``: a graceful stop;
* ``{"op": "assign", "pne_id", "user_id", "password_key", "claim_key", "wait"}``: the 003
  EUKey assignment for a PNE without UI; the reply is an
  :class:`~cpns.gateway.procedures.eukey_assignment.AssignResult`.

A malformed request gets ``MALFORMED_MESSAGE`` with an ``error`` text; a failure inside an
op gets ``INTERNAL_ERROR``: a control client never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Final, Protocol

from cpns.errors import ConfigurationError
from cpns.gateway.connections import Connections
from cpns.gateway.procedures.eukey_assignment import AssignResult

__all__ = ["CONTROL_LIMIT", "ControlServer", "ControlTarget"]

log = logging.getLogger("cpns.gateway")

#: Longest control request line, bytes.
CONTROL_LIMIT: Final = 64 * 1024


class ControlTarget(Protocol):
    """What the control socket drives (the daemon)."""

    def status(self) -> dict[str, object]:
        """The ``status`` reply."""
        ...

    def request_shutdown(self) -> None:
        """Ask for a graceful stop."""
        ...

    async def assign(
        self,
        pne_id: str,
        user_id: str,
        password_key: bytes,
        *,
        claim_key: bytes,
        wait: float = 0.0,
    ) -> AssignResult:
        """Run the 003 EUKey assignment for ``pne_id``."""
        ...


class ControlServer:
    """The control socket's listener and its JSON commands."""

    def __init__(self, target: ControlTarget, connections: Connections) -> None:
        self._target = target
        self._connections = connections
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<ControlServer {'open' if self._server is not None else 'closed'}>"

    async def start(self, sock: Path) -> None:
        """Listen on ``sock`` (owner only). The caller holds the store lock, so no other
        daemon uses this socket: a leftover file is from a crashed run and is replaced.

        Raises ConfigurationError (the socket cannot be created)."""
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(sock), limit=CONTROL_LIMIT
            )
        except OSError as exc:  # e.g. a data directory path too long for AF_UNIX
            raise ConfigurationError(f"cannot create control socket {sock}: {exc}") from None
        os.chmod(sock, 0o600)  # the password key travels here: owner only

    def close(self) -> None:
        """Stop accepting clients."""
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        """Wait until the listener is closed."""
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task, writer)
        try:
            while line := await reader.readline():
                reply = await self.op(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            await self._connections.finish(task, writer)

    async def op(self, line: bytes) -> dict[str, object]:
        """The reply to one request line."""

        def bad(why: str) -> dict[str, object]:
            return {
                "ok": False,
                "status": "MALFORMED_MESSAGE",
                "stage": None,
                "hop": "gateway",
                "error": why,
            }

        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return bad("not JSON")
        if not isinstance(request, dict):
            return bad("not a JSON object")
        op = request.get("op")
        try:
            if op == "status":
                return self._target.status()
            if op == "shutdown":
                log.info("shutdown requested on the control socket")
                self._target.request_shutdown()
                return {"ok": True, "status": "OK"}
            if op == "assign":
                pne_id, user_id = request.get("pne_id"), request.get("user_id")
                key_hex, wait = request.get("password_key"), request.get("wait", 0)
                claim_hex = request.get("claim_key")
                if not (
                    isinstance(pne_id, str)
                    and isinstance(user_id, str)
                    and isinstance(key_hex, str)
                    and isinstance(claim_hex, str)
                ):
                    return bad("assign needs pne_id, user_id, password_key and claim_key (hex)")
                if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
                    return bad("wait must be a non-negative number of seconds")
                try:
                    password_key = bytes.fromhex(key_hex)
                    claim = bytes.fromhex(claim_hex)
                except ValueError:
                    return bad("password_key and claim_key must be hex")
                result = await self._target.assign(
                    pne_id, user_id, password_key, claim_key=claim, wait=float(wait)
                )
                return result.to_json()
        except Exception:  # a control client must never take the daemon down
            log.exception("control op %r failed", op)
            return {"ok": False, "status": "INTERNAL_ERROR", "stage": None, "hop": "gateway"}
        return bad(f"unknown op {op!r}")
