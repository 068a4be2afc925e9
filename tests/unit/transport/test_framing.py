"""The PAN link framer (cpns.transport.framing) and the asyncio stream helpers."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpns.errors import DecodeError, ErrorCode, LocalProtocolError
from cpns.messages.codec import encode
from cpns.messages.constants import MAX_MESSAGE_SIZE
from cpns.messages.model import PNEHello
from cpns.transport.framing import FrameDecoder, encode_frame, parse_length
from cpns.transport.stream import read_frame, read_message, write_message

_HELLO = PNEHello(txid=bytes(16), src="pne-1", dst="pan", has_ui=False, key_index=0)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for point in [*points, len(data)]:
        out.append(data[start:point])
        start = point
    return out


def test_round_trip_single_frame() -> None:
    """A frame is a 4-byte big-endian length followed by the payload."""
    frame = encode_frame(b"abc")
    assert frame == b"\x00\x00\x00\x03abc"
    assert FrameDecoder().feed(frame) == [b"abc"]


def test_partial_header_and_body_are_buffered() -> None:
    """Bytes of an incomplete frame are kept until the rest arrives."""
    dec = FrameDecoder()
    assert dec.feed(b"\x00\x00") == []
    assert dec.feed(b"\x00\x02a") == []
    assert dec.buffered == 1
    assert dec.feed(b"b\x00\x00\x00\x01c") == [b"ab", b"c"]
    assert dec.buffered == 0


@pytest.mark.parametrize(
    "header",
    [b"\x00\x00\x00\x00", struct.pack(">I", MAX_MESSAGE_SIZE + 1), b"\xff\xff\xff\xff"],
    ids=["zero", "one-over", "max-uint32"],
)
def test_bad_length_is_decode_error_and_sticky(header: bytes) -> None:
    """A zero or oversize length is refused before buffering, and the stream is dead."""
    dec = FrameDecoder()
    with pytest.raises(DecodeError) as info:
        dec.feed(header)
    assert info.value.code is ErrorCode.MALFORMED_MESSAGE
    with pytest.raises(DecodeError):
        dec.feed(encode_frame(b"ok"))


def test_largest_frame_is_accepted() -> None:
    """MAX_MESSAGE_SIZE itself is a legal frame length."""
    payload = b"x" * MAX_MESSAGE_SIZE
    assert FrameDecoder().feed(encode_frame(payload)) == [payload]


@pytest.mark.parametrize("payload", [b"", b"x" * (MAX_MESSAGE_SIZE + 1)], ids=["empty", "big"])
def test_encode_frame_refuses_what_the_peer_would_refuse(payload: bytes) -> None:
    """We never send a frame the receiving framer must reject."""
    with pytest.raises(LocalProtocolError):
        encode_frame(payload)


def test_parse_length_wants_four_bytes() -> None:
    """parse_length is given exactly one header."""
    with pytest.raises(LocalProtocolError):
        parse_length(b"\x00\x01")


@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_any_chunking_yields_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    """Stream boundaries carry no meaning: any split of several frames gives them back."""
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    got: list[bytes] = []
    for chunk in _chunks(stream, cuts):
        got += dec.feed(chunk)
    assert got == payloads
    assert dec.buffered == 0


@given(
    length=st.one_of(st.just(0), st.integers(MAX_MESSAGE_SIZE + 1, 2**32 - 1)),
    tail=st.binary(max_size=64),
)
def test_garbage_length_is_decode_error(length: int, tail: bytes) -> None:
    """Any out-of-range length raises DecodeError, whole or byte by byte."""
    data = struct.pack(">I", length) + tail
    with pytest.raises(DecodeError):
        FrameDecoder().feed(data)
    dec = FrameDecoder()
    for i in range(3):
        assert dec.feed(data[i : i + 1]) == []
    with pytest.raises(DecodeError):
        dec.feed(data[3:])


@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    """Garbage in: frames come out or DecodeError is raised, nothing else."""
    try:
        FrameDecoder().feed(data)
    except DecodeError:
        pass


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def _read_all(data: bytes) -> list[object]:
    reader = _reader(data)
    out: list[object] = []
    while (msg := await read_message(reader)) is not None:
        out.append(msg)
    return out


def test_read_message_and_clean_eof() -> None:
    """read_message decodes framed messages and returns None at a clean end of stream."""
    frame = encode_frame(encode(_HELLO))
    assert asyncio.run(_read_all(frame + frame)) == [_HELLO, _HELLO]


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00", encode_frame(encode(_HELLO))[:-1], encode_frame(b"\xff"), b"\x00\x00\x00\x00"],
    ids=["truncated-header", "truncated-body", "not-cbor", "zero-length"],
)
def test_read_message_garbage_is_decode_error(data: bytes) -> None:
    """Truncated frames, bad lengths and undecodable payloads are DecodeError."""
    with pytest.raises(DecodeError):
        asyncio.run(_read_all(data))


def test_read_frame_none_on_empty_stream() -> None:
    """No bytes at all is a clean end of stream."""

    async def main() -> bytes | None:
        return await read_frame(_reader(b""))

    assert asyncio.run(main()) is None


def test_write_message_over_a_real_socket() -> None:
    """write_message frames one message so that read_message on the peer gets it back."""

    async def main() -> object:
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await read_message(reader))
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            _reader_unused, writer = await asyncio.open_connection("127.0.0.1", port)
            await write_message(writer, _HELLO)
            result = await asyncio.wait_for(got, 5)
            writer.close()
            await writer.wait_closed()
        return result

    assert asyncio.run(main()) == _HELLO
