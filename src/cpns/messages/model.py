"""The message model: one frozen dataclass per CPNS message (DESIGN §3).

Every message shares the header fields (transaction ID, source, destination, PN ID) and
adds typed body fields. Each field is declared with a :class:`FieldSpec` (wire key, kind,
bounds), and the constructor validates all of them, so an invalid message cannot exist:
a bad argument raises ``ValueError``, and the codec turns that into a ``DecodeError``.

Fields holding secrets or sealed values are declared ``secret=True``: they are left out of
``repr`` and redacted from the JSON view unless explicitly asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Final, Literal

from cpns.errors import ErrorCode
from cpns.messages.constants import (
    EST_ID_LEN,
    FLOW_LEN,
    ID_PATTERN,
    MAX_PNES_PER_ESTABLISHMENT,
    TXID_LEN,
    AuthFlow,
    MessageType,
)
from cpns.types import EntityKind

__all__ = [
    "MESSAGE_CLASSES",
    "NESTED_RECORDS",
    "AuthChallenge",
    "AuthProof",
    "AuthResult",
    "AuthenticateRequest",
    "AuthenticateResponse",
    "LocalAuthRequest",
    "LocalAuthResponse",
    "MemberStatus",
    "PNEAuthenticateRequest",
    "PNEAuthenticateResponse",
    "PNEstablishRequest",
    "PNEstablishResponse",
    "PNEstablishmentNotify",
    "PNInvite",
    "PNInviteResponse",
    "PNSetupRequest",
    "PNSetupResponse",
    "SetupEntry",
    "EUKeyAssignmentAck",
    "EUKeyAssignmentNotification",
    "EUKeyAssignmentRequest",
    "EUKeyAssignmentResponse",
    "ErrorMessage",
    "FieldSpec",
    "KeyBundle",
    "Message",
    "PNEHello",
    "Record",
    "UserKeyAssignmentRequest",
    "UserKeyAssignmentResponse",
]

type Kind = Literal["bytes", "id", "int", "enum", "bool", "bytes_list", "id_list", "records"]

_MAX_BYTES = 16 * 1024
#: A sealed KeyBundle of the longest chain the policy accepts (1024 EUKeys of 32 bytes,
#: 34 bytes each in CBOR, plus a TK of up to 64 bytes and the seal's 29 bytes) fits in
#: 35 KiB; the whole message stays under MAX_MESSAGE_SIZE (64 KiB).
_MAX_SEALED_BUNDLE = 35 * 1024
_MAX_INT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one field travels: its CBOR map key, kind and bounds."""

    key: int
    kind: Kind
    lo: int = 0
    hi: int = _MAX_BYTES
    enum: type[IntEnum] | None = None
    optional: bool = False
    secret: bool = False
    #: The nested record class of a ``records`` field.
    record: type[Record] | None = None

    def __post_init__(self) -> None:
        # The codec writes maps in ascending key order as deterministic CBOR, which holds
        # only for non-negative integer keys (cpns.messages.codec).
        if type(self.key) is not int or self.key < 0:
            raise TypeError(f"field keys are non-negative integers, not {self.key!r}")


def _f(spec: FieldSpec) -> Any:
    """Declare a dataclass field carrying ``spec``; optional fields default to None."""
    if spec.optional:
        return field(default=None, repr=not spec.secret, metadata={"spec": spec})
    return field(repr=not spec.secret, metadata={"spec": spec})


def f_bytes(
    key: int,
    *,
    size: int | None = None,
    lo: int = 1,
    hi: int = _MAX_BYTES,
    optional: bool = False,
    secret: bool = False,
) -> Any:
    """A byte string field, of exactly ``size`` bytes or ``lo..hi`` bytes."""
    if size is not None:
        lo = hi = size
    return _f(FieldSpec(key, "bytes", lo, hi, optional=optional, secret=secret))


def f_id(key: int, *, optional: bool = False) -> Any:
    """An Entity ID, User ID or PN ID (``ID_PATTERN``)."""
    return _f(FieldSpec(key, "id", optional=optional))


def f_int(key: int, *, lo: int = 0, hi: int = _MAX_INT, optional: bool = False) -> Any:
    """An integer in ``lo..hi``."""
    return _f(FieldSpec(key, "int", lo, hi, optional=optional))


def f_enum(key: int, enum: type[IntEnum], *, optional: bool = False) -> Any:
    """A wire enum; unknown values are refused."""
    return _f(FieldSpec(key, "enum", enum=enum, optional=optional))


def f_bool(key: int, *, optional: bool = False) -> Any:
    """A boolean."""
    return _f(FieldSpec(key, "bool", optional=optional))


def f_bytes_list(key: int, *, lo: int = 1, hi: int = 1024, secret: bool = False) -> Any:
    """A tuple of ``lo..hi`` byte strings of 32 bytes each (keys)."""
    return _f(FieldSpec(key, "bytes_list", lo, hi, secret=secret))


def f_id_list(key: int, *, lo: int = 0, hi: int = MAX_PNES_PER_ESTABLISHMENT - 1) -> Any:
    """A tuple of ``lo..hi`` Entity IDs."""
    return _f(FieldSpec(key, "id_list", lo, hi))


#: Kinds a record nested in a ``records`` field may use: scalars only, so a message stays
#: within the codec's nesting limit (top map, body map, array, record map).
_SCALAR_KINDS: Final = frozenset({"bytes", "id", "int", "enum", "bool"})


def f_records(
    key: int, record: type[Record], *, lo: int = 1, hi: int = MAX_PNES_PER_ESTABLISHMENT
) -> Any:
    """A tuple of ``lo..hi`` nested records of class ``record`` (scalar fields only)."""
    if any(spec.kind not in _SCALAR_KINDS for _, spec in specs(record)):
        raise TypeError(f"{record.__name__}: a nested record has scalar fields only")
    return _f(FieldSpec(key, "records", lo, hi, record=record))


def _check(spec: FieldSpec, name: str, value: object) -> None:
    """Raise ValueError unless ``value`` fits ``spec``."""
    if value is None:
        if not spec.optional:
            raise ValueError(f"{name} is required")
        return
    match spec.kind:
        case "bytes":
            if type(value) is not bytes or not spec.lo <= len(value) <= spec.hi:
                raise ValueError(f"{name}: expected {spec.lo}..{spec.hi} bytes")
        case "id":
            if type(value) is not str or ID_PATTERN.fullmatch(value) is None:
                raise ValueError(f"{name}: not a valid identifier")
        case "int":
            if type(value) is not int or not spec.lo <= value <= spec.hi:
                raise ValueError(f"{name}: expected an integer in {spec.lo}..{spec.hi}")
        case "enum":
            assert spec.enum is not None
            if not isinstance(value, spec.enum):
                raise ValueError(f"{name}: expected {spec.enum.__name__}")
        case "bool":
            if type(value) is not bool:
                raise ValueError(f"{name}: expected a boolean")
        case "bytes_list":
            if (
                type(value) is not tuple
                or not spec.lo <= len(value) <= spec.hi
                or any(type(v) is not bytes or len(v) != 32 for v in value)
            ):
                raise ValueError(f"{name}: expected {spec.lo}..{spec.hi} 32-byte values")
        case "id_list":
            if (
                type(value) is not tuple
                or not spec.lo <= len(value) <= spec.hi
                or any(type(v) is not str or ID_PATTERN.fullmatch(v) is None for v in value)
            ):
                raise ValueError(f"{name}: expected {spec.lo}..{spec.hi} identifiers")
        case "records":
            assert spec.record is not None
            if (
                type(value) is not tuple
                or not spec.lo <= len(value) <= spec.hi
                or any(type(v) is not spec.record for v in value)
            ):
                raise ValueError(
                    f"{name}: expected {spec.lo}..{spec.hi} {spec.record.__name__} records"
                )


def specs(cls: type[Record]) -> tuple[tuple[str, FieldSpec], ...]:
    """The (name, spec) pairs of a record class's body fields, in key order."""
    cached: tuple[tuple[str, FieldSpec], ...] | None = _SPEC_CACHE.get(cls)
    if cached is None:
        cached = tuple(
            sorted(
                (
                    (f.name, f.metadata["spec"])
                    for f in dataclasses.fields(cls)
                    if "spec" in f.metadata
                ),
                key=lambda item: item[1].key,
            )
        )
        _SPEC_CACHE[cls] = cached
    return cached


_SPEC_CACHE: dict[type[Record], tuple[tuple[str, FieldSpec], ...]] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A CBOR structure with declared fields. Messages are records with a header."""

    def __post_init__(self) -> None:
        for name, spec in specs(type(self)):
            _check(spec, name, getattr(self, name))

    def body(self) -> Mapping[str, object]:
        """The body field values by name (header excluded)."""
        return {name: getattr(self, name) for name, _ in specs(type(self))}


@dataclass(frozen=True, slots=True, kw_only=True)
class Message(Record):
    """Header shared by every CPNS message.

    ``src`` and ``dst`` are Entity IDs; 002 §5.3.2 chooses the protecting session from
    them. ``txid`` names the exchange: retries reuse it (DESIGN §5).
    """

    TYPE: ClassVar[MessageType]
    #: Whether the header's PN ID must be present (PN Establishment messages).
    PN_ID_REQUIRED: ClassVar[bool] = False

    #: Transaction ID: 16 random bytes chosen by the initiator, echoed in every reply.
    txid: bytes
    #: Source Entity ID.
    src: str
    #: Destination Entity ID.
    dst: str
    #: PN ID, where the procedure has one.
    pn_id: str | None = None
    #: Flow (correlation) ID: 8 random bytes chosen by the party that started the flow,
    #: echoed by every reply and carried by every message of the flow. For logs and
    #: traces only: no check, MAC or decision depends on it (docs/logging.md).
    flow: bytes | None = None

    def __post_init__(self) -> None:
        if type(self.txid) is not bytes or len(self.txid) != TXID_LEN:
            raise ValueError("txid: expected 16 bytes")
        if self.flow is not None and (type(self.flow) is not bytes or len(self.flow) != FLOW_LEN):
            raise ValueError(f"flow: expected {FLOW_LEN} bytes")
        for name in ("src", "dst"):
            value = getattr(self, name)
            if type(value) is not str or ID_PATTERN.fullmatch(value) is None:
                raise ValueError(f"{name}: not a valid identifier")
        if self.pn_id is not None and (
            type(self.pn_id) is not str or ID_PATTERN.fullmatch(self.pn_id) is None
        ):
            raise ValueError("pn_id: not a valid identifier")
        if self.PN_ID_REQUIRED and self.pn_id is None:
            raise ValueError("pn_id is required")
        Record.__post_init__(self)


# -- 004 §5.x.1: EUKey assignment for an entity with UI ---------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UserKeyAssignmentRequest(Message):
    """The entity proves its CPNS User's ID and password and asks for an EUKey.

    ``auth_data`` is ``HMAC(PasswordKey, label, rand, time, user, entity, kind)``.
    """

    TYPE: ClassVar[MessageType] = MessageType.USER_KEY_ASSIGNMENT_REQUEST

    #: CPNS User ID of the entity's owner.
    user_id: str = f_id(1)
    #: What the requesting entity is (a PN GW, or a PNE with UI).
    entity_kind: EntityKind = f_enum(2, EntityKind)
    #: Wall-clock seconds at the entity.
    time: int = f_int(3)
    #: 32 random bytes chosen by the entity.
    rand: bytes = f_bytes(4, size=32)
    #: Proof of the password (32 bytes).
    auth_data: bytes = f_bytes(5, size=32, secret=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class UserKeyAssignmentResponse(Message):
    """The server's verdict; on success the EUKey sealed under the password key."""

    TYPE: ClassVar[MessageType] = MessageType.USER_KEY_ASSIGNMENT_RESPONSE

    #: Outcome.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: 32 random bytes chosen by the server (present on success).
    rand_server: bytes | None = f_bytes(2, size=32, optional=True)
    #: The EUKey sealed under a key derived from PasswordKey and both rands.
    sealed_eukey: bytes | None = f_bytes(3, lo=1, hi=256, optional=True, secret=True)


# -- 003 §7.4.2.2: EUKey assignment for a PNE without UI ------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyAssignmentRequest(Message):
    """EUKey Assignment Request (003 §7.4.2.1.1.1 step 4).

    "The message SHALL contain the PNE Entity ID, CPNS User ID, Time and the user
    authentication data", plus RANDPNGW, which the server needs to recompute AuthData.
    """

    TYPE: ClassVar[MessageType] = MessageType.EUKEY_ASSIGNMENT_REQUEST

    #: PNE Entity ID.
    pne_id: str = f_id(1)
    #: CPNS User ID.
    user_id: str = f_id(2)
    #: Time (wall-clock seconds at the PN GW).
    time: int = f_int(3)
    #: RANDPNGW, 32 random bytes.
    rand_pngw: bytes = f_bytes(4, size=32)
    #: Hash(AuthData), instantiated as an HMAC keyed by Hash(Password) (DESIGN §4).
    auth_data: bytes = f_bytes(5, size=32, secret=True)
    #: Proof that the user holds the PNE's label claim code: HMAC keyed by the claim key
    #: over the request's identities and RANDPNGW (ours: deviations D-003-10).
    claim_proof: bytes = f_bytes(6, size=32, secret=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyAssignmentResponse(Message):
    """EUKey Assignment Response (003 §7.4.2.1.1.2 step 7).

    "The message SHALL contain the Status, EUKey sets and Temporary Key": the set and the
    TK travel as a :class:`KeyBundle` sealed under the PN GW's own EUKey.
    """

    TYPE: ClassVar[MessageType] = MessageType.EUKEY_ASSIGNMENT_RESPONSE

    #: Status.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: PNE Entity ID the response is about.
    pne_id: str = f_id(2)
    #: The sealed :class:`KeyBundle` (present on success).
    sealed_bundle: bytes | None = f_bytes(3, hi=_MAX_SEALED_BUNDLE, optional=True, secret=True)


#: Largest TK ratchet step on the wire (000: the step travels in the messages).
_MAX_TK_STEP: Final = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyBundle(Record):
    """Plaintext of ``EUKeyAssignmentResponse.sealed_bundle``: [EUKeyPNE] and TKPNE."""

    #: The PNE's Temporary Key as imported from the manufacturer.
    tk: bytes = f_bytes(1, lo=16, hi=64, secret=True)
    #: [EUKey_1, ..., EUKey_n].
    eukeys: tuple[bytes, ...] = f_bytes_list(2, secret=True)
    #: The PNE's assignment epoch: 1 for its first assignment, +1 for each later one, so a
    #: PNE can tell a superseded Notification from a newer one (deviations D-003-11).
    epoch: int = f_int(3, lo=1, hi=2**32 - 1)
    #: The TK ratchet step t of :attr:`tk` (the server's TK_t, 000): a re-assignment after
    #: TK-based authentications carries the ratcheted TK; absent (old servers) means 0.
    tk_step: int | None = f_int(4, lo=0, hi=_MAX_TK_STEP, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyAssignmentNotification(Message):
    """EUKey Assignment Notification (003 §7.4.2.1.1.3 step 3).

    "The message SHALL contain the EUKey that is encrypted with the Temporary Key."
    """

    TYPE: ClassVar[MessageType] = MessageType.EUKEY_ASSIGNMENT_NOTIFICATION

    #: Status; the PNE acts only on OK.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: Position of the delivered EUKey in the chain (1 = EUKey_1).
    key_index: int = f_int(2, lo=1, hi=1024)
    #: E_TK(EUKey): the EUKey sealed under the TK (present on OK).
    sealed_eukey: bytes | None = f_bytes(3, lo=1, hi=256, optional=True, secret=True)
    #: The assignment epoch chosen by the server (present on OK; bound into the seal).
    epoch: int | None = f_int(4, lo=1, hi=2**32 - 1, optional=True)
    #: The TK step t whose TK_t seals the EUKey (bound into the seal); absent means 0. The
    #: PNE computes TK_t forward from its own TK (a re-assignment after 000 ratchets).
    tk_step: int | None = f_int(5, lo=0, hi=_MAX_TK_STEP, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyAssignmentAck(Message):
    """The PNE proves it stored the EUKey (ours: lets the PN GW stop re-sending)."""

    TYPE: ClassVar[MessageType] = MessageType.EUKEY_ASSIGNMENT_ACK

    #: Status (OK, or why the PNE refused the notification).
    status: ErrorCode = f_enum(1, ErrorCode)
    #: Position of the stored EUKey.
    key_index: int = f_int(2, lo=1, hi=1024)
    #: HMAC keyed by the EUKey over the exchange (present on OK).
    proof: bytes | None = f_bytes(3, size=32, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEHello(Message):
    """A PNE announces itself on a new PAN connection."""

    TYPE: ClassVar[MessageType] = MessageType.PNE_HELLO

    #: Whether the PNE has a UI (004 §5.x.1 vs 003 flows).
    has_ui: bool = f_bool(1)
    #: Chain position of the EUKey the PNE holds; 0 when it holds none.
    key_index: int = f_int(2, lo=0, hi=1024)


# -- 002 §7.5.4 and 000 §7.5: PN Establishment with mutual authentication -------------------

#: Largest EUKey chain index (the chain of 003 has at most 1024 keys).
_MAX_KEY_INDEX: Final = 1024
#: Largest sealed key (a 32-byte key sealed is 61 bytes; room for longer keys).
_MAX_SEALED_KEY: Final = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class SetupEntry(Record):
    """One PNE in the PN GW's SETUP Request: "PNE ID(s) and rand_PNE(s)" (002 §7.5.4.2)."""

    #: PNE Entity ID.
    pne_id: str = f_id(1)
    #: rand_PNE, 32 random bytes chosen by the PNE (002 §7.5.4.1).
    rand_pne: bytes = f_bytes(2, size=32)
    #: Whether the PNE needs a LocalEUKey assignment (002 §7.5.4.1).
    local_eukey: bool = f_bool(3)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthChallenge(Record):
    """One PNE in the server's AUTHENTICATE Request (002 §7.5.4.3, 000 §7.5.3)."""

    #: PNE Entity ID.
    pne_id: str = f_id(1)
    #: OK, or why the server refused this PNE (it is then left out of the rest).
    status: ErrorCode = f_enum(2, ErrorCode)
    #: The flow the server chose for this PNE (present on OK).
    flow: AuthFlow | None = f_enum(3, AuthFlow, optional=True)
    #: The PN GW's copy of this PNE's LocalEUKey, sealed under the PN GW's EUKey.
    sealed_local_gw: bytes | None = f_bytes(4, hi=_MAX_SEALED_KEY, optional=True, secret=True)
    #: The PNE's copy of its LocalEUKey, sealed under the PNE's EUKey.
    sealed_local_pne: bytes | None = f_bytes(5, hi=_MAX_SEALED_KEY, optional=True, secret=True)
    #: AN = MAC(TK_t, ...) (TK flow, 000 §7.5.3 step 2).
    an: bytes | None = f_bytes(6, size=32, optional=True)
    #: The TK ratchet step t the challenge is made at (TK flow).
    tk_step: int | None = f_int(7, lo=0, hi=_MAX_TK_STEP, optional=True)
    #: Index i of the EUKey the PNE must prove (TK flow).
    key_index: int | None = f_int(8, lo=1, hi=_MAX_KEY_INDEX, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthProof(Record):
    """One PNE in the PN GW's aggregated AUTHENTICATE Response (002 §7.5.4.2)."""

    #: PNE Entity ID.
    pne_id: str = f_id(1)
    #: OK, or the PN GW's verdict for this PNE (TIMEOUT: no answer; AUTHENTICATION_FAILED:
    #: the PNE refused the server).
    status: ErrorCode = f_enum(2, ErrorCode)
    #: hash_PNE (RAND_HASH flow).
    hash_pne: bytes | None = f_bytes(3, size=32, optional=True)
    #: E_TK(EUKey_i), the PNE's current EUKey sealed under TK_t (TK flow).
    sealed_eukey: bytes | None = f_bytes(4, hi=_MAX_SEALED_KEY, optional=True, secret=True)
    #: The index i the PNE proved (TK flow).
    key_index: int | None = f_int(5, lo=1, hi=_MAX_KEY_INDEX, optional=True)
    #: The TK step t the PNE answered at (TK flow).
    tk_step: int | None = f_int(6, lo=0, hi=_MAX_TK_STEP, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResult(Record):
    """One PNE in the server's SETUP Response (002 §7.5.4.3, 000 §7.5.3)."""

    #: PNE Entity ID.
    pne_id: str = f_id(1)
    #: OK (the PNE joined the PN) or why it did not.
    status: ErrorCode = f_enum(2, ErrorCode)
    #: The flow the PNE used (absent when it was refused before a flow was chosen).
    flow: AuthFlow | None = f_enum(3, AuthFlow, optional=True)
    #: hash_server for this PNE (RAND_HASH flow, on OK).
    hash_server: bytes | None = f_bytes(4, size=32, optional=True)
    #: Key confirmation MAC(SK, ...) for this PNE (TK flow, on OK).
    confirm: bytes | None = f_bytes(5, size=32, optional=True)
    #: The PNE's EUKey chain is exhausted or stale: the PN GW triggers a 003 re-assignment.
    reassign: bool = f_bool(6)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberStatus(Record):
    """One PNE's outcome as the originating PNE sees it in its SETUP Response."""

    #: PNE Entity ID.
    pne_id: str = f_id(1)
    #: OK (joined) or why not.
    status: ErrorCode = f_enum(2, ErrorCode)
    #: The flow it used (absent when refused before a flow was chosen).
    flow: AuthFlow | None = f_enum(3, AuthFlow, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNSetupRequest(Message):
    """SETUP Request from the originating PNE (002 §7.5.4.1): PNE ID (``src``), rand_PNE,
    whether it needs a LocalEUKey, and the PNEs it invites. The PN ID is in the header."""

    TYPE: ClassVar[MessageType] = MessageType.PN_SETUP_REQUEST
    PN_ID_REQUIRED: ClassVar[bool] = True

    #: rand_PNE, 32 random bytes.
    rand_pne: bytes = f_bytes(1, size=32)
    #: Whether the PNE needs a LocalEUKey.
    local_eukey: bool = f_bool(2)
    #: Entity IDs of the PNEs invited into the PN (0..63).
    invite: tuple[str, ...] = f_id_list(3)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNInvite(Message):
    """The PN GW's SETUP Request to an invited PNE (its answer is the PNE's SETUP Response)."""

    TYPE: ClassVar[MessageType] = MessageType.PN_INVITE
    PN_ID_REQUIRED: ClassVar[bool] = True

    #: Entity ID of the originating PNE.
    originator: str = f_id(1)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNInviteResponse(Message):
    """SETUP Response from an invited PNE (002 §7.5.4.1): rand_PNE and the LocalEUKey need."""

    TYPE: ClassVar[MessageType] = MessageType.PN_INVITE_RESPONSE

    #: OK (the PNE joins), or why it declines.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: rand_PNE (present on OK).
    rand_pne: bytes | None = f_bytes(2, size=32, optional=True)
    #: Whether the PNE needs a LocalEUKey.
    local_eukey: bool = f_bool(3)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEstablishRequest(Message):
    """The PN GW's SETUP Request to the server with every PNE ID and rand_PNE (002 §7.5.4.2)."""

    TYPE: ClassVar[MessageType] = MessageType.PN_ESTABLISH_REQUEST
    PN_ID_REQUIRED: ClassVar[bool] = True

    #: One entry per PNE, the originating PNE first.
    entries: tuple[SetupEntry, ...] = f_records(1, SetupEntry)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticateRequest(Message):
    """The server's AUTHENTICATE Request (002 §7.5.4.3, 000 §7.5.3): rand_server, one
    challenge per PNE, LocalEUKey copies."""

    TYPE: ClassVar[MessageType] = MessageType.AUTHENTICATE_REQUEST

    #: OK, or why the whole request was refused (then nothing else but ``entries`` = ()).
    status: ErrorCode = f_enum(1, ErrorCode)
    #: The establishment's ID, chosen by the server (present on OK).
    est_id: bytes | None = f_bytes(2, size=EST_ID_LEN, optional=True)
    #: rand_server, one per establishment (present on OK).
    rand_server: bytes | None = f_bytes(3, size=32, optional=True)
    #: One challenge (or refusal) per PNE of the request, in its order.
    entries: tuple[AuthChallenge, ...] = f_records(4, AuthChallenge, lo=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEAuthenticateRequest(Message):
    """The AUTHENTICATE Request the PN GW creates for one PNE (002 §7.5.4.2, 000 §7.5.2)."""

    TYPE: ClassVar[MessageType] = MessageType.PNE_AUTHENTICATE_REQUEST

    #: The establishment's ID (for LOCAL: the PN GW's ID of the local authentication).
    est_id: bytes = f_bytes(1, size=EST_ID_LEN)
    #: Which flow the PNE must answer (``auth_flow``: the header's ``flow`` is the
    #: correlation ID).
    auth_flow: AuthFlow = f_enum(2, AuthFlow)
    #: rand_server (for LOCAL: the PN GW's random value).
    rand_server: bytes = f_bytes(3, size=32)
    #: The PNE's copy of its LocalEUKey, sealed under its EUKey by the server.
    sealed_local_eukey: bytes | None = f_bytes(4, hi=_MAX_SEALED_KEY, optional=True, secret=True)
    #: AN (TK flow).
    an: bytes | None = f_bytes(5, size=32, optional=True)
    #: TK step t of the challenge (TK flow).
    tk_step: int | None = f_int(6, lo=0, hi=_MAX_TK_STEP, optional=True)
    #: Index i of the EUKey the PNE must prove (TK flow).
    key_index: int | None = f_int(7, lo=1, hi=_MAX_KEY_INDEX, optional=True)
    #: E_TK(EUKey_{i+1}) sealed by the PN GW (TK flow; absent when the chain is exhausted).
    sealed_next_eukey: bytes | None = f_bytes(8, hi=_MAX_SEALED_KEY, optional=True, secret=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEAuthenticateResponse(Message):
    """One PNE's AUTHENTICATE Response (002 §7.5.4.1, 000 §7.5.1)."""

    TYPE: ClassVar[MessageType] = MessageType.PNE_AUTHENTICATE_RESPONSE

    #: The establishment's ID, echoed.
    est_id: bytes = f_bytes(1, size=EST_ID_LEN)
    #: OK, or why the PNE refused (AUTHENTICATION_FAILED: AN or seal did not verify).
    status: ErrorCode = f_enum(2, ErrorCode)
    #: hash_PNE (RAND_HASH and LOCAL flows, on OK).
    hash_pne: bytes | None = f_bytes(3, size=32, optional=True)
    #: E_TK(EUKey_i) (TK flow, on OK).
    sealed_eukey: bytes | None = f_bytes(4, hi=_MAX_SEALED_KEY, optional=True, secret=True)
    #: The index i proved (TK flow).
    key_index: int | None = f_int(5, lo=1, hi=_MAX_KEY_INDEX, optional=True)
    #: The TK step t answered at (TK flow).
    tk_step: int | None = f_int(6, lo=0, hi=_MAX_TK_STEP, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticateResponse(Message):
    """The PN GW's aggregated AUTHENTICATE Response: every PNE ID and proof (002 §7.5.4.2)."""

    TYPE: ClassVar[MessageType] = MessageType.AUTHENTICATE_RESPONSE

    #: The establishment's ID, echoed.
    est_id: bytes = f_bytes(1, size=EST_ID_LEN)
    #: One proof or verdict per PNE the server challenged.
    entries: tuple[AuthProof, ...] = f_records(2, AuthProof)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEstablishResponse(Message):
    """The server's SETUP Response (002 §7.5.4.3): per-PNE results and hash_server."""

    TYPE: ClassVar[MessageType] = MessageType.PN_ESTABLISH_RESPONSE

    #: OK if at least one PNE joined; else AUTHENTICATION_FAILED, or why the whole
    #: response was refused (UNKNOWN_ESTABLISHMENT).
    status: ErrorCode = f_enum(1, ErrorCode)
    #: The establishment's ID, echoed.
    est_id: bytes = f_bytes(2, size=EST_ID_LEN)
    #: One result per PNE of the establishment.
    entries: tuple[AuthResult, ...] = f_records(3, AuthResult, lo=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNSetupResponse(Message):
    """SETUP Response to the originating PNE (002 §7.5.4.2): its hash_server and who joined."""

    TYPE: ClassVar[MessageType] = MessageType.PN_SETUP_RESPONSE

    #: The originating PNE's own outcome.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: The establishment's ID (absent when refused before the server named it).
    est_id: bytes | None = f_bytes(2, size=EST_ID_LEN, optional=True)
    #: hash_server for the originating PNE (RAND_HASH flow, on OK).
    hash_server: bytes | None = f_bytes(3, size=32, optional=True)
    #: Every PNE of the establishment and its outcome.
    members: tuple[MemberStatus, ...] = f_records(4, MemberStatus, lo=0)
    #: Key confirmation for the originating PNE (TK flow, on OK).
    confirm: bytes | None = f_bytes(5, size=32, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEstablishmentNotify(Message):
    """PNEstablishmentNotify to an invited PNE (002 §7.5.4.2): its outcome and hash_server."""

    TYPE: ClassVar[MessageType] = MessageType.PN_ESTABLISHMENT_NOTIFY

    #: The invited PNE's own outcome.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: The establishment's ID (absent when refused before the server named it).
    est_id: bytes | None = f_bytes(2, size=EST_ID_LEN, optional=True)
    #: hash_server for this PNE (RAND_HASH flow, on OK).
    hash_server: bytes | None = f_bytes(3, size=32, optional=True)
    #: Key confirmation for this PNE (TK flow, on OK).
    confirm: bytes | None = f_bytes(4, size=32, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalAuthRequest(Message):
    """A PNE starts LocalEUKey authentication with its PN GW (ours: "7.5.5")."""

    TYPE: ClassVar[MessageType] = MessageType.LOCAL_AUTH_REQUEST
    PN_ID_REQUIRED: ClassVar[bool] = True

    #: rand_PNE, 32 random bytes.
    rand_pne: bytes = f_bytes(1, size=32)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalAuthResponse(Message):
    """The PN GW's verdict and hash (the server's part of "7.5.5", played by the PN GW)."""

    TYPE: ClassVar[MessageType] = MessageType.LOCAL_AUTH_RESPONSE

    #: OK, or AUTHENTICATION_FAILED.
    status: ErrorCode = f_enum(1, ErrorCode)
    #: The PN GW's hash (hash_server of the local exchange), on OK.
    hash_server: bytes | None = f_bytes(2, size=32, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMessage(Message):
    """Generic error reply, for a message that could not be decoded or accepted."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR

    #: Status.
    status: ErrorCode = f_enum(1, ErrorCode)


#: Every message class by wire type.
MESSAGE_CLASSES: Final[Mapping[MessageType, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        ErrorMessage,
        UserKeyAssignmentRequest,
        UserKeyAssignmentResponse,
        EUKeyAssignmentRequest,
        EUKeyAssignmentResponse,
        EUKeyAssignmentNotification,
        EUKeyAssignmentAck,
        PNEHello,
        PNSetupRequest,
        PNInvite,
        PNInviteResponse,
        PNEstablishRequest,
        AuthenticateRequest,
        PNEAuthenticateRequest,
        PNEAuthenticateResponse,
        AuthenticateResponse,
        PNEstablishResponse,
        PNSetupResponse,
        PNEstablishmentNotify,
        LocalAuthRequest,
        LocalAuthResponse,
    )
}

#: Records that travel nested in a message's ``records`` field.
NESTED_RECORDS: Final[tuple[type[Record], ...]] = (
    SetupEntry,
    AuthChallenge,
    AuthProof,
    AuthResult,
    MemberStatus,
)
