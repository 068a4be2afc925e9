"""Sans-I/O length-prefixed framing for the PAN link (DESIGN §2, CPNS-1 / CPNS-6).

A TCP stream has no message boundaries, so every CPNS message on the PAN link travels
as one *frame*: a 4-byte big-endian length followed by that many bytes of encoded
message. This module only turns bytes into frames and back; it reads no socket, so the
same framer serves plain TCP today and a TLS-PSK stream or another PAN bearer later
(the transport stays pluggable), and it can be tested by feeding it arbitrary chunks.

Why the limits. A length is attacker-controlled: without a bound a peer could make us
buffer gigabytes before we ever look at the content. A frame longer than
:data:`~cpns.messages.constants.MAX_MESSAGE_SIZE` is refused as soon as its header is
seen, before any of its body is buffered. A zero length is refused too: no CPNS message
is empty, and accepting empty frames would let a peer keep a connection busy forever
without sending anything we could decode. Both are :class:`~cpns.errors.DecodeError`,
like every other malformed input (DESIGN §3: one decode error, never a parser exception).

After a :class:`DecodeError` the stream is out of step (we no longer know where the next
frame starts), so the decoder refuses further input and the caller closes the link.
"""

from __future__ import annotations

import struct
from typing import Final

from cpns.errors import DecodeError, LocalProtocolError
from cpns.messages.constants import MAX_MESSAGE_SIZE

__all__ = ["HEADER_LEN", "FrameDecoder", "encode_frame", "parse_length"]

#: Bytes in a frame header (the big-endian payload length).
HEADER_LEN: Final = 4

_LENGTH: Final = struct.Struct(">I")


def parse_length(header: bytes) -> int:
    """Read and check a frame header; return the payload length.

    Raises:
        DecodeError: the length is zero or larger than ``MAX_MESSAGE_SIZE``.
        LocalProtocolError: ``header`` is not exactly :data:`HEADER_LEN` bytes.
    """
    if len(header) != HEADER_LEN:
        raise LocalProtocolError(f"a frame header is {HEADER_LEN} bytes")
    (length,) = _LENGTH.unpack(header)
    if length == 0:
        raise DecodeError("empty frame")
    if length > MAX_MESSAGE_SIZE:
        raise DecodeError(f"frame of {length} bytes exceeds {MAX_MESSAGE_SIZE}")
    return int(length)


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length.

    Raises:
        LocalProtocolError: ``payload`` is empty or larger than ``MAX_MESSAGE_SIZE``
            (we never send what the peer must refuse).
    """
    if not payload or len(payload) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError(f"frame payload must be 1..{MAX_MESSAGE_SIZE} bytes")
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Reassemble frames from arbitrarily chunked stream bytes.

    Feed it whatever the socket delivered; it returns every frame completed so far and
    keeps the remainder. Memory use is bounded by one header plus one maximal frame.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._need: int | None = None  # payload length of the frame being read
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the payloads of all frames it completed, in order.

        Raises:
            DecodeError: a header announced a zero or oversize length. The decoder is
                then unusable (every later call raises the same error): close the link.
        """
        if self._broken:
            raise DecodeError("frame stream already failed")
        self._buffer += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                if len(self._buffer) < HEADER_LEN:
                    return frames
                try:
                    self._need = parse_length(bytes(self._buffer[:HEADER_LEN]))
                except DecodeError:
                    self._broken = True
                    self._buffer.clear()
                    raise
                del self._buffer[:HEADER_LEN]
            if len(self._buffer) < self._need:
                return frames
            frames.append(bytes(self._buffer[: self._need]))
            del self._buffer[: self._need]
            self._need = None
