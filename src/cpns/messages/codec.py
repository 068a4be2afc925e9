"""Deterministic CBOR in and out (RFC 8949 §4.2), with strict decoding (DESIGN §3).

A message is a CBOR map ``{0: version, 1: type, 2: txid, 3: src, 4: dst, [5: pn_id,]
6: body, [7: flow]}`` where ``body`` maps each field's small integer key to its value;
absent optional fields are omitted. Encoding uses core deterministic encoding (shortest
forms, definite lengths, sorted keys). Every map key is a non-negative integer (checked
when a field is declared) and every map is built in ascending key order, so cbor2's
ordinary encoder, which keeps a map's order and always writes shortest forms and definite
lengths, writes exactly what its canonical mode writes, at well under half the cost
(tests/unit/messages/test_codec.py checks the two agree on every message type).

Decoding is strict: every input is either decoded into a valid message that re-encodes
to exactly the same bytes, or rejected with one :class:`~cpns.errors.DecodeError`.
Unknown types, unknown or missing fields, mistyped or oversize values, tags, floats,
indefinite lengths, duplicate keys, non-shortest encodings and trailing bytes are all
rejected: a message we cannot fully read is a message we must not act on (STYLE §3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any

import cbor2

from cpns.errors import DecodeError, ErrorCode
from cpns.messages.constants import (
    ID_PATTERN,
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    TXID_LEN,
    HeaderKey,
    MessageType,
)
from cpns.messages.model import MESSAGE_CLASSES, FieldSpec, Message, Record, specs

__all__ = [
    "MAX_REASON_LEN",
    "decode",
    "decode_record",
    "encode",
    "encode_record",
    "peek_header",
    "record_json",
    "to_json",
]

_MAX_DEPTH = 4
#: Longest error reason the codec produces: a reason may quote the peer's bytes, and one
#: log line or one reply must never carry an unbounded amount of them.
MAX_REASON_LEN = 160


def _show(value: object) -> str:
    """A bounded description of a peer-supplied value for an error reason.

    Never formats a large integer in decimal: besides being unbounded, ``str`` of an
    integer over 4,300 digits raises ValueError (CPython's int-to-str limit).
    """
    if type(value) is int and value.bit_length() > 64:
        return f"<integer of {value.bit_length()} bits>"
    try:
        text = repr(value) if type(value) in (int, str, bytes, bool) or value is None else ""
    except Exception:  # pragma: no cover - repr of the types above does not raise
        text = ""
    if not text:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:40] + "..."


def _bounded(exc: BaseException) -> str:
    """``str(exc)`` cut to :data:`MAX_REASON_LEN` characters."""
    try:
        text = str(exc)
    except Exception:  # pragma: no cover - a message that cannot even be formatted
        text = type(exc).__name__
    return text if len(text) <= MAX_REASON_LEN else text[: MAX_REASON_LEN - 3] + "..."


def _guarded[T](decoder: Callable[[], T]) -> T:
    """Run a decoder so that nothing but a bounded :class:`DecodeError` escapes.

    Any other exception is a bug of ours on some input, but the caller is a daemon
    reading a peer's bytes: it must get the one error it handles, never a crash.
    """
    try:
        return decoder()
    except DecodeError as exc:
        if len(exc.reason) <= MAX_REASON_LEN:
            raise
        raise DecodeError(_bounded(exc), code=exc.code) from None
    except Exception as exc:
        raise DecodeError(f"undecodable ({type(exc).__name__})") from None


def _wire_value(spec: FieldSpec, value: object) -> object:
    if spec.kind == "enum":
        assert isinstance(value, IntEnum)
        return int(value)
    if spec.kind in ("bytes_list", "id_list"):
        assert isinstance(value, tuple)
        return list(value)
    if spec.kind == "records":
        assert isinstance(value, tuple)
        return [_body_map(item) for item in value]
    return value


#: Field kinds whose Python value is also their CBOR value.
_PLAIN_KINDS = frozenset({"bytes", "id", "int", "bool"})


def _body_map(record: Record) -> dict[int, object]:
    # One read of each field; the plain kinds skip _wire_value (a 32-entry message has
    # a few hundred fields).
    out: dict[int, object] = {}
    for name, spec in specs(type(record)):
        value = getattr(record, name)
        if value is not None:
            out[spec.key] = value if spec.kind in _PLAIN_KINDS else _wire_value(spec, value)
    return out


def _dumps(obj: object) -> bytes:
    # The maps are in ascending key order already (module docstring): no sort needed.
    return cbor2.dumps(obj)


def encode_record(record: Record) -> bytes:
    """Encode a header-less record (such as a sealed :class:`KeyBundle` plaintext)."""
    return _dumps(_body_map(record))


def encode(message: Message) -> bytes:
    """Encode ``message`` to deterministic CBOR bytes."""
    # Built in ascending key order (HeaderKey values), as _dumps requires.
    top: dict[int, object] = {
        _VERSION: PROTOCOL_VERSION,
        _TYPE: int(message.TYPE),
        _TXID: message.txid,
        _SOURCE: message.src,
        _DESTINATION: message.dst,
    }
    if message.pn_id is not None:
        top[_PN_ID] = message.pn_id
    top[_BODY] = _body_map(message)
    if message.flow is not None:
        top[_FLOW] = message.flow
    return _dumps(top)


_VERSION, _TYPE, _TXID, _SOURCE, _DESTINATION, _PN_ID, _BODY, _FLOW = (
    int(HeaderKey.VERSION),
    int(HeaderKey.TYPE),
    int(HeaderKey.TXID),
    int(HeaderKey.SOURCE),
    int(HeaderKey.DESTINATION),
    int(HeaderKey.PN_ID),
    int(HeaderKey.BODY),
    int(HeaderKey.FLOW),
)
assert _VERSION < _TYPE < _TXID < _SOURCE < _DESTINATION < _PN_ID < _BODY < _FLOW


def encode_without_flow(message: Message, data: bytes | None = None) -> bytes:
    """``encode(message)`` without its flow ID (header key 7), which is no security input:
    the server tells a retry from a reused transaction ID by these bytes.

    ``data``: the bytes ``message`` was decoded from, which :func:`decode` checked are
    ``encode(message)``; the flow entry, the top map's last (key 7, an 8-byte string), is
    then cut from them rather than the message encoded again (a 32-PNE message costs a
    tenth of a millisecond to encode).
    """
    if message.flow is None:
        return data if data is not None else encode(message)
    if (
        data is not None
        and 0xA7 <= data[0] <= 0xA8  # a map of 7 or 8 entries: one byte of head
        and data[-10:-8] == b"\x07\x48"  # key 7, a byte string of 8
        and data[-8:] == message.flow
    ):
        return bytes([data[0] - 1]) + data[1:-10]
    return encode(dataclasses.replace(message, flow=None))


def _reject_tag(decoder: object, tag: object) -> object:
    raise DecodeError("CBOR tags are not allowed")


def _load(data: bytes) -> object:
    if type(data) is not bytes:
        raise DecodeError("input is not bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise DecodeError(f"message larger than {MAX_MESSAGE_SIZE} bytes")
    if not data:
        raise DecodeError("empty message")
    try:
        # Unknown tags reach _reject_tag. Builtin semantic tags (dates, bignums) decode to
        # Python objects that then fail the field type checks or the canonical re-encode.
        return cbor2.loads(
            data,
            tag_hook=_reject_tag,
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except Exception as exc:  # the CBOR library's failures, whatever their class
        if isinstance(exc.__cause__, DecodeError):  # our tag hook's refusal, wrapped by cbor2
            raise DecodeError(exc.__cause__.reason) from None
        raise DecodeError(f"not well-formed CBOR ({type(exc).__name__})") from None


def _field_value(spec: FieldSpec, name: str, raw: object) -> object:
    """Convert a decoded CBOR value to the field's Python value, checking its type."""
    match spec.kind:
        case "enum":
            assert spec.enum is not None
            if type(raw) is not int:
                raise DecodeError(f"{name}: expected an integer")
            try:
                return spec.enum(raw)
            except ValueError:
                raise DecodeError(f"{name}: unknown value {_show(raw)}") from None
        case "bytes_list" | "id_list":
            if type(raw) is not list:
                raise DecodeError(f"{name}: expected an array")
            return tuple(raw)
        case "records":
            assert spec.record is not None
            if type(raw) is not list:
                raise DecodeError(f"{name}: expected an array")
            if len(raw) > spec.hi:
                raise DecodeError(f"{name}: more than {spec.hi} entries")
            record = spec.record
            return tuple(_build(record, _fields_from(record, item)) for item in raw)
        case _:
            return raw


def _fields_from(cls: type[Record], body: object) -> dict[str, Any]:
    if type(body) is not dict:
        raise DecodeError("body is not a map")
    known, keys = _plan(cls)
    if not keys.issuperset(body):
        extra = [k for k in body if k not in keys]
        raise DecodeError(f"unknown field key(s) {', '.join(_show(k) for k in extra[:4])}")
    out: dict[str, Any] = {}
    for name, spec in known:
        key = spec.key
        if key in body:
            raw = body[key]
            # The plain kinds' values are taken as they are (their types are checked when
            # the record is built), as _field_value would.
            out[name] = raw if spec.kind in _PLAIN_KINDS else _field_value(spec, name, raw)
    return out


def _plan(cls: type[Record]) -> tuple[tuple[tuple[str, FieldSpec], ...], frozenset[int]]:
    """A record class's (name, spec) pairs and the set of its field keys (cached)."""
    plan = _PLANS.get(cls)
    if plan is None:
        known = specs(cls)
        plan = _PLANS[cls] = (known, frozenset(spec.key for _, spec in known))
    return plan


_PLANS: dict[type[Record], tuple[tuple[tuple[str, FieldSpec], ...], frozenset[int]]] = {}


def _build[R: Record](cls: type[R], kwargs: Mapping[str, Any]) -> R:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise DecodeError(_bounded(exc)) from None


def _check_canonical(data: bytes, value: Record | Message, *, is_message: bool) -> None:
    again = encode(value) if is_message else encode_record(value)  # type: ignore[arg-type]
    if again != data:
        raise DecodeError("not deterministic CBOR, or trailing bytes")


def decode(data: bytes) -> Message:
    """Decode one CBOR message; raise :class:`DecodeError` for anything else.

    Nothing else escapes, whatever the input, and the error's reason is at most
    :data:`MAX_REASON_LEN` characters.
    """
    return _guarded(lambda: _decode(data))


def _decode(data: bytes) -> Message:
    top = _load(data)
    if type(top) is not dict:
        raise DecodeError("message is not a map")
    if any(type(k) is not int for k in top):
        raise DecodeError("header keys are integers")
    allowed = {int(k) for k in HeaderKey}
    if not set(top) <= allowed:
        raise DecodeError("unknown header key")
    version = top.get(HeaderKey.VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise DecodeError(
            f"unsupported version {_show(version)}", code=ErrorCode.UNSUPPORTED_VERSION
        )
    raw_type = top.get(HeaderKey.TYPE)
    if type(raw_type) is not int:
        raise DecodeError("message type missing")
    try:
        cls = MESSAGE_CLASSES[MessageType(raw_type)]
    except (ValueError, KeyError):
        raise DecodeError(f"unknown message type {_show(raw_type)}") from None
    if HeaderKey.BODY not in top:
        raise DecodeError("body missing")
    kwargs = _fields_from(cls, top[HeaderKey.BODY])
    kwargs["txid"] = top.get(HeaderKey.TXID)
    kwargs["src"] = top.get(HeaderKey.SOURCE)
    kwargs["dst"] = top.get(HeaderKey.DESTINATION)
    if HeaderKey.PN_ID in top:
        kwargs["pn_id"] = top[HeaderKey.PN_ID]
        if kwargs["pn_id"] is None:
            raise DecodeError("pn_id: null is not allowed")
    if HeaderKey.FLOW in top:
        kwargs["flow"] = top[HeaderKey.FLOW]
        if kwargs["flow"] is None:
            raise DecodeError("flow: null is not allowed")
    message = _build(cls, kwargs)
    _check_canonical(data, message, is_message=True)
    return message


def peek_header(data: bytes) -> tuple[bytes | None, str | None]:
    """Best effort, for the reply to a message :func:`decode` refused: its txid and source.

    Returns ``(txid, src)``, each None unless the bytes are CBOR whose top level is a
    map holding a well-formed value under that header key (a 16-byte txid, a valid
    Entity ID). Never raises; reads no more than :func:`decode` would.
    """
    try:
        top = _load(data)
    except Exception:
        return None, None
    if type(top) is not dict:
        return None, None
    txid, src = top.get(int(HeaderKey.TXID)), top.get(int(HeaderKey.SOURCE))
    ok_txid = txid if type(txid) is bytes and len(txid) == TXID_LEN else None
    ok_src = src if type(src) is str and ID_PATTERN.fullmatch(src) else None
    return ok_txid, ok_src


def decode_record[R: Record](cls: type[R], data: bytes) -> R:
    """Decode a header-less record of class ``cls``; strict as :func:`decode` (and, like
    it, raises nothing but a bounded :class:`DecodeError`)."""

    def run() -> R:
        record = _build(cls, _fields_from(cls, _load(data)))
        _check_canonical(data, record, is_message=False)
        return record

    return _guarded(run)


def _json_value(spec: FieldSpec, value: object, reveal: bool) -> object:
    if spec.secret and not reveal:
        return "<redacted>"
    if isinstance(value, IntEnum):
        return value.name
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_json_item(v, reveal) for v in value]
    return value


def _json_item(value: object, reveal: bool) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Record):
        return record_json(value, reveal_secrets=reveal)
    return value


def record_json(record: Record, *, reveal_secrets: bool = False) -> dict[str, object]:
    """The human view of a header-less record's fields (absent optional fields omitted)."""
    out: dict[str, object] = {}
    for name, spec in specs(type(record)):
        value = getattr(record, name)
        if value is not None:
            out[name] = _json_value(spec, value, reveal_secrets)
    return out


def to_json(message: Message, *, reveal_secrets: bool = False) -> dict[str, object]:
    """The human view of a message (CLI, logs, traces); secrets redacted by default."""
    out: dict[str, object] = {
        "type": message.TYPE.name,
        "txid": message.txid.hex(),
        "src": message.src,
        "dst": message.dst,
    }
    if message.pn_id is not None:
        out["pn_id"] = message.pn_id
    if message.flow is not None:
        out["flow"] = message.flow.hex()
    for name, spec in specs(type(message)):
        value = getattr(message, name)
        if value is not None:
            out[name] = _json_value(spec, value, reveal_secrets)
    return out
