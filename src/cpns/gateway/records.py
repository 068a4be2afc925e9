"""What the PN GW stores, as typed, frozen records: its own enrolment and, per PNE, the
outstanding request and the key set with its delivery state.

The key store's main map holds the gateway's :class:`Enrolment` (004 §5.x.1).

One :class:`PNERecord` per PNE (one sealed file each in the key store's ``gateway.d/``)
holds the outstanding request (:class:`PendingRequest`), the key set received for the PNE
with its delivery state (:class:`KeySet`), and the last status the server gave.

The records are values: a change builds a new record (:func:`dataclasses.replace`), so a
copy taken for a write never changes under the writer. :meth:`PNERecord.encode` and
:meth:`PNERecord.decode` convert to and from the key store's map format, which is the one
earlier releases wrote (same keys, same types), so their records load unchanged and this
release's records stay readable by them. A stored map that is not a record of this shape
is refused with :class:`MalformedRecord` (a :class:`~cpns.errors.StoreError`) naming what
is wrong, never half-read.

Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cpns.errors import StoreError

__all__ = [
    "Enrolment",
    "KeySet",
    "MalformedRecord",
    "PNERecord",
    "PendingRequest",
    "Stage",
    "status_view",
]

#: Furthest step of a PNE record: a request is outstanding, a key set is stored (not yet
#: proven delivered), it is delivered, or none (only a refusal on record).
type Stage = Literal["requested", "stored", "delivered", "none"]


class MalformedRecord(StoreError):
    """A stored PNE record is not of the expected shape."""


def _get[T](data: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
    value = data.get(key)
    # bool is an int subclass: an int field never takes a bool.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedRecord(f"{where}: {key!r} must be {kind.__name__}")
    return value


def _optional[T](data: Mapping[str, Any], key: str, kind: type[T], where: str) -> T | None:
    if data.get(key) is None:
        return None
    return _get(data, key, kind, where)


def _map(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedRecord(f"{where} must be a map")
    return value


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """An EUKeyAssignmentRequest stored before it was sent (resent as is until answered)."""

    #: Its transaction ID.
    txid: bytes
    #: The encoded request, flow ID included: a resend sends the same bytes.
    encoded: bytes = dataclasses.field(repr=False)
    #: The owner the request names.
    user_id: str
    #: When it was stored (seconds since the epoch).
    created_at: int

    def encode(self) -> dict[str, Any]:
        """The key store's map."""
        return {
            "txid": self.txid,
            "encoded": self.encoded,
            "user_id": self.user_id,
            "created_at": self.created_at,
        }

    @classmethod
    def decode(cls, data: object, where: str = "request") -> PendingRequest:
        """From the key store's map; MalformedRecord if it is not one."""
        m = _map(data, where)
        return cls(
            txid=_get(m, "txid", bytes, where),
            encoded=_get(m, "encoded", bytes, where),
            user_id=_get(m, "user_id", str, where),
            created_at=_get(m, "created_at", int, where),
        )


@dataclass(frozen=True, slots=True)
class KeySet:
    """A PNE's TK and EUKey set received from the server (003 §7.4.2.1.1.3 step 1), and
    whether the PNE proved receipt."""

    #: Transaction ID of the assignment.
    txid: bytes
    #: The owner.
    user_id: str
    #: The PNE's TK as the server held it, TK_t at step :attr:`tk_step` (seals the
    #: Notification; the TK flow of 000 starts again from it).
    tk: bytes = dataclasses.field(repr=False)
    #: [EUKey_1..EUKey_n].
    eukeys: tuple[bytes, ...] = dataclasses.field(repr=False)
    #: The index selected for the PNE.
    key_index: int
    #: The assignment epoch (D-003-11); 1 in records written before epochs existed.
    epoch: int = 1
    #: Whether the PNE proved receipt (a verified Ack).
    delivered: bool = False
    #: When the set was stored; None in records written before it was kept.
    stored_at: int | None = None
    #: When delivery was proven; None until then.
    delivered_at: int | None = None
    #: Flow ID (8 bytes) of the assignment; a later delivery carries it.
    flow: bytes | None = None
    #: t, the TK ratchet step of :attr:`tk` (a re-assignment after TK-based
    #: authentications); 0 in records written before steps were kept.
    tk_step: int = 0

    def encode(self) -> dict[str, Any]:
        """The key store's map (``delivered_at`` only once delivered, as before;
        ``tk_step`` only when not 0)."""
        data: dict[str, Any] = {
            "txid": self.txid,
            "user_id": self.user_id,
            "tk": self.tk,
            "eukeys": list(self.eukeys),
            "key_index": self.key_index,
            "epoch": self.epoch,
            "delivered": self.delivered,
            "stored_at": self.stored_at,
            "flow": self.flow,
        }
        if self.delivered_at is not None:
            data["delivered_at"] = self.delivered_at
        if self.tk_step:  # absent at step 0: the map earlier releases wrote and read
            data["tk_step"] = self.tk_step
        return data

    @classmethod
    def decode(cls, data: object, where: str = "set") -> KeySet:
        """From the key store's map; MalformedRecord if it is not one."""
        m = _map(data, where)
        eukeys = m.get("eukeys")
        if (
            not isinstance(eukeys, list)
            or not eukeys
            or not all(isinstance(k, bytes) for k in eukeys)
        ):
            raise MalformedRecord(f"{where}: 'eukeys' must be a non-empty list of bytes")
        epoch = _optional(m, "epoch", int, where)
        tk_step = _optional(m, "tk_step", int, where)
        if tk_step is not None and tk_step < 0:
            raise MalformedRecord(f"{where}: 'tk_step' must not be negative")
        return cls(
            txid=_get(m, "txid", bytes, where),
            user_id=_get(m, "user_id", str, where),
            tk=_get(m, "tk", bytes, where),
            eukeys=tuple(eukeys),
            key_index=_get(m, "key_index", int, where),
            epoch=1 if epoch is None else epoch,
            delivered=_get(m, "delivered", bool, where),
            stored_at=_optional(m, "stored_at", int, where),
            delivered_at=_optional(m, "delivered_at", int, where),
            flow=_optional(m, "flow", bytes, where),
            tk_step=0 if tk_step is None else tk_step,
        )


@dataclass(frozen=True, slots=True)
class PNERecord:
    """Everything the PN GW keeps about one PNE."""

    #: The request outstanding at the server, if any.
    request: PendingRequest | None = None
    #: The latest key set received for the PNE, if any.
    key_set: KeySet | None = None
    #: ErrorCode name of the server's last answer ("OK" or the refusal), if any.
    last_status: str | None = None

    @property
    def stage(self) -> Stage:
        """Furthest step: requested, stored, delivered, or none."""
        if self.request is not None:
            return "requested"
        if self.key_set is None:
            return "none"
        return "delivered" if self.key_set.delivered else "stored"

    @property
    def pending_set(self) -> KeySet | None:
        """The key set awaiting proof of delivery, if any."""
        if self.key_set is None or self.key_set.delivered:
            return None
        return self.key_set

    def encode(self) -> dict[str, Any]:
        """The key store's map: only the parts present, as earlier releases wrote it."""
        data: dict[str, Any] = {}
        if self.request is not None:
            data["request"] = self.request.encode()
        if self.key_set is not None:
            data["set"] = self.key_set.encode()
        if self.last_status is not None:
            data["last_status"] = self.last_status
        return data

    @classmethod
    def decode(cls, data: object, where: str = "PNE record") -> PNERecord:
        """From the key store's map; MalformedRecord (naming ``where``) if it is not one."""
        m = _map(data, where)
        request = m.get("request")
        key_set = m.get("set")
        return cls(
            request=None if request is None else PendingRequest.decode(request, f"{where}.request"),
            key_set=None if key_set is None else KeySet.decode(key_set, f"{where}.set"),
            last_status=_optional(m, "last_status", str, where),
        )


@dataclass(frozen=True, slots=True)
class Enrolment:
    """The gateway's own enrolment: the main map of its key store."""

    #: The gateway's Entity ID.
    entity_id: str
    #: The user it was enrolled for.
    user_id: str
    #: Its EUKey (the Digest key on the server link).
    eukey: bytes = dataclasses.field(repr=False)
    #: The server that enrolled it; None in stores that did not keep it.
    server_id: str | None = None
    #: When (seconds since the epoch); None in stores that did not keep it.
    enrolled_at: int | None = None
    #: Version of the store layout.
    version: int = 1

    def encode(self) -> dict[str, Any]:
        """The main map's enrolment keys (the map may hold others; they are kept)."""
        return {
            "version": self.version,
            "entity_id": self.entity_id,
            "user_id": self.user_id,
            "eukey": self.eukey,
            "server_id": self.server_id,
            "enrolled_at": self.enrolled_at,
        }

    @classmethod
    def decode(cls, data: Mapping[str, Any], where: str = "gateway enrolment") -> Enrolment | None:
        """From the main map; None if the gateway is not enrolled (no EUKey), and
        MalformedRecord if it holds an EUKey but not a well-formed enrolment."""
        if not isinstance(data.get("eukey"), bytes):
            return None
        version = _optional(data, "version", int, where)
        return cls(
            entity_id=_get(data, "entity_id", str, where),
            user_id=_get(data, "user_id", str, where),
            eukey=_get(data, "eukey", bytes, where),
            server_id=_optional(data, "server_id", str, where),
            enrolled_at=_optional(data, "enrolled_at", int, where),
            version=1 if version is None else version,
        )


def status_view(
    enrolment: Enrolment | None,
    records: Mapping[str, PNERecord],
    *,
    attached: Collection[str],
) -> dict[str, object]:
    """IDs, indexes and flags of the gateway's enrolment and PNE records (the ``status``
    reply); never key material."""
    pnes = []
    for pne_id, record in sorted(records.items()):
        key_set = record.key_set
        user_id = (
            key_set.user_id
            if key_set is not None
            else record.request.user_id
            if record.request is not None
            else None
        )
        pnes.append(
            {
                "pne_id": pne_id,
                "stage": record.stage,
                "user_id": user_id,
                "key_index": key_set.key_index if key_set else 0,
                "delivered": bool(key_set and key_set.delivered),
                "txid": key_set.txid.hex() if key_set else None,
                "connected": pne_id in attached,
                "last_status": record.last_status,
            }
        )
    return {
        "ok": True,
        "status": "OK",
        "entity_id": enrolment.entity_id if enrolment else None,
        "user_id": enrolment.user_id if enrolment else None,
        "enrolled": enrolment is not None,
        "attached": sorted(attached),
        "pnes": pnes,
    }
