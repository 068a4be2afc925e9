"""asyncio helpers that move one framed CPNS message over a stream (STYLE §7).

The PN GW daemon and the PNE agent both speak "one CPNS message per frame" over an
asyncio stream (plain TCP now; a TLS-PSK stream later, with the same reader/writer
interface). These two helpers are the only place that joins the sans-I/O framer
(:mod:`cpns.transport.framing`) and codec (:mod:`cpns.messages.codec`) to a socket, so
that everything above them handles typed messages and everything below handles bytes.

Errors keep their layers: malformed bytes are a :class:`~cpns.errors.DecodeError` (the
peer's fault, answered with an ErrorMessage), a dead socket is the caller's
``OSError`` / :class:`asyncio.IncompleteReadError` handling, a peer that stops sending in
the middle of a frame (or never starts one) is a :class:`TimeoutError` when the caller
gives a timeout, and a clean end of stream between frames is simply ``None``.

Whatever the codec raises for one payload, :func:`read_message` raises only
:class:`~cpns.errors.DecodeError`, with a bounded reason: a peer's bytes must never
surface as another exception type in a daemon or an agent (issue 5 item 10), even if the
codec itself has a bug. :func:`peer_text` (from :mod:`cpns.logs`) bounds and escapes
peer-supplied text before it goes into a log line.
"""

from __future__ import annotations

import asyncio

from cpns.errors import DecodeError
from cpns.logs import PEER_TEXT_MAX, peer_text
from cpns.messages.codec import decode, encode
from cpns.messages.model import Message
from cpns.transport.framing import HEADER_LEN, encode_frame, parse_length

__all__ = [
    "PEER_TEXT_MAX",
    "decode_payload",
    "peer_text",
    "read_frame",
    "read_message",
    "write_message",
]

# PEER_TEXT_MAX and peer_text are cpns.logs' (one rule for peer text in log lines,
# shared with the server), re-exported for the PAN side.


def decode_payload(payload: bytes) -> Message:
    """Decode one frame's payload; raises only :class:`DecodeError` (bounded reason).

    Raises:
        DecodeError: the payload is not exactly one well-formed CPNS message, or the
            codec failed on it in any other way.
    """
    try:
        return decode(payload)
    except DecodeError as exc:
        if len(exc.reason) <= PEER_TEXT_MAX:
            raise
        raise DecodeError(peer_text(exc.reason), code=exc.code) from None
    except Exception as exc:  # a codec bug must not become a peer-triggered crash
        raise DecodeError(f"undecodable message ({type(exc).__name__})") from None


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    idle_timeout: float | None = None,
    frame_timeout: float | None = None,
) -> bytes | None:
    """Read one frame's payload; ``None`` if the stream ended cleanly between frames.

    ``idle_timeout`` bounds the wait for the next frame's header, ``frame_timeout`` the
    wait for its body once the header arrived (None: no bound).

    Raises:
        DecodeError: the header announced a zero or oversize length, or the stream
            ended in the middle of a frame (the peer sent a truncated message).
        TimeoutError: a timeout passed (the peer is idle, or stalls inside a frame).
    """
    try:
        header = await asyncio.wait_for(reader.readexactly(HEADER_LEN), idle_timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise DecodeError("stream ended inside a frame header") from None
    length = parse_length(header)
    try:
        return await asyncio.wait_for(reader.readexactly(length), frame_timeout)
    except asyncio.IncompleteReadError:
        raise DecodeError("stream ended inside a frame") from None


async def read_message(
    reader: asyncio.StreamReader,
    *,
    idle_timeout: float | None = None,
    frame_timeout: float | None = None,
) -> Message | None:
    """Read and decode one message; ``None`` on a clean end of stream.

    Raises:
        DecodeError: bad framing, a truncated frame, or a payload that is not exactly
            one well-formed CPNS message (never any other error for the payload).
        TimeoutError: see :func:`read_frame`.
    """
    payload = await read_frame(reader, idle_timeout=idle_timeout, frame_timeout=frame_timeout)
    if payload is None:
        return None
    return decode_payload(payload)


async def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    """Encode, frame, write and drain one message (``OSError`` if the peer is gone)."""
    writer.write(encode_frame(encode(message)))
    await writer.drain()
