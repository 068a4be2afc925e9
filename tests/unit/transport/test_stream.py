"""The stream helpers shared by the PN GW daemon and the PNE agent (issue 5 items 10, 12)."""

from __future__ import annotations

import asyncio

import cbor2
import pytest

from cpns.errors import DecodeError
from cpns.transport.framing import encode_frame
from cpns.transport.stream import PEER_TEXT_MAX, decode_payload, peer_text, read_message


@pytest.mark.parametrize(
    "payload",
    [
        cbor2.dumps({0: 10**4999, 1: 1}),
        cbor2.dumps({0: 1, 1: 10**4999}),
        cbor2.dumps({0: 10**2999}),
        b"\xff" * 60_000,
        cbor2.dumps({0: "x" * 50_000}),
    ],
    ids=["huge-version", "huge-type", "3000-digits", "garbage", "long-text"],
)
def test_decode_payload_raises_only_decode_error_with_a_bounded_reason(payload: bytes) -> None:
    """Issue 5 item 10: whatever the codec does with a payload, a daemon or an agent sees
    only DecodeError, and its reason (which goes into a log line) stays short."""
    with pytest.raises(DecodeError) as info:
        decode_payload(payload)
    assert len(info.value.reason) < 4 * PEER_TEXT_MAX + 40


def test_read_message_turns_a_codec_failure_into_decode_error() -> None:
    """Issue 5 item 10: the huge-integer frame read from a stream is a DecodeError."""

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame(cbor2.dumps({0: 10**4999, 1: 1})))
        reader.feed_eof()
        with pytest.raises(DecodeError):
            await read_message(reader)

    asyncio.run(scenario())


def test_read_message_times_out_on_a_stalled_frame() -> None:
    """Issue 5 item 11: a peer that sends a header and then stalls is a TimeoutError when
    the caller gives a frame timeout (and an idle one is too, with an idle timeout)."""

    async def scenario() -> None:
        stalled = asyncio.StreamReader()
        stalled.feed_data(b"\x00\x00\x00\x10abc")
        with pytest.raises(TimeoutError):
            await read_message(stalled, frame_timeout=0.01)
        with pytest.raises(TimeoutError):
            await read_message(asyncio.StreamReader(), idle_timeout=0.01)

    asyncio.run(scenario())


def test_peer_text_is_one_short_escaped_line() -> None:
    """Issue 5 item 12: peer text in a log line is cut to a bound and escaped (no line
    breaks or terminal escapes can be forged)."""
    assert peer_text("pne-1") == "pne-1"
    forged = peer_text("ok\n2026-01-01 INFO cpns: fake line\x1b[31m")
    assert "\n" not in forged
    assert "\x1b" not in forged
    long = peer_text("é" * 100_000)
    assert len(long) < 4 * PEER_TEXT_MAX + 40
    assert "[100000 chars]" in long
