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
from cpns.messages.constants import FLOW_LEN, ID_PATTERN, TXID_LEN, MessageType
from cpns.types import EntityKind

__all__ = [
    "MESSAGE_CLASSES",
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

type Kind = Literal["bytes", "id", "int", "enum", "bool", "bytes_list"]

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
    )
}
