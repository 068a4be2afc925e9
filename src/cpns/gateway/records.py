"""What the PN GW stores, as typed, frozen records: its own enrolment and, per PNE, the
outstanding request and the key set with its delivery state.

The key store's main map holds the gateway's :class:`Enrolment` (004 §5.x.1).

One :class:`PNERecord` per PNE (one sealed file each in the key store's ``gateway.d/``)
holds the outstanding request (:class:`PendingRequest`), the key set received for the PNE
with its delivery state (:class:`KeySet`), and the last status the server gave; since PN
Establishment (002 §7.5.4, 000) also the gateway's TK state for the PNE's TK flow
(:class:`TKHolding`), its PN memberships with the LocalEUKeys the server gave the gateway
(:class:`Membership`), and a queued 003 re-assignment (``reassign``). The routing table
PN ID -> member PNEs (:func:`pn_routes`) is derived from the memberships.

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
    "Membership",
    "PNERecord",
    "PendingRequest",
    "Stage",
    "TKHolding",
    "pn_routes",
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
class TKHolding:
    """The PN GW's TK state for a TK-flow PNE (000 §7.5.2): TK_g at step g, for the key set
    of assignment ``set_txid`` (a new 003 set starts again from its TK at the set's ``tk_step``)."""

    #: TK_g.
    tk: bytes = dataclasses.field(repr=False)
    #: g (advanced only when the server said OK for the PNE: the resync rule).
    tk_step: int
    #: The :class:`KeySet` txid this state belongs to.
    set_txid: bytes

    def encode(self) -> dict[str, Any]:
        """The key store's map."""
        return {"tk": self.tk, "tk_step": self.tk_step, "set_txid": self.set_txid}

    @classmethod
    def decode(cls, data: object, where: str = "tk_state") -> TKHolding:
        """From the key store's map; MalformedRecord if it is not one."""
        m = _map(data, where)
        return cls(
            tk=_get(m, "tk", bytes, where),
            tk_step=_get(m, "tk_step", int, where),
            set_txid=_get(m, "set_txid", bytes, where),
        )


@dataclass(frozen=True, slots=True)
class Membership:
    """The PNE in one PN as the PN GW saw it (002 §7.5.4), and the LocalEUKey it shares
    with the PNE there, if the PNE asked for one."""

    #: PN ID.
    pn_id: str
    #: The establishment (hex of est_id; None if the server never named it).
    est_id: str | None
    #: "member", or the ErrorCode name of why not.
    status: str
    #: Flow used: "rand-hash", "tk", or "" (refused before a flow was chosen).
    flow: str
    #: When (seconds since the epoch).
    at: int
    #: The LocalEUKey (002 §7.5.4.2: "decrypt ... and store"), if any.
    local_eukey: bytes | None = dataclasses.field(default=None, repr=False)
    #: The session key of the last LocalEUKey authentication ("7.5.5"), if any.
    local_sk: bytes | None = dataclasses.field(default=None, repr=False)
    #: When that authentication succeeded.
    local_at: int | None = None

    @property
    def joined(self) -> bool:
        """Whether the PNE is a member of the PN."""
        return self.status == "member"

    def encode(self) -> dict[str, Any]:
        """The key store's map."""
        return {
            "pn_id": self.pn_id,
            "est_id": self.est_id,
            "status": self.status,
            "flow": self.flow,
            "at": self.at,
            "local_eukey": self.local_eukey,
            "local_sk": self.local_sk,
            "local_at": self.local_at,
        }

    @classmethod
    def decode(cls, data: object, where: str = "pn") -> Membership:
        """From the key store's map; MalformedRecord if it is not one."""
        m = _map(data, where)
        return cls(
            pn_id=_get(m, "pn_id", str, where),
            est_id=_optional(m, "est_id", str, where),
            status=_get(m, "status", str, where),
            flow=_get(m, "flow", str, where),
            at=_get(m, "at", int, where),
            local_eukey=_optional(m, "local_eukey", bytes, where),
            local_sk=_optional(m, "local_sk", bytes, where),
            local_at=_optional(m, "local_at", int, where),
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
    #: The TK-flow state for the current key set (None: the set's TK at its ``tk_step``).
    tk_state: TKHolding | None = None
    #: PN memberships, one per PN ID (the latest establishment of each).
    pns: tuple[Membership, ...] = ()
    #: A queued 003 re-assignment: why (CHAIN_EXHAUSTED or STALE_CREDENTIAL), else None.
    reassign: str | None = None

    def membership(self, pn_id: str) -> Membership | None:
        """The PNE's membership record of ``pn_id``, or None."""
        return next((m for m in self.pns if m.pn_id == pn_id), None)

    def with_membership(self, membership: Membership) -> PNERecord:
        """A copy with ``membership`` replacing the one of its PN."""
        others = tuple(m for m in self.pns if m.pn_id != membership.pn_id)
        return dataclasses.replace(self, pns=(*others, membership))

    def tk_holding(self) -> tuple[bytes, int] | None:
        """(TK_g, g) for the current key set, or None without a key set."""
        if self.key_set is None:
            return None
        state = self.tk_state
        if state is None or state.set_txid != self.key_set.txid:
            # A new 003 set restarts the TK flow at its TK's step (re-assignment, rule 7).
            return self.key_set.tk, self.key_set.tk_step
        return state.tk, state.tk_step

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
        if self.tk_state is not None:
            data["tk_state"] = self.tk_state.encode()
        if self.pns:
            data["pns"] = [m.encode() for m in self.pns]
        if self.reassign is not None:
            data["reassign"] = self.reassign
        return data

    @classmethod
    def decode(cls, data: object, where: str = "PNE record") -> PNERecord:
        """From the key store's map; MalformedRecord (naming ``where``) if it is not one."""
        m = _map(data, where)
        request = m.get("request")
        key_set = m.get("set")
        tk_state = m.get("tk_state")
        pns = m.get("pns", [])
        if not isinstance(pns, list):
            raise MalformedRecord(f"{where}: 'pns' must be a list")
        return cls(
            request=None if request is None else PendingRequest.decode(request, f"{where}.request"),
            key_set=None if key_set is None else KeySet.decode(key_set, f"{where}.set"),
            last_status=_optional(m, "last_status", str, where),
            tk_state=None if tk_state is None else TKHolding.decode(tk_state, f"{where}.tk_state"),
            pns=tuple(Membership.decode(p, f"{where}.pns[{i}]") for i, p in enumerate(pns)),
            reassign=_optional(m, "reassign", str, where),
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


def pn_routes(records: Mapping[str, PNERecord]) -> dict[str, tuple[str, ...]]:
    """The routing table PN ID -> member PNEs (sorted), from the PNE records."""
    routes: dict[str, list[str]] = {}
    for pne_id, record in records.items():
        for m in record.pns:
            if m.joined:
                routes.setdefault(m.pn_id, []).append(pne_id)
    return {pn: tuple(sorted(members)) for pn, members in sorted(routes.items())}


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
                "tk_step": (record.tk_holding() or (b"", 0))[1],
                "reassign": record.reassign,
                "pns": [
                    {
                        "pn_id": m.pn_id,
                        "status": m.status,
                        "flow": m.flow,
                        "est_id": m.est_id,
                        "local_eukey": m.local_eukey is not None,
                        "local_session": m.local_sk is not None,
                    }
                    for m in record.pns
                ],
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
        "pns": {pn: list(members) for pn, members in pn_routes(records).items()},
    }
