"""Fuzz targets: one per decoder that reads a peer's (or a file's) bytes (issue 5 item 17).

Each :class:`Target` names the decoder, the one error type it may raise, a seed corpus of
valid inputs and, where an encoder exists, the re-encoding check: an accepted input must
re-encode byte for byte (CBOR messages, records, frames) or, for text formats whose
encoders choose one spelling of many (Digest headers, CSV), parse back to the same value.

A target's ``run(data)`` returns True when the input was accepted, False when it was
refused with the allowed error, and raises :class:`PropertyViolation` when the decoder
accepted something that does not round-trip. Any other exception is a finding.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cpns.errors import AuthenticationFailed, DecodeError, StoreError
from cpns.messages.codec import decode, decode_record, encode, encode_record
from cpns.messages.constants import FLOW_LEN
from cpns.messages.model import KeyBundle
from cpns.protocol.digest import (
    MAX_HEADER_LEN,
    DigestClient,
    DigestServer,
    format_auth_params,
    format_digest,
    parse_auth_params,
    parse_challenges,
    parse_digest,
)
from cpns.server.admin import TKImportError, parse_tk_csv
from cpns.store.keystore import LocalKeyStore
from cpns.transport.framing import HEADER_LEN, FrameDecoder, encode_frame

__all__ = ["TARGETS", "PropertyViolation", "Target"]

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "protocol_v1.json"


class PropertyViolation(AssertionError):
    """An accepted input that does not re-encode (or re-parse) to itself."""


@dataclass(frozen=True, slots=True)
class Target:
    """One decoder under fuzzing."""

    #: Short name used on the command line and in reports.
    name: str
    #: Decode one input; True if accepted, False if refused with ``allowed``.
    run: Callable[[bytes], bool]
    #: The decoder's own error type(s): the only exceptions it may raise.
    allowed: tuple[type[BaseException], ...]
    #: Valid inputs to start mutating from.
    seeds: Callable[[], list[bytes]]
    #: Whether inputs are CBOR (the engine then also mutates their structure).
    cbor: bool = False
    #: Extra words the text mutator splices in.
    dictionary: tuple[bytes, ...] = field(default=())


def _vectors() -> dict[str, object]:
    loaded: dict[str, object] = json.loads(VECTORS.read_text(encoding="ascii"))
    return loaded


def _message_seeds() -> list[bytes]:
    messages = _vectors()["messages"]
    assert isinstance(messages, list)
    return [bytes.fromhex(m["cbor"]) for m in messages]


# -- messages -------------------------------------------------------------------------------


def _run_message(data: bytes) -> bool:
    try:
        message = decode(data)
    except DecodeError:
        return False
    if encode(message) != data:
        raise PropertyViolation("accepted message does not re-encode byte for byte")
    if message.flow is not None and len(message.flow) != FLOW_LEN:
        raise PropertyViolation("accepted a flow ID that is not 8 bytes")
    return True


def _establishment_seeds() -> list[bytes]:
    """The PN Establishment and LocalEUKey messages (types 40..52): nested records."""
    messages = _vectors()["messages"]
    assert isinstance(messages, list)
    return [bytes.fromhex(m["cbor"]) for m in messages if 40 <= m["type"] <= 52]


#: CBOR heads the nested-record mutations need: arrays of 0, 63, 64 and 65 entries, an
#: empty map, a map of 9 entries, a nested array (one level too deep), null.
_ESTABLISHMENT_WORDS = (
    b"\x80",
    b"\x98\x3f",
    b"\x98\x40",
    b"\x98\x41",
    b"\xa0",
    b"\xa9",
    b"\x81\x81\x01",
    b"\xf6",
)


# -- records (sealed plaintexts) --------------------------------------------------------------


def _run_key_bundle(data: bytes) -> bool:
    try:
        record = decode_record(KeyBundle, data)
    except DecodeError:
        return False
    if encode_record(record) != data:
        raise PropertyViolation("accepted KeyBundle does not re-encode byte for byte")
    return True


def _bundle_seeds() -> list[bytes]:
    assignment = _vectors()["assignment_003"]
    assert isinstance(assignment, dict)
    return [bytes.fromhex(assignment["key_bundle"]["cbor"])]


class _KeyStoreFile:
    """A PN GW / PNE key-store file (sealed CBOR map) whose plaintext is the fuzz input.

    The input is sealed under the store's key exactly as :meth:`LocalKeyStore.save` would,
    so the fuzzer reaches the CBOR decoding behind the seal; ``load`` may raise only
    :class:`StoreError`.
    """

    def __init__(self) -> None:
        # A RAM-backed directory where there is one: the target writes a file per input.
        shm = Path("/dev/shm")
        where = str(shm) if shm.is_dir() else None
        self._dir = Path(tempfile.mkdtemp(prefix="cpns-fuzz-ks-", dir=where))
        atexit.register(shutil.rmtree, self._dir, True)
        self._store = LocalKeyStore(self._dir / "fuzz.store", b"\x07" * 32)

    def run(self, data: bytes) -> bool:
        from cpns.crypto.keywrap import seal
        from cpns.store import keystore

        blob = seal(
            b"\x07" * 32,
            data,
            purpose=keystore._PURPOSE,
            context=(self._store.path.name,),
            nonce=b"\x00" * 12,
        )
        self._store.path.write_bytes(keystore._MAGIC + blob)
        try:
            self._store.load()
        except StoreError:
            return False
        return True


def _keystore_seeds() -> list[bytes]:
    import cbor2

    pne = {
        "tk": b"\x01" * 32,
        "eukeys": [b"\x02" * 32, b"\x03" * 32],
        "key_index": 1,
        "epoch": 1,
        "txid": b"\x04" * 16,
        "stage": "delivered",
    }
    return [
        cbor2.dumps({"entity_id": "gw-alice", "eukey": b"\x05" * 32}, canonical=True),
        cbor2.dumps(pne, canonical=True),
        cbor2.dumps({"pnes": {"pne-0001": pne}, "nested": [[1, None, True]]}, canonical=True),
    ]


class _JournalFile:
    """A PN GW key-store journal: the fuzz input is the plaintext of one frame, sealed as
    :meth:`LocalKeyStore.commit_records` would seal it, followed by the raw input again as
    a second frame's bytes (its framing, a torn or a damaged tail). ``load_records`` may
    raise only :class:`StoreError`.
    """

    def __init__(self) -> None:
        shm = Path("/dev/shm")
        where = str(shm) if shm.is_dir() else None
        self._dir = Path(tempfile.mkdtemp(prefix="cpns-fuzz-kj-", dir=where))
        atexit.register(shutil.rmtree, self._dir, True)
        self._store = LocalKeyStore(self._dir / "fuzz.store", b"\x07" * 32)
        self._path = self._dir / "fuzz.journal-00000001"

    def run(self, data: bytes) -> bool:
        from cpns.crypto.keywrap import seal
        from cpns.store import keystore

        blob = seal(
            b"\x07" * 32,
            data,
            purpose=keystore._JOURNAL_PURPOSE,
            context=(self._path.name, 0),
            nonce=b"\x00" * 12,
        )
        self._path.write_bytes(
            keystore._JOURNAL_MAGIC + keystore._FRAME_HEADER.pack(len(blob)) + blob + data
        )
        try:
            self._store.load_records()
        except StoreError:
            return False
        return True


def _journal_seeds() -> list[bytes]:
    import cbor2

    record = {"set": {"tk": b"\x01" * 32, "eukeys": [b"\x02" * 32], "key_index": 1}}
    return [
        cbor2.dumps({"pne-1": record}),
        cbor2.dumps({"pne-1": None, "pne-2": {"last_status": "OK"}}),
        cbor2.dumps({}),
    ]


def _journal_target() -> Target:
    journal = _JournalFile()
    return Target(
        "keystore-journal", journal.run, (StoreError,), _journal_seeds, cbor=True, dictionary=()
    )


# -- PAN frames -----------------------------------------------------------------------------


def _run_frames(data: bytes) -> bool:
    """Feed ``data`` in chunks whose sizes come from the data itself (deterministic)."""
    decoder = FrameDecoder()
    frames: list[bytes] = []
    step = 1 + (data[0] % 7 if data else 0)
    try:
        for start in range(0, len(data), step):
            frames += decoder.feed(data[start : start + step])
    except DecodeError:
        return False
    joined = b"".join(encode_frame(f) for f in frames)
    # What is left is buffered, plus the header of a frame still being read.
    rest = len(data) - len(joined) - decoder.buffered
    if not data.startswith(joined) or rest not in (0, HEADER_LEN):
        raise PropertyViolation("frames do not re-encode to the bytes they came from")
    return bool(frames)


def _frame_seeds() -> list[bytes]:
    messages = _message_seeds()
    return [encode_frame(m) for m in messages] + [b"".join(encode_frame(m) for m in messages)]


# -- Digest headers ---------------------------------------------------------------------------

_DIGEST = DigestServer(realm="cpns", nonce_key=b"\x30" * 32)
_CHALLENGE = 'Digest realm="cpns", qop="auth", algorithm=SHA-256, nonce="n"'


class _FixedRandom:
    """The client's cnonce source: the same 16 bytes each time (determinism)."""

    def token_bytes(self, n: int) -> bytes:
        return b"\x32" * n


_FIXED_RNG = _FixedRandom()


def _run_digest(data: bytes) -> bool:
    """Every Digest header parser on one value (as the HTTP layer decodes it: latin-1)."""
    text = data.decode("latin-1")
    accepted = False
    try:
        params = parse_digest(text)
    except AuthenticationFailed:
        pass
    else:
        accepted = True
        again = format_digest(params)
        if len(again) <= MAX_HEADER_LEN and parse_digest(again) != params:
            raise PropertyViolation("Digest credentials do not re-parse to themselves")
    try:
        info = parse_auth_params(text)
    except AuthenticationFailed:
        pass
    else:
        accepted = True
        again = format_auth_params(info)
        if len(again) <= MAX_HEADER_LEN and parse_auth_params(again) != info:
            raise PropertyViolation("auth-params do not re-parse to themselves")
    try:
        challenges = parse_challenges(text)
    except AuthenticationFailed:
        pass
    else:
        accepted = True
        if not challenges:
            raise PropertyViolation("parse_challenges accepted a value with no challenge")
    # The PN GW's side: a WWW-Authenticate from the server, then an Authentication-Info.
    client = DigestClient("gw-alice", "13" * 32)
    try:
        client.authorization(challenges=[text], method="POST", uri="/x", rng=_FIXED_RNG)
    except AuthenticationFailed:
        client.authorization(challenges=[_CHALLENGE], method="POST", uri="/x", rng=_FIXED_RNG)
    else:
        accepted = True
    try:
        client.verify_response(text)
    except AuthenticationFailed:
        pass
    else:
        raise PropertyViolation("a fuzzed Authentication-Info passed the rspauth check")
    try:
        _DIGEST.verify(
            method="POST",
            uri="/cpns/v1/messages",
            authorization=text,
            # Not the vectors' key: the seed Authorization parses fully but cannot verify.
            lookup={"gw-alice": "00" * 32}.get,
            now=1_700_000_001,
        )
    except AuthenticationFailed:
        pass
    else:
        raise PropertyViolation("a fuzzed Authorization verified")
    return accepted


def _digest_seeds() -> list[bytes]:
    digest = _vectors()["digest"]
    assert isinstance(digest, dict)
    exchange = digest["exchange"]
    return [
        exchange["www_authenticate"].encode(),
        exchange["authorization"].encode(),
        exchange["authentication_info"].encode(),
        b'Basic dXNlcjpwYXNz, Digest realm="x", nonce="y", qop="auth,auth-int"',
        b'Digest username="a\\"b", realm=cpns, nc=00000001, uri="/x?y=1"',
    ]


_DIGEST_WORDS = (
    b"Digest ",
    b'"',
    b"\\",
    b",",
    b"=",
    b" ",
    b"\t",
    b"username=",
    b"nonce=",
    b"nc=00000001",
    b"qop=auth",
    b"algorithm=SHA-256",
    b"algorithm=MD5",
    b"response=",
    b"userhash=true",
    b"username*=",
    b"stale=true",
    b"\xff",
    b"\x00",
    b"==",
)


# -- TK CSV import ----------------------------------------------------------------------------


def _run_csv(data: bytes) -> bool:
    """The TK import parser, on the text import_tk_csv would read (UTF-8, BOM allowed)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False  # import_tk_csv refuses it with ConfigurationError before parsing
    try:
        rows = list(parse_tk_csv(text, source="fuzz.csv"))
    except TKImportError:
        return False
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["entity_id", "tk"])
    writer.writerows([r.record.entity_id, r.record.tk.hex()] for r in rows)
    again = list(parse_tk_csv(out.getvalue(), source="fuzz.csv"))
    if [(r.record.entity_id, r.record.tk) for r in again] != [
        (r.record.entity_id, r.record.tk) for r in rows
    ]:
        raise PropertyViolation("imported TK records do not re-parse to themselves")
    return True


def _csv_seeds() -> list[bytes]:
    return [
        b"entity_id,tk\npne-0001," + b"00" * 32 + b"\npne-0002," + b"ab" * 16 + b"\n",
        b"\xef\xbb\xbfEntity_ID , TK,extra\r\n\r\npne-3, " + b"0F" * 64 + b" ,x\r\n",
        b'entity_id,tk\n"pne-4","' + b"11" * 20 + b'"\n',
    ]


_CSV_WORDS = (b",", b'"', b"\n", b"\r\n", b"\r", b"\x00", b"\xef\xbb\xbf", b" ", b"pne-", b"ff")


def _keystore_target() -> Target:
    store = _KeyStoreFile()
    return Target("keystore", store.run, (StoreError,), _keystore_seeds, cbor=True, dictionary=())


TARGETS: dict[str, Callable[[], Target]] = {
    "messages": lambda: Target(
        "messages",
        _run_message,
        (DecodeError,),
        _message_seeds,
        True,
        # Header key 7 (flow ID) with a 7-, 8- and 9-byte string head: the size edges.
        dictionary=(b"\x07\x47", b"\x07\x48", b"\x07\x49"),
    ),
    "pn-establishment": lambda: Target(
        "pn-establishment",
        _run_message,
        (DecodeError,),
        _establishment_seeds,
        True,
        dictionary=_ESTABLISHMENT_WORDS,
    ),
    "key-bundle": lambda: Target(
        "key-bundle", _run_key_bundle, (DecodeError,), _bundle_seeds, True
    ),
    "keystore": _keystore_target,
    "keystore-journal": _journal_target,
    "frames": lambda: Target("frames", _run_frames, (DecodeError,), _frame_seeds),
    "digest": lambda: Target(
        "digest", _run_digest, (AuthenticationFailed,), _digest_seeds, dictionary=_DIGEST_WORDS
    ),
    "tk-csv": lambda: Target(
        "tk-csv", _run_csv, (TKImportError,), _csv_seeds, dictionary=_CSV_WORDS
    ),
}
