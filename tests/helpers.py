"""Shared test doubles: a seeded RNG, an in-memory directory of server facts, and the
``Exchange`` driver that moves messages between state machines (after h11's
``ConnectionPair`` and aioquic's ``client_and_server``/``roundtrip``).

Nothing here reads the real clock or the OS RNG: every test is reproducible.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

from cpns.crypto.kdf import password_key
from cpns.messages.codec import decode, encode
from cpns.messages.constants import FLOW_LEN, ID_PATTERN, TXID_LEN
from cpns.messages.model import MESSAGE_CLASSES, FieldSpec, Message, Record, specs
from cpns.protocol._machine import Event, Machine, NonceConsumed, ProcedureFailed
from cpns.protocol.key_assignment import (
    EUKeyChainAssigned,
    ServerLookups,
    claim_code,
    claim_key,
)
from cpns.protocol.user_key_assignment import EUKeyAssigned
from cpns.records import EntityRecord, TKRecord, UserRecord
from cpns.types import EntityKind

__all__ = [
    "ANY_MESSAGE",
    "FIXED_NOW",
    "IDS",
    "GATEWAY_KEYS",
    "PASSWORDS",
    "REALM",
    "SERVER_ID",
    "TKS",
    "WRONG_CLAIM_CODE",
    "Directory",
    "Exchange",
    "FailedWith",
    "FixedRandom",
    "field_strategy",
    "cached_password_key",
    "claim_key_for",
    "ref_claim_code",
    "ref_claim_proof",
    "ref_encode",
    "ref_hkdf",
    "ref_parts",
    "ref_seal_ad",
    "ref_seal_key",
    "record_strategy",
    "standard_directory",
]

#: Wall-clock seconds used as "now" by every protocol test (2023-11-14T22:13:20Z).
FIXED_NOW = 1_700_000_000
#: The Digest realm that salts password keys in the tests (the server default).
REALM = "cpns"
#: Entity ID of the CPNS Server in the tests (the AssignmentPolicy default).
SERVER_ID = "cpns-server"


class FixedRandom:
    """A deterministic :class:`cpns.types.Random`: ``random.Random(seed).randbytes``.

    Two instances built with the same seed return the same byte stream, so a test can
    build a twin to predict what a machine will draw (RANDSVR, nonces, EUKeys).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._random = random.Random(seed)  # determinism, not secrecy
        #: Every draw so far, in order (a test can check what a machine consumed).
        self.draws: list[bytes] = []

    def token_bytes(self, n: int) -> bytes:
        """Return the next ``n`` bytes of the seeded stream."""
        out = self._random.randbytes(n)
        self.draws.append(out)
        return out


@dataclass
class Directory:
    """In-memory server facts behind a :class:`ServerLookups` (users, entities, TKs, nonces).

    Tests alter the dicts directly to set up a failure; :meth:`apply` persists the
    events a server machine returned, the way the service layer would.
    """

    users: dict[str, UserRecord] = field(default_factory=dict)
    entities: dict[str, EntityRecord] = field(default_factory=dict)
    tks: dict[str, TKRecord] = field(default_factory=dict)
    #: Used random values, with their expiry (``NonceConsumed.expires_at``).
    used_nonces: dict[bytes, int] = field(default_factory=dict)
    #: Failed password proofs still counted, by User ID (D-SRV-1).
    auth_failures: dict[str, int] = field(default_factory=dict)

    def lookups(self) -> ServerLookups:
        """Lookups reading the dicts live (later changes are seen)."""
        return ServerLookups(
            get_user=self.users.get,
            get_entity=self.entities.get,
            get_tk=self.tks.get,
            nonce_used=self.used_nonces.__contains__,
            auth_failures=lambda user_id: self.auth_failures.get(user_id, 0),
        )

    def add_user(self, user_id: str, password_key: bytes, **kw: Any) -> UserRecord:
        """Register a CPNS User."""
        record = UserRecord(user_id=user_id, password_key=password_key, created_at=0, **kw)
        self.users[user_id] = record
        return record

    def add_entity(self, entity_id: str, kind: EntityKind, owner: str, **kw: Any) -> EntityRecord:
        """Register a CPNS Entity."""
        record = EntityRecord(entity_id=entity_id, kind=kind, owner=owner, **kw)
        self.entities[entity_id] = record
        return record

    def add_tk(self, entity_id: str, tk: bytes) -> TKRecord:
        """Import a manufacturer Temporary Key."""
        record = TKRecord(entity_id=entity_id, tk=tk, source="test")
        self.tks[entity_id] = record
        return record

    def update_entity(self, entity_id: str, **changes: Any) -> EntityRecord:
        """Replace fields of a stored entity."""
        record = replace(self.entities[entity_id], **changes)
        self.entities[entity_id] = record
        return record

    def apply(self, events: Iterable[Event], *, now: int = FIXED_NOW) -> None:
        """Persist the facts a server machine reported."""
        for event in events:
            if isinstance(event, NonceConsumed):
                self.used_nonces[event.nonce] = event.expires_at
            elif isinstance(event, EUKeyChainAssigned):
                self.entities[event.pne_id] = EntityRecord(
                    entity_id=event.pne_id,
                    kind=EntityKind.PNE,
                    owner=event.user_id,
                    eukeys=event.eukeys,
                    key_index=1,
                    assigned_via=event.gateway_id,
                    assigned_at=now,
                    epoch=event.epoch,
                )
            elif isinstance(event, EUKeyAssigned):
                self.entities[event.entity_id] = EntityRecord(
                    entity_id=event.entity_id,
                    kind=event.kind,
                    owner=event.user_id,
                    eukeys=(event.eukey,),
                    key_index=1,
                    assigned_at=now,
                    epoch=event.expected_epoch + 1,
                )


#: Alters a message in transit: return a replacement, or None to drop it.
type Tamper = Callable[[Message], Message | None]


class Exchange:
    """Shuttle outboxes between machines, addressed by Entity ID, until all are quiet.

    ``parties`` maps each party's Entity ID to its machine; a message goes to the machine
    named by its ``dst``. With ``wire=True`` (the default) every message is encoded and
    decoded on the way, so the real codec sits on every link. ``tamper`` may alter or
    drop messages in transit. :meth:`run` returns every event as ``(party, event)`` in
    the order they happened; :attr:`transcript` keeps ``(sender, message)`` as sent.
    """

    def __init__(
        self,
        parties: Mapping[str, Machine[Any]],
        *,
        wire: bool = True,
        tamper: Tamper | None = None,
    ) -> None:
        self.parties = dict(parties)
        self.wire = wire
        self.tamper = tamper
        self.transcript: list[tuple[str, Message]] = []
        #: Messages addressed to nobody in ``parties`` (left for the test to inspect).
        self.undelivered: list[Message] = []

    def run(self, *, max_rounds: int = 20) -> list[tuple[str, Event]]:
        """Deliver messages until no outbox has any; return the events."""
        events: list[tuple[str, Event]] = []
        for _ in range(max_rounds):
            moved = False
            for name, machine in self.parties.items():
                for message in machine.messages_to_send():
                    moved = True
                    self.transcript.append((name, message))
                    events.extend(self.deliver(message))
            if not moved:
                return events
        raise AssertionError("the exchange did not settle")  # pragma: no cover

    def deliver(self, message: Message) -> list[tuple[str, Event]]:
        """Hand one message to its addressee (through the codec and ``tamper``)."""
        if self.tamper is not None:
            altered = self.tamper(message)
            if altered is None:
                return []
            message = altered
        if self.wire:
            message = decode(encode(message))
        target = self.parties.get(message.dst)
        if target is None:
            self.undelivered.append(message)
            return []
        return [(message.dst, event) for event in target.receive(message)]

    def states(self) -> dict[str, str]:
        """Each party's state name (for one-line assertions)."""
        return {name: machine.state.name for name, machine in self.parties.items()}


# -- the standard world of the protocol tests ------------------------------------------------

#: Passwords of the test users.
PASSWORDS: Mapping[str, str] = {"alice": "correct horse battery", "bob": "bob's own password"}
#: EUKeys of the already-enrolled PN GWs.
GATEWAY_KEYS: Mapping[str, bytes] = {"gw-alice": bytes([0xA1]) * 32, "gw-bob": bytes([0xB0]) * 32}
#: Manufacturer Temporary Keys of the PNEs without UI.
TKS: Mapping[str, bytes] = {"pne-1": bytes(range(32)), "pne-2": bytes(range(100, 116))}
#: A well-formed claim code that proves no PNE (D-003-10).
WRONG_CLAIM_CODE = "AAAA-AAAA-AAAA-AAAA"


def claim_key_for(pne_id: str) -> bytes:
    """The claim key of a PNE's label code (its TK from :data:`TKS`; a code proving nothing
    for a PNE with no TK here)."""
    tk = TKS.get(pne_id)
    return claim_key(claim_code(tk, pne_id) if tk is not None else WRONG_CLAIM_CODE)


@functools.cache
def cached_password_key(user_id: str, password: str) -> bytes:
    """The scrypt password key (about 50 ms), computed once per (user, password) per run."""
    return password_key(password, realm=REALM, user_id=user_id)


def standard_directory(password_key: Callable[[str, str], bytes]) -> Directory:
    """alice (gw-alice) and bob (gw-bob), each with an enrolled PN GW; TKs of pne-1, pne-2."""
    directory = Directory()
    for user_id, password in PASSWORDS.items():
        directory.add_user(user_id, password_key(user_id, password))
    for gateway_id, key in GATEWAY_KEYS.items():
        owner = gateway_id.removeprefix("gw-")
        directory.add_entity(gateway_id, EntityKind.PN_GW, owner, eukeys=(key,), key_index=1)
    for pne_id, tk in TKS.items():
        directory.add_tk(pne_id, tk)
    return directory


# -- independent reference computations (docs/crypto.md written out by hand) --------------
#
# The crypto tests check cpns.crypto against these, not against itself: a change of the
# value encoding, a label or a derivation step in src/ cannot go unnoticed. They use
# hashlib, hmac and the raw AES-GCM primitive only.


def ref_encode(value: bytes | str | int) -> bytes:
    """One value as docs/crypto.md says: 4-byte big-endian length, then the value."""
    if isinstance(value, int):
        raw = value.to_bytes(8, "big")
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    else:
        raw = value
    return len(raw).to_bytes(4, "big") + raw


def ref_parts(label: str, *parts: bytes | str | int) -> bytes:
    """The labelled encoding: the label first, encoded like any value."""
    return b"".join(ref_encode(p) for p in (label, *parts))


def ref_claim_code(tk: bytes, pne_id: str) -> str:
    """D-003-10 written out: base32 of the first 10 bytes of HMAC(TK, label, PNE ID), in
    four dash-separated groups of four."""
    raw = hmac.new(tk, ref_parts("cpns/v1/003/claim-code", pne_id), hashlib.sha256).digest()
    text = base64.b32encode(raw[:10]).decode()
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


def ref_claim_proof(code: str, rand: bytes, time: int, user: str, pne: str, gateway: str) -> bytes:
    """D-003-10 written out: claim key = SHA-256(label, code without dashes), proof =
    HMAC(claim key, label, RANDPNGW, Time, User ID, PNE ID, PN GW ID)."""
    key = hashlib.sha256(ref_parts("cpns/v1/003/claim-key", code.replace("-", ""))).digest()
    msg = ref_parts("cpns/v1/003/claim-proof", rand, time, user, pne, gateway)
    return hmac.new(key, msg, hashlib.sha256).digest()


def ref_hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 written out from RFC 5869 §2.2-2.3 with hmac."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def ref_seal_key(secret: bytes, purpose: str) -> bytes:
    """The AES-256-GCM key of a sealed blob: HKDF(secret, info = label, purpose)."""
    return ref_hkdf(secret, salt=b"", info=ref_parts("cpns/v1/seal-key", purpose), length=32)


def ref_seal_ad(purpose: str, *context: bytes | str | int) -> bytes:
    """Associated data of a sealed blob: version byte, then the labelled context."""
    return b"\x01" + ref_parts("cpns/v1/seal/" + purpose, *context)


# -- Hypothesis strategies built from the message model's FieldSpec metadata ----------------


def field_strategy(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """Valid values of one field: anything its spec admits, edges included."""
    values: st.SearchStrategy[Any]
    match spec.kind:
        case "bytes":
            if spec.lo == spec.hi:
                values = st.binary(min_size=spec.lo, max_size=spec.hi)
            else:
                # Short values mostly; the longest legal value now and then. Repeating a
                # short pattern keeps Hypothesis' buffer small for 16 KiB fields.
                values = st.one_of(
                    st.binary(min_size=spec.lo, max_size=min(spec.hi, spec.lo + 48)),
                    st.binary(min_size=1, max_size=4).map(lambda s: (s * spec.hi)[: spec.hi]),
                )
        case "id":
            values = IDS
        case "int":
            values = st.one_of(st.integers(spec.lo, spec.hi), st.sampled_from([spec.lo, spec.hi]))
        case "enum":
            assert spec.enum is not None
            values = st.sampled_from(list(spec.enum))
        case "bool":
            values = st.booleans()
        case "bytes_list":
            values = st.one_of(
                st.lists(
                    st.binary(min_size=32, max_size=32), min_size=spec.lo, max_size=min(spec.hi, 6)
                ).map(tuple),
                st.binary(min_size=32, max_size=32).map(lambda k: (k,) * spec.hi),
            )
        case "id_list":
            values = st.one_of(
                st.lists(IDS, min_size=spec.lo, max_size=min(spec.hi, 4)).map(tuple),
                IDS.map(lambda i: (i,) * spec.hi),
            )
        case "records":
            assert spec.record is not None
            one = record_strategy(spec.record)
            # Mostly a few entries; the full count now and then (one record repeated, which
            # the codec accepts: duplicates are the procedure's business, not the codec's).
            values = st.one_of(
                st.lists(one, min_size=spec.lo, max_size=min(spec.hi, 4)).map(tuple),
                one.map(lambda r: (r,) * spec.hi),
            )
    if spec.optional:
        return st.one_of(st.none(), values)
    return values


#: Valid Entity, User and PN IDs (ID_PATTERN), up to the 128-character limit.
IDS: st.SearchStrategy[str] = st.from_regex(ID_PATTERN, fullmatch=True)


def record_strategy[R: Record](cls: type[R], **fixed: Any) -> st.SearchStrategy[R]:
    """Valid instances of ``cls``; ``fixed`` pins fields (a value or a strategy)."""
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    if issubclass(cls, Message):
        kwargs.update(
            txid=st.binary(min_size=TXID_LEN, max_size=TXID_LEN),
            src=IDS,
            dst=IDS,
            pn_id=IDS if cls.PN_ID_REQUIRED else st.one_of(st.none(), IDS),
            flow=st.one_of(st.none(), st.binary(min_size=FLOW_LEN, max_size=FLOW_LEN)),
        )
    for name, spec in specs(cls):
        kwargs[name] = field_strategy(spec)
    for name, value in fixed.items():
        kwargs[name] = value if isinstance(value, st.SearchStrategy) else st.just(value)
    return st.builds(cls, **kwargs)


#: Any valid message of any type.
ANY_MESSAGE: st.SearchStrategy[Message] = st.one_of(
    [record_strategy(cls) for cls in MESSAGE_CLASSES.values()]
)


class FailedWith:
    """Equal to a :class:`ProcedureFailed` with this code and hop and any non-empty reason.

    The reason is internal prose for logs; tests pin the wire code and the hop, which is
    what the peer and the audit trail rely on.
    """

    def __init__(self, code: int, hop: str) -> None:
        self.code, self.hop = code, hop

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is ProcedureFailed
            and other.code == self.code
            and type(other.code) is type(self.code)
            and other.hop == self.hop
            and isinstance(other.reason, str)
            and bool(other.reason)
        )

    def __hash__(self) -> int:  # pragma: no cover - matchers are not hashed
        return hash((self.code, self.hop))

    def __repr__(self) -> str:
        return f"FailedWith({self.code!r}, hop={self.hop!r})"
