"""Codec properties (STYLE §8): round trip of arbitrary valid messages, garbage in, mutations.

The strategies come from the FieldSpec metadata of cpns.messages.model, so a new field or
message type is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tests.helpers import ANY_MESSAGE, record_strategy

from cpns.errors import DecodeError
from cpns.messages.codec import decode, decode_record, encode, encode_record
from cpns.messages.model import MESSAGE_CLASSES, KeyBundle, Message

CODEC = settings(max_examples=200)


def decodes_exactly(data: bytes) -> Message | None:
    """The garbage-in invariant: decode or DecodeError, and anything accepted re-encodes to
    exactly the input (DESIGN §3: a decoded message re-encodes to the same bytes)."""
    try:
        message = decode(data)
    except DecodeError:
        return None
    assert encode(message) == data
    return message


@pytest.mark.parametrize("cls", list(MESSAGE_CLASSES.values()), ids=lambda c: c.__name__)
@CODEC
@given(data=st.data())
def test_round_trip_every_type(cls: type[Message], data: st.DataObject) -> None:
    """DESIGN §3: for any valid message of each type, decode(encode(m)) == m and encoding the
    result gives identical bytes."""
    message = data.draw(record_strategy(cls))
    encoded = encode(message)
    decoded = decode(encoded)
    assert type(decoded) is cls
    assert decoded == message
    assert encode(decoded) == encoded


@CODEC
@given(bundle=record_strategy(KeyBundle))
def test_round_trip_key_bundle(bundle: KeyBundle) -> None:
    """003 §7.4.2.1.1.2 step 7: any valid KeyBundle round-trips byte for byte."""
    encoded = encode_record(bundle)
    assert decode_record(KeyBundle, encoded) == bundle
    assert encode_record(decode_record(KeyBundle, encoded)) == encoded


@CODEC
@given(data=st.binary(max_size=512))
@example(b"")
@example(b"\xa0")
@example(b"\xbf\xff")
@example(b"\xd8\x63\x00")
def test_arbitrary_bytes(data: bytes) -> None:
    """STYLE §8 garbage-in: arbitrary bytes, fed whole, either decode (to a message that
    re-encodes to them) or raise DecodeError; nothing else escapes."""
    decodes_exactly(data)
    try:
        decode_record(KeyBundle, data)
    except DecodeError:
        pass


# Well-formed CBOR of random shape reaches deeper than random bytes: maps with the
# header's integer keys, bodies of the wrong shape, floats, tags...
CBOR_VALUES = st.recursive(
    st.one_of(
        st.integers(-(2**64), 2**64),
        st.binary(max_size=40),
        st.text(max_size=20),
        st.booleans(),
        st.none(),
        st.floats(allow_nan=False),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.integers(-1, 8), inner, max_size=8),
        st.builds(cbor2.CBORTag, st.integers(0, 300), inner),
    ),
    max_leaves=20,
)


@CODEC
@given(value=CBOR_VALUES)
def test_arbitrary_cbor(value: Any) -> None:
    """DESIGN §3: any well-formed CBOR document, canonical or not, either decodes exactly or
    raises DecodeError."""
    for canonical in (True, False):
        try:
            data = cbor2.dumps(value, canonical=canonical)
        except (cbor2.CBOREncodeError, ValueError, TypeError):
            return
        decodes_exactly(data)


@CODEC
@given(message=ANY_MESSAGE, data=st.data())
def test_header_of_one_type_body_of_another(message: Message, data: st.DataObject) -> None:
    """DESIGN §3: a valid body under another message type's header is refused or decodes
    exactly (never a stray exception)."""
    encoded = cbor2.loads(encode(message))
    encoded[1] = data.draw(st.sampled_from([int(t) for t in MESSAGE_CLASSES]))
    decodes_exactly(cbor2.dumps(encoded, canonical=True))


MUTATIONS = st.sampled_from(["flip", "insert", "delete", "replace"])


@CODEC
@given(message=ANY_MESSAGE, data=st.data())
def test_mutated_encoding(message: Message, data: st.DataObject) -> None:
    """STYLE §8: a valid encoding with one byte flipped, inserted, deleted or replaced either
    decodes to a message that re-encodes to the mutated bytes or raises DecodeError."""
    encoded = bytearray(encode(message))
    kind = data.draw(MUTATIONS)
    position = data.draw(st.integers(0, len(encoded) - (0 if kind == "insert" else 1)))
    match kind:
        case "flip":
            encoded[position] ^= 1 << data.draw(st.integers(0, 7))
        case "insert":
            encoded.insert(position, data.draw(st.integers(0, 255)))
        case "delete":
            del encoded[position]
        case "replace":
            encoded[position] = data.draw(st.integers(0, 255))
    mutated = decodes_exactly(bytes(encoded))
    if mutated is not None and kind in ("insert", "delete"):
        assert mutated != message


@settings(max_examples=50)
@given(message=ANY_MESSAGE)
def test_every_proper_prefix_is_refused(message: Message) -> None:
    """STYLE §8 (fed one byte at a time): no proper prefix of a valid encoding decodes; the
    codec never acts on a partial message."""
    encoded = encode(message)
    lengths = range(len(encoded))
    if len(encoded) > 1024:  # 16 KiB fields: the edges of every field, and a sample between
        lengths = sorted({*range(512), *range(len(encoded) - 512, len(encoded)), *lengths[::61]})
    for length in lengths:
        with pytest.raises(DecodeError):
            decode(encoded[:length])


@CODEC
@given(message=ANY_MESSAGE, flow=st.one_of(st.none(), st.binary(max_size=24), st.text(max_size=8)))
def test_flow_header_field_is_bounded(message: Message, flow: object) -> None:
    """docs/wire.md section 2: the optional flow ID (header key 7) is exactly 8 bytes; any
    other value (another size, text, null) is refused, and an 8-byte one decodes to the
    same message with that flow and nothing else changed."""
    top = cbor2.loads(encode(message))
    top[7] = flow
    data = cbor2.dumps(top, canonical=True)
    if type(flow) is bytes and len(flow) == 8:
        decoded = decodes_exactly(data)
        assert decoded == dataclasses.replace(message, flow=flow)
    else:
        with pytest.raises(DecodeError):
            decode(data)
