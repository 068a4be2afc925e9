"""Flow IDs in messages, and the one log line per message hop (docs/logging.md).

For the I/O shells only (server, gateway, device): the sans-I/O core builds messages
without a flow ID, and the shell that sends one :func:`stamp` s it with the flow being
handled (:func:`cpns.logs.flow_scope`). Whoever starts a flow draws its ID with
:func:`new_flow`; whoever receives a message handles it in that message's flow
(:func:`message_scope`), so its replies and its log lines carry the same ID.

:func:`log_hop` writes the structured line ``cpns trace`` reads: one per message sent or
received, with the message type, the direction, the peer party and the status. The flow
ID is not a security input (docs/wire.md section 2.3): nothing but logs and the audit
trail ever reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Final, Literal

from cpns.logs import current_flow, flow_scope
from cpns.messages.constants import FLOW_LEN
from cpns.messages.model import Message
from cpns.runtime import SystemRandom
from cpns.types import Random

__all__ = [
    "HOP_EVENT",
    "flow_bytes",
    "flow_hex",
    "log_hop",
    "message_scope",
    "new_flow",
    "stamp",
]

#: The ``event`` field of a hop line.
HOP_EVENT: Final = "message"

type Direction = Literal["sent", "received"]
type Party = Literal["server", "gateway", "pne"]


def new_flow(rng: Random | None = None) -> str:
    """A fresh flow ID: 8 random bytes, as 16 hex digits."""
    return (rng if rng is not None else SystemRandom()).token_bytes(FLOW_LEN).hex()


def flow_hex(flow: bytes | None) -> str | None:
    """A message's flow ID as logs show it (None stays None)."""
    return None if flow is None else flow.hex()


def flow_bytes(flow: str | None) -> bytes | None:
    """A logged flow ID back to its 8 wire bytes; None for None or anything malformed."""
    if flow is None or len(flow) != 2 * FLOW_LEN:
        return None
    try:
        return bytes.fromhex(flow)
    except ValueError:
        return None


def stamp[M: Message](message: M) -> M:
    """``message`` carrying the current flow ID, unless it already carries one."""
    if message.flow is not None:
        return message
    flow = flow_bytes(current_flow())
    return message if flow is None else dataclasses.replace(message, flow=flow)


@contextlib.contextmanager
def message_scope(message: Message) -> Iterator[None]:
    """Handle ``message`` in its own flow; one without a flow ID keeps the current one."""
    if message.flow is None:
        yield
        return
    with flow_scope(message.flow.hex()):
        yield


def log_hop(
    logger: logging.Logger,
    direction: Direction,
    message: Message,
    peer: Party,
    *,
    level: int = logging.INFO,
    **extra: object,
) -> None:
    """The one structured line of a message sent to, or received from, ``peer``.

    Fields: ``event`` ("message"), ``dir``, ``type`` (the MessageType name), ``peer``,
    ``status`` (the message's status name, when it has one), ``txid``, ``src``, ``dst``
    and the message's own ``flow`` (else the context's). Never a field value of the body
    other than the status.
    """
    if not logger.isEnabledFor(level):
        return
    status = getattr(message, "status", None)
    fields: dict[str, object] = {
        "event": HOP_EVENT,
        "dir": direction,
        "type": message.TYPE.name,
        "peer": peer,
        "txid": message.txid.hex(),
        "src": message.src,
        "dst": message.dst,
    }
    if status is not None:
        fields["status"] = getattr(status, "name", str(status))
    if message.flow is not None:
        fields["flow"] = message.flow.hex()
    fields.update(extra)
    logger.log(
        level,
        "%s %s %s %s%s",
        direction,
        message.TYPE.name,
        "to" if direction == "sent" else "from",
        peer,
        f" ({fields['status']})" if "status" in fields else "",
        extra=fields,
    )
