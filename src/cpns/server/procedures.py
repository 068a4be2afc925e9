"""The server's registry of procedures: what :class:`~cpns.server.service.CPNSService` runs.

Each procedure the server takes part in is described ONCE, by a :class:`Procedure`: the
request type that starts it, whether that request is *open* (sent without HTTP Digest: its
proof is inside, 004 §5.x.2; a PN GW relaying it from a PNE sends it with Digest, and the
machine is then told who relayed it), its name in the audit trail, metrics and guard counters, the
factory of its sans-I/O server machine, how the facts its events carry are written in the
request's transaction, and which party sends it (for the hop log lines).

A procedure whose second step continues from stored state (PN Establishment: the
AUTHENTICATE Response continues the establishment its SETUP Request started) names a
``load``: the service runs it with the request's other store reads and hands its result
to the machine factory (:attr:`MachineContext.loaded`), so any server process, or one
restarted in between, takes the step. A procedure whose write is a compare and set that
a racing copy may lose (``rerun_on_conflict``) is run again from fresh reads when its
write loses, instead of being refused. A procedure that handles many PNEs at once names
``pne_outcomes``: each PNE's outcome, read from its reply, gets an audit row and a
metric.

The service layer knows no message type by name: it looks the request's type up here
(:func:`procedure_for`). Adding a procedure means writing its machine in
:mod:`cpns.protocol`, then adding one :class:`Procedure` to :data:`PROCEDURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cpns.errors import ErrorCode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import (
    AuthenticateRequest,
    AuthenticateResponse,
    EUKeyAssignmentRequest,
    Message,
    PNEstablishRequest,
    PNEstablishResponse,
    UserKeyAssignmentRequest,
)
from cpns.protocol._machine import Event, Machine
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    ServerLookups,
)
from cpns.protocol.pn_establishment import (
    EstablishmentLookups,
    EstablishmentPending,
    PNEstablished,
    ServerCompletion,
    ServerSetup,
    TKAdvanced,
    flow_name,
)
from cpns.protocol.user_key_assignment import EUKeyAssigned, UserKeyAssignmentServer
from cpns.records import EntityRecord
from cpns.store.base import ServerStore, WriteTx
from cpns.types import EntityKind, Random

__all__ = [
    "PROCEDURES",
    "MachineContext",
    "PNEOutcome",
    "Party",
    "Prefetched",
    "Procedure",
    "procedure_for",
]

#: Who sent a request, as named in the hop log lines (docs/logging.md).
type Party = Literal["gateway", "pne"]


@dataclass(frozen=True, slots=True)
class MachineContext:
    """What the service hands a procedure's machine factory for one request."""

    policy: AssignmentPolicy
    #: The store reads of this request (with the guard's counters for this procedure).
    lookups: ServerLookups
    rng: Random
    #: The request's time (seconds since the epoch).
    now: int
    #: The Digest-authenticated Entity ID; None for an open request sent without Digest
    #: (an open request that carries Digest is relayed by that entity).
    authenticated: str | None
    #: What the procedure's ``load`` read from the store for this request (None without
    #: ``load``, and for a machine built only to refuse a request).
    loaded: Any = None
    #: The PN inventory's owner of a PN ID (None: no such PN yet).
    get_pn_owner: Callable[[str], str | None] = lambda _pn_id: None


@dataclass(frozen=True, slots=True)
class PNEOutcome:
    """One PNE's outcome in a multi-PNE procedure's reply (an audit row and a metric)."""

    #: PNE Entity ID.
    pne_id: str
    #: OK or the ErrorCode of its refusal or failure.
    status: ErrorCode | int
    #: The flow ("rand-hash", "tk"), "" when refused before a flow was chosen.
    flow: str


@dataclass(frozen=True, slots=True)
class Procedure:
    """One server procedure, as the service layer runs it."""

    #: Name in the audit trail, metrics labels and guard counters (stable: stored).
    name: str
    #: The request message that starts it.
    request: type[Message]
    #: Whether the request is accepted without Digest (its proof is inside the message).
    open: bool
    #: Builds the server machine for one request.
    machine: Callable[[MachineContext], Machine[Any]]
    #: Writes the facts one of the machine's events carries, in the request's transaction
    #: (``now`` is the request's time); events it does not know are left alone. The
    #: nonce events every procedure emits are written by the service itself.
    persist: Callable[[WriteTx, Event, int], None]
    #: Who sends the request (for the hop log lines).
    party: Callable[[Message], Party]
    #: Reads the stored state the machine continues from (given the store, the request
    #: and the Digest-authenticated entity); its result is :attr:`MachineContext.loaded`.
    load: Callable[[ServerStore, Message, str | None], Any] | None = None
    #: Whether a write that loses a compare and set (another process or a racing copy
    #: committed first) runs the request again from fresh reads rather than refusing it.
    rerun_on_conflict: bool = False
    #: Each PNE's outcome as the reply carries it (empty for a single-entity procedure).
    pne_outcomes: Callable[[Message], tuple[PNEOutcome, ...]] = lambda _reply: ()


# -- EUKey assignment for an entity with UI (004 §5.x.1) --------------------------------------


def _ui_machine(ctx: MachineContext) -> Machine[Any]:
    # Open, but a PN GW relaying a PNE's request authenticates with Digest: the machine
    # then applies the relay rules (docs/procedures/pne-enrolment.md, D-004-5).
    return UserKeyAssignmentServer(
        policy=ctx.policy,
        lookups=ctx.lookups,
        rng=ctx.rng,
        now=ctx.now,
        relay=ctx.authenticated,
    )


def _ui_persist(tx: WriteTx, event: Event, now: int) -> None:
    if isinstance(event, EUKeyAssigned):
        tx.assign_entity(
            EntityRecord(
                entity_id=event.entity_id,
                kind=event.kind,
                owner=event.user_id,
                eukeys=(event.eukey,),
                key_index=1,
                assigned_at=now,
                epoch=event.expected_epoch + 1,
            ),
            expected_epoch=event.expected_epoch,
        )


def _ui_party(message: Message) -> Party:
    """A PNE with UI enrolling itself, else a PN GW."""
    if isinstance(message, UserKeyAssignmentRequest) and message.entity_kind is EntityKind.PNE:
        return "pne"
    return "gateway"


# -- EUKey assignment for a PNE without UI, through its PN GW (003) --------------------------


def _tk_machine(ctx: MachineContext) -> Machine[Any]:
    assert ctx.authenticated is not None  # not open: the service authenticated it
    return EUKeyAssignmentServer(
        policy=ctx.policy,
        lookups=ctx.lookups,
        requester=ctx.authenticated,
        rng=ctx.rng,
        now=ctx.now,
    )


def _tk_persist(tx: WriteTx, event: Event, now: int) -> None:
    if isinstance(event, EUKeyChainAssigned):
        # Compare and set: the checks and this write are one atomic step. A re-assignment
        # after TK-based authentications leaves the TK record (TK_s, s) as it is: the new
        # chain starts at index 1 under the server's current TK step (D-003-13).
        tx.assign_entity(
            EntityRecord(
                entity_id=event.pne_id,
                kind=EntityKind.PNE,
                owner=event.user_id,
                eukeys=event.eukeys,
                key_index=1,
                assigned_via=event.gateway_id,
                assigned_at=now,
                epoch=event.epoch,
            ),
            expected_epoch=event.expected_epoch,
        )


def _from_gateway(message: Message) -> Party:
    return "gateway"


# -- PN Establishment (002 §7.5.4, 000 §7.5) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prefetched:
    """What a PN Establishment half's ``load`` read: the pending establishment (second
    half), and the records of every entity and TK state the half will check, each read
    in ONE query for all the PNEs of the request instead of one query per PNE and table."""

    #: The pending establishment the AUTHENTICATE Response continues (None: unknown,
    #: finished or purged; always None for the first half).
    pending: EstablishmentPending | None
    #: Entities by Entity ID; an ID read and not found maps to None.
    entities: Mapping[str, EntityRecord | None] = field(default_factory=dict)
    #: TK states (TK_s, s) by Entity ID; an ID read and not found maps to None.
    tks: Mapping[str, tuple[bytes, int] | None] = field(default_factory=dict, repr=False)


def _prefetch(
    store: ServerStore,
    entity_ids: list[str],
    pending: EstablishmentPending | None = None,
    tk_ids: list[str] | None = None,
) -> Prefetched:
    """Read ``entity_ids`` and the TK states of ``tk_ids`` (by default: of the entities
    read whose chain was assigned through a PN GW, the TK flow's) in one query each."""
    found = store.get_entities(entity_ids)
    entities: dict[str, EntityRecord | None] = {i: found.get(i) for i in entity_ids}
    if tk_ids is None:
        tk_ids = [i for i, e in found.items() if e.assigned_via is not None]
    records = store.get_tks(tk_ids) if tk_ids else {}
    tks: dict[str, tuple[bytes, int] | None] = {}
    for i in tk_ids:
        record = records.get(i)
        tks[i] = None if record is None else (record.tk, record.tk_step)
    return Prefetched(pending=pending, entities=entities, tks=tks)


def _establishment_lookups(ctx: MachineContext) -> EstablishmentLookups:
    """The store's reads for one run of a machine, each at most once per ID: what the
    procedure's ``load`` read for all the request's PNEs at once (:class:`Prefetched`),
    else one read on first use (the setup half asks for a PNE's entity and TK state when
    it checks the PNE and again when it builds its challenge; each read is a query and an
    unseal of the whole chain). A rerun after a lost compare and set builds a new machine
    and loads afresh."""
    get_tk = ctx.lookups.get_tk
    get_entity = ctx.lookups.get_entity
    loaded = ctx.loaded if isinstance(ctx.loaded, Prefetched) else None
    entities: dict[str, EntityRecord | None] = {} if loaded is None else dict(loaded.entities)
    tks: dict[str, tuple[bytes, int] | None] = {} if loaded is None else dict(loaded.tks)

    def entity(entity_id: str) -> EntityRecord | None:
        if entity_id not in entities:
            entities[entity_id] = get_entity(entity_id)
        return entities[entity_id]

    def tk_state(pne_id: str) -> tuple[bytes, int] | None:
        if pne_id not in tks:
            record = get_tk(pne_id)
            tks[pne_id] = None if record is None else (record.tk, record.tk_step)
        return tks[pne_id]

    return EstablishmentLookups(
        get_entity=entity, get_tk_state=tk_state, get_pn_owner=ctx.get_pn_owner
    )


def _setup_load(store: ServerStore, message: Message, authenticated: str | None) -> Prefetched:
    """The requesting PN GW and every PNE of the SETUP Request, with the TK states of the
    TK-flow PNEs, in one query per table."""
    assert isinstance(message, PNEstablishRequest)
    ids = [e.pne_id for e in message.entries]
    if authenticated is not None:
        ids.insert(0, authenticated)
    ids = list(dict.fromkeys(ids))
    return _prefetch(store, ids)


def _setup_machine(ctx: MachineContext) -> Machine[Any]:
    assert ctx.authenticated is not None  # not open: the service authenticated it
    return ServerSetup(
        server_id=ctx.policy.server_id,
        requester=ctx.authenticated,
        lookups=_establishment_lookups(ctx),
        rng=ctx.rng,
        now=ctx.now,
    )


def _setup_persist(tx: WriteTx, event: Event, now: int) -> None:
    if isinstance(event, EstablishmentPending):
        tx.put_establishment(event.to_record())


def _complete_load(store: ServerStore, message: Message, authenticated: str | None) -> Prefetched:
    """The pending establishment the AUTHENTICATE Response continues (the authenticated
    PN GW's, by est_id; None: unknown, finished or purged), with the PN GW, its PNEs and
    the TK states of its TK-flow PNEs read in one query per table."""
    assert isinstance(message, AuthenticateResponse)
    if authenticated is None:
        return Prefetched(pending=None)
    record = store.get_establishment(authenticated, message.est_id)
    if record is None:
        return Prefetched(pending=None)
    pending = EstablishmentPending.from_record(record)
    checked = [e.pne_id for e in pending.entries if e.status is ErrorCode.OK]
    return _prefetch(
        store,
        list(dict.fromkeys([authenticated, *checked])),
        pending,
        tk_ids=[e.pne_id for e in pending.entries if e.flow is AuthFlow.TK],
    )


def _complete_machine(ctx: MachineContext) -> Machine[Any]:
    assert ctx.authenticated is not None
    return ServerCompletion(
        server_id=ctx.policy.server_id,
        requester=ctx.authenticated,
        pending=ctx.loaded.pending if isinstance(ctx.loaded, Prefetched) else None,
        lookups=_establishment_lookups(ctx),
        now=ctx.now,
    )


def _complete_persist(tx: WriteTx, event: Event, now: int) -> None:
    if isinstance(event, TKAdvanced):
        # 000 N1: the TK ratchet and the chain index advance only on a verified proof,
        # each a compare and set against the values it was checked with.
        tx.set_tk_state(event.pne_id, event.tk, event.tk_step, expected_step=event.expected_step)
        if event.key_index != event.expected_index:  # the same at the chain's end
            tx.set_key_index(event.pne_id, event.key_index, expected_index=event.expected_index)
    elif isinstance(event, PNEstablished):
        # Compare and set: of two copies finishing one establishment, one commits.
        tx.delete_establishment(event.gw_id, event.est_id)
        tx.record_pn(event.pn_id, event.gw_id, event.owner, event.at, event.members())


def _challenged(reply: Message) -> tuple[PNEOutcome, ...]:
    if not isinstance(reply, AuthenticateRequest):
        return ()
    return tuple(PNEOutcome(e.pne_id, e.status, flow_name(e.flow)) for e in reply.entries)


def _results(reply: Message) -> tuple[PNEOutcome, ...]:
    if not isinstance(reply, PNEstablishResponse):
        return ()
    return tuple(PNEOutcome(e.pne_id, e.status, flow_name(e.flow)) for e in reply.entries)


#: Every procedure the server runs.
PROCEDURES: Final[tuple[Procedure, ...]] = (
    Procedure(
        name="eukey-assignment-ui-004",
        request=UserKeyAssignmentRequest,
        open=True,
        machine=_ui_machine,
        persist=_ui_persist,
        party=_ui_party,
    ),
    Procedure(
        name="eukey-assignment-tk-003",
        request=EUKeyAssignmentRequest,
        open=False,
        machine=_tk_machine,
        persist=_tk_persist,
        party=_from_gateway,
    ),
    Procedure(
        name="pn-establishment-setup",
        request=PNEstablishRequest,
        open=False,
        machine=_setup_machine,
        persist=_setup_persist,
        party=_from_gateway,
        load=_setup_load,
        pne_outcomes=_challenged,
    ),
    Procedure(
        name="pn-establishment-complete",
        request=AuthenticateResponse,
        open=False,
        machine=_complete_machine,
        persist=_complete_persist,
        party=_from_gateway,
        load=_complete_load,
        rerun_on_conflict=True,
        pne_outcomes=_results,
    ),
)


def _index(procedures: tuple[Procedure, ...]) -> Mapping[type[Message], Procedure]:
    index: dict[type[Message], Procedure] = {}
    for procedure in procedures:
        if procedure.request in index:
            raise ValueError(f"two procedures start with {procedure.request.__name__}")
        index[procedure.request] = procedure
    if len({p.name for p in procedures}) != len(procedures):
        raise ValueError("procedure names must be unique")
    return index


_BY_REQUEST: Final = _index(PROCEDURES)


def procedure_for(message: Message | type[Message]) -> Procedure | None:
    """The procedure a request (or request type) starts; None if no server procedure does."""
    kind = message if isinstance(message, type) else type(message)
    return _BY_REQUEST.get(kind)
