"""The server's registry of procedures (cpns.server.procedures): one entry per procedure,
read by the service layer for the machine, openness, persistence and audit name."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from tests.helpers import FIXED_NOW, SERVER_ID, FixedRandom

from cpns.errors import ErrorCode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import (
    AuthChallenge,
    AuthenticateRequest,
    AuthenticateResponse,
    AuthProof,
    AuthResult,
    EUKeyAssignmentAck,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    PNEHello,
    PNEstablishRequest,
    PNEstablishResponse,
    PNSetupRequest,
    SetupEntry,
    UserKeyAssignmentRequest,
)
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    ServerLookups,
)
from cpns.protocol.pn_establishment import (
    EstablishmentPending,
    PendingPNE,
    ServerCompletion,
    ServerSetup,
)
from cpns.protocol.user_key_assignment import EUKeyAssigned, UserKeyAssignmentServer
from cpns.records import EntityRecord, TKRecord, UserRecord
from cpns.server.procedures import (
    PROCEDURES,
    MachineContext,
    PNEOutcome,
    Prefetched,
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
    """The registry maps the four request types to their procedures, under the audit names
    already stored by earlier releases (and the two halves of PN Establishment, 002
    §7.5.4.3); other messages start no procedure."""
    names = {
        UserKeyAssignmentRequest: "eukey-assignment-ui-004",
        EUKeyAssignmentRequest: "eukey-assignment-tk-003",
        PNEstablishRequest: "pn-establishment-setup",
        AuthenticateResponse: "pn-establishment-complete",
    }
    for request, name in names.items():
        procedure = procedure_for(request)
        assert procedure is not None
        assert procedure.name == name
    assert {p.request for p in PROCEDURES} == set(names)
    for kind in (
        EUKeyAssignmentResponse,
        EUKeyAssignmentAck,
        PNEHello,
        AuthenticateRequest,
        PNEstablishResponse,
        PNSetupRequest,
    ):
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
    (ui, tk, *_) = PROCEDURES
    with pytest.raises(ValueError, match="two procedures"):
        _index((ui, Procedure(**{**_fields(tk), "request": ui.request})))
    with pytest.raises(ValueError, match="unique"):
        _index((ui, Procedure(**{**_fields(tk), "name": ui.name})))


def _fields(procedure: Procedure) -> dict[str, object]:
    return {name: getattr(procedure, name) for name in Procedure.__dataclass_fields__}


def test_pn_establishment_halves_are_authenticated_and_the_second_loads_its_state() -> None:
    """002 §7.5.4.3: both halves are sent by a Digest-authenticated PN GW; the second
    continues from the pending establishment stored by the first, read by (authenticated
    PN GW, est_id) through the entry's ``load`` (so another process can take it), and is
    run again from fresh reads when its compare and set loses a race."""
    setup = procedure_for(PNEstablishRequest)
    complete = procedure_for(AuthenticateResponse)
    assert setup is not None
    assert complete is not None
    assert not setup.open
    assert not complete.open
    assert setup.load is not None  # prefetches the PN GW's and the PNEs' records
    assert complete.load is not None
    assert complete.rerun_on_conflict
    assert isinstance(setup.machine(_context("gw-alice")), ServerSetup)

    store = MemoryStore()
    pending = EstablishmentPending(
        gw_id="gw-alice",
        est_id=bytes(16),
        pn_id="pn-1",
        rand_server=bytes(32),
        created_at=FIXED_NOW,
        expires_at=FIXED_NOW + 300,
        entries=(PendingPNE(pne_id="pne-1", rand_pne=bytes(32), status=ErrorCode.OK),),
    )

    def write(tx: WriteTx) -> None:
        setup.persist(tx, pending, FIXED_NOW)
        complete.persist(tx, pending, FIXED_NOW)  # not its event: left alone

    store.write(write)
    response = AuthenticateResponse(
        txid=bytes(16),
        src="gw-alice",
        dst=SERVER_ID,
        est_id=bytes(16),
        entries=(AuthProof(pne_id="pne-1", status=ErrorCode.TIMEOUT),),
    )
    assert complete.load(store, response, "gw-alice").pending == pending
    assert complete.load(store, response, "gw-bob").pending is None
    ctx = dataclasses.replace(_context("gw-alice"), loaded=Prefetched(pending=pending))
    assert isinstance(complete.machine(ctx), ServerCompletion)


def test_pne_outcomes_are_read_from_the_reply() -> None:
    """Our audit rule: each PNE's outcome in the AUTHENTICATE Request (first half) and in
    the SETUP Response (second half) becomes one audit row and one metric sample; the
    single-entity procedures have none."""
    setup = procedure_for(PNEstablishRequest)
    complete = procedure_for(AuthenticateResponse)
    ui = procedure_for(UserKeyAssignmentRequest)
    assert setup is not None
    assert complete is not None
    assert ui is not None
    challenge = AuthenticateRequest(
        txid=bytes(16),
        src=SERVER_ID,
        dst="gw-alice",
        status=ErrorCode.OK,
        entries=(
            AuthChallenge(pne_id="pne-1", status=ErrorCode.OK, flow=AuthFlow.TK),
            AuthChallenge(pne_id="pne-2", status=ErrorCode.POLICY_DENIED),
        ),
    )
    result = PNEstablishResponse(
        txid=bytes(16),
        src=SERVER_ID,
        dst="gw-alice",
        status=ErrorCode.OK,
        est_id=bytes(16),
        entries=(
            AuthResult(
                pne_id="pne-1", status=ErrorCode.OK, flow=AuthFlow.RAND_HASH, reassign=False
            ),
        ),
    )
    assert setup.pne_outcomes(challenge) == (
        PNEOutcome("pne-1", ErrorCode.OK, "tk"),
        PNEOutcome("pne-2", ErrorCode.POLICY_DENIED, ""),
    )
    assert complete.pne_outcomes(result) == (PNEOutcome("pne-1", ErrorCode.OK, "rand-hash"),)
    assert ui.pne_outcomes(result) == ()


class _CountingStore(MemoryStore):
    """A memory store that counts its single and batched entity and TK reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def get_entity(self, entity_id: str) -> EntityRecord | None:
        self.reads.append("entity")
        return super().get_entity(entity_id)

    def get_tk(self, entity_id: str) -> TKRecord | None:
        self.reads.append("tk")
        return super().get_tk(entity_id)

    def get_entities(self, entity_ids: Sequence[str]) -> dict[str, EntityRecord]:
        self.reads.append("entities")
        return super().get_entities(entity_ids)

    def get_tks(self, entity_ids: Sequence[str]) -> dict[str, TKRecord]:
        self.reads.append("tks")
        return super().get_tks(entity_ids)


def test_each_half_reads_its_pnes_records_in_one_batch_per_table() -> None:
    """Our rule (docs/deployment.md, PN Establishment under load): each half's ``load``
    reads the PN GW's and every PNE's entity in one batched read and the TK-flow PNEs' TK
    states in another; the machine then checks them without reading again, and an ID
    that is not stored is known to be absent (no second read)."""
    store = _CountingStore()

    def setup_facts(tx: WriteTx) -> None:
        tx.add_user(UserRecord(user_id="alice", password_key=b"P" * 32, created_at=1))
        tx.put_entity(
            EntityRecord(
                entity_id="gw-alice",
                kind=EntityKind.PN_GW,
                owner="alice",
                eukeys=(b"G" * 32,),
                key_index=1,
            )
        )
        tx.put_entity(
            EntityRecord(
                entity_id="rh-1",
                kind=EntityKind.PNE,
                owner="alice",
                eukeys=(b"R" * 32,),
                key_index=1,
            )
        )
        tx.put_entity(
            EntityRecord(
                entity_id="tk-1",
                kind=EntityKind.PNE,
                owner="alice",
                eukeys=(b"1" * 32, b"2" * 32),
                key_index=1,
                assigned_via="gw-alice",
                epoch=1,
            )
        )
        tx.put_tks([TKRecord(entity_id="tk-1", tk=b"T" * 32)])

    store.write(setup_facts)
    setup = procedure_for(PNEstablishRequest)
    complete = procedure_for(AuthenticateResponse)
    assert setup is not None
    assert setup.load is not None
    assert complete is not None
    assert complete.load is not None
    request = PNEstablishRequest(
        txid=bytes(16),
        src="gw-alice",
        dst=SERVER_ID,
        pn_id="pn-1",
        entries=tuple(
            SetupEntry(pne_id=p, rand_pne=bytes([i]) * 32, local_eukey=False)
            for i, p in enumerate(("rh-1", "tk-1", "ghost-1"))
        ),
    )
    ctx = dataclasses.replace(
        _context("gw-alice"),
        lookups=ServerLookups(
            get_user=store.get_user,
            get_entity=store.get_entity,
            get_tk=store.get_tk,
            nonce_used=store.nonce_used,
        ),
        loaded=setup.load(store, request, "gw-alice"),
    )
    machine = setup.machine(ctx)
    [pending] = machine.receive(request)
    [challenge] = machine.messages_to_send()
    assert isinstance(challenge, AuthenticateRequest)
    assert [e.status for e in challenge.entries] == [
        ErrorCode.OK,
        ErrorCode.OK,
        ErrorCode.UNKNOWN_ENTITY,
    ]
    assert store.reads == ["entities", "tks"]

    assert isinstance(pending, EstablishmentPending)
    store.write(lambda tx: setup.persist(tx, pending, FIXED_NOW))
    store.reads.clear()
    response = AuthenticateResponse(
        txid=bytes([1]) * 16,
        src="gw-alice",
        dst=SERVER_ID,
        est_id=pending.est_id,
        entries=(
            AuthProof(pne_id="rh-1", status=ErrorCode.TIMEOUT),
            AuthProof(pne_id="tk-1", status=ErrorCode.TIMEOUT),
        ),
    )
    loaded = complete.load(store, response, "gw-alice")
    assert isinstance(loaded, Prefetched)
    assert set(loaded.entities) == {"gw-alice", "rh-1", "tk-1"}
    assert set(loaded.tks) == {"tk-1"}
    machine = complete.machine(dataclasses.replace(ctx, loaded=loaded))
    machine.receive(response)
    assert store.reads == ["entities", "tks"]
