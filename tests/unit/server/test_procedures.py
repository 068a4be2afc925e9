"""The server's registry of procedures (cpns.server.procedures): one entry per procedure,
read by the service layer for the machine, openness, persistence and audit name."""

from __future__ import annotations

import pytest
from tests.helpers import FIXED_NOW, SERVER_ID, FixedRandom

from cpns.messages.model import (
    EUKeyAssignmentAck,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    PNEHello,
    UserKeyAssignmentRequest,
)
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    ServerLookups,
)
from cpns.protocol.user_key_assignment import EUKeyAssigned, UserKeyAssignmentServer
from cpns.records import UserRecord
from cpns.server.procedures import (
    PROCEDURES,
    MachineContext,
    Procedure,
    _index,
    procedure_for,
)
from cpns.store.base import WriteTx
from cpns.store.memory import MemoryStore
from cpns.types import EntityKind


def _context(authenticated: str | None) -> MachineContext:
    store = MemoryStore()
    return MachineContext(
        policy=AssignmentPolicy(server_id=SERVER_ID),
        lookups=ServerLookups(
            get_user=store.get_user,
            get_entity=store.get_entity,
            get_tk=store.get_tk,
            nonce_used=store.nonce_used,
        ),
        rng=FixedRandom(),
        now=FIXED_NOW,
        authenticated=authenticated,
    )


def test_each_request_type_has_one_procedure_with_its_audit_name() -> None:
    """The registry maps the two request types to their procedures, under the audit names
    already stored by earlier releases; other messages start no procedure."""
    ui = procedure_for(UserKeyAssignmentRequest)
    tk = procedure_for(EUKeyAssignmentRequest)
    assert ui is not None
    assert tk is not None
    assert (ui.name, tk.name) == ("eukey-assignment-ui-004", "eukey-assignment-tk-003")
    assert {p.request for p in PROCEDURES} == {UserKeyAssignmentRequest, EUKeyAssignmentRequest}
    for kind in (EUKeyAssignmentResponse, EUKeyAssignmentAck, PNEHello):
        assert procedure_for(kind) is None


def test_only_the_request_with_its_proof_inside_is_open() -> None:
    """004 §5.x.2: the enrolment request (password proof inside) needs no Digest; the 003
    request, sent by an enrolled PN GW, does."""
    assert [p.name for p in PROCEDURES if p.open] == ["eukey-assignment-ui-004"]


def test_machine_factories_build_the_server_roles() -> None:
    """Each entry builds its procedure's sans-I/O server machine; the 003 machine acts for
    the authenticated PN GW."""
    ui = procedure_for(UserKeyAssignmentRequest)
    tk = procedure_for(EUKeyAssignmentRequest)
    assert ui is not None
    assert tk is not None
    assert isinstance(ui.machine(_context(None)), UserKeyAssignmentServer)
    assert isinstance(tk.machine(_context("gw-alice")), EUKeyAssignmentServer)


def test_each_procedure_persists_only_its_own_events() -> None:
    """An entry writes the entity its own event assigns and leaves other events alone."""
    ui = procedure_for(UserKeyAssignmentRequest)
    tk = procedure_for(EUKeyAssignmentRequest)
    assert ui is not None
    assert tk is not None
    enrolled = EUKeyAssigned(
        entity_id="gw-alice", kind=EntityKind.PN_GW, user_id="alice", eukey=bytes(32)
    )
    chain = EUKeyChainAssigned(
        pne_id="pne-1",
        user_id="alice",
        gateway_id="gw-alice",
        eukeys=(bytes(32),),
        epoch=1,
        expected_epoch=0,
    )
    store = MemoryStore()

    def write(tx: WriteTx) -> None:
        tx.add_user(UserRecord(user_id="alice", password_key=bytes(32), created_at=1))
        for procedure in (ui, tk):
            for event in (enrolled, chain):
                procedure.persist(tx, event, FIXED_NOW)

    store.write(write)
    gw, pne = store.get_entity("gw-alice"), store.get_entity("pne-1")
    assert gw is not None
    assert gw.kind is EntityKind.PN_GW
    assert gw.epoch == 1
    assert pne is not None
    assert pne.assigned_via == "gw-alice"
    assert pne.owner == "alice"


def test_the_registry_refuses_two_entries_for_one_request() -> None:
    """Adding a procedure is one entry: a second entry for the same request type, or a
    reused audit name, is refused when the registry is built."""
    (ui, tk) = PROCEDURES
    with pytest.raises(ValueError, match="two procedures"):
        _index((ui, Procedure(**{**_fields(tk), "request": ui.request})))
    with pytest.raises(ValueError, match="unique"):
        _index((ui, Procedure(**{**_fields(tk), "name": ui.name})))


def _fields(procedure: Procedure) -> dict[str, object]:
    return {name: getattr(procedure, name) for name in Procedure.__dataclass_fields__}
