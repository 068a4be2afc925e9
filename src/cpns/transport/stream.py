"""asyncio helpers that move one framed CPNS message over a stream (STYLE §7).

The PN GW daemon and the PNE agent both speak "one CPNS message per frame" over an
asyncio stream (plain TCP now; a TLS-PSK stream later, with the same reader/writer
interface). These two helpers are the only place that joins the sans-I/O framer
(:mod:`cpns.transport.framing`) and codec (:mod:`cpns.messages.codec`) to a socket, so
that everything above them handles typed messages and everything below handles bytes.

Errors keep their layers: malformed bytes are a :class:`~cpns.errors.DecodeError` (the
peer's fault, answered with an ErrorMessage), a dead socket is the caller's
``OSError`` / :class:`asyncio.IncompleteReadError` handling, and a clean end of stream
between frames is simply ``None``.
"""

from __future__ import annotations

import asyncio

from cpns.errors import DecodeError
from cpns.messages.codec import decode, encode
from cpns.messages.model import Message
from cpns.transport.framing import HEADER_LEN, encode_frame, parse_length

__all__ = ["read_frame", "read_message", "write_message"]


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """Read one frame's payload; ``None`` if the stream ended cleanly between frames.

    Raises:
        DecodeError: the header announced a zero or oversize length, or the stream
            ended in the middle of a frame (the peer sent a truncated message).
    """
    try:
        header = await reader.readexactly(HEADER_LEN)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise DecodeError("stream ended inside a frame header") from None
    length = parse_length(header)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise DecodeError("stream ended inside a frame") from None


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """Read and decode one message; ``None`` on a clean end of stream.

    Raises:
        DecodeError: bad framing, a truncated frame, or a payload that is not exactly
            one well-formed CPNS message.
    """
    payload = await read_frame(reader)
    if payload is None:
        return None
    return decode(payload)


async def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    """Encode, frame, write and drain one message (``OSError`` if the peer is gone)."""
    writer.write(encode_frame(encode(message)))
    await writer.drain()
