"""The server's registry of procedures: what :class:`~cpns.server.service.CPNSService` runs.

Each procedure the server takes part in is described ONCE, by a :class:`Procedure`: the
request type that starts it, whether that request is *open* (sent without HTTP Digest: its
proof is inside, 004 §5.x.2; a PN GW relaying it from a PNE sends it with Digest, and the
machine is then told who relayed it), its name in the audit trail, metrics and guard counters, the
factory of its sans-I/O server machine, how the facts its events carry are written in the
request's transaction, and which party sends it (for the hop log lines).

The service layer knows no message type by name: it looks the request's type up here
(:func:`procedure_for`). Adding a procedure means writing its machine in
:mod:`cpns.protocol`, then adding one :class:`Procedure` to :data:`PROCEDURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from cpns.messages.model import EUKeyAssignmentRequest, Message, UserKeyAssignmentRequest
from cpns.protocol._machine import Event, Machine
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    ServerLookups,
)
from cpns.protocol.user_key_assignment import EUKeyAssigned, UserKeyAssignmentServer
from cpns.records import EntityRecord
from cpns.store.base import WriteTx
from cpns.types import EntityKind, Random

__all__ = ["PROCEDURES", "MachineContext", "Party", "Procedure", "procedure_for"]

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
        # Compare and set: the checks and this write are one atomic step.
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
