"""003 machines at a TK ratchet step t > 0: the re-assignment after TK-based
authentications (docs/procedures/eukey-assignment.md "Re-assignment after TK-based
authentications", tk-authentication.md rule 7, deviations D-003-13)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.helpers import (
    FIXED_NOW,
    GATEWAY_KEYS,
    PASSWORDS,
    TKS,
    WRONG_CLAIM_CODE,
    Directory,
    FixedRandom,
    claim_key_for,
)

from cpns.crypto.keywrap import open_sealed, seal
from cpns.errors import ErrorCode
from cpns.messages.codec import decode_record
from cpns.messages.model import (
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    KeyBundle,
)
from cpns.protocol._machine import ProcedureFailed
from cpns.protocol.key_assignment import (
    NOTIFICATION_PURPOSE,
    RESPONSE_PURPOSE,
    AssignmentPolicy,
    DeviceState,
    EUKeyAssignmentDevice,
    EUKeyAssignmentGateway,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    EUKeyInstalled,
    EUKeySetReceived,
    HeldKey,
    claim_key,
)
from cpns.protocol.tk_auth import REASSIGN_WINDOW, PNETKPending, PNETKState, ratchet
from cpns.records import TKRecord
from cpns.types import EntityKind

type KeyOf = Callable[[str, str], bytes]

GW, PNE, USER, SERVER_ID = "gw-alice", "pne-1", "alice", "cpns-server"
TXID = bytes(range(16))
EUKEY = bytes([0xE1]) * 32


def _ratcheted(world: Directory, step: int, *, owner: str | None = USER) -> None:
    """The server after ``step`` TK-based authentications of pne-1 (assigned to ``owner``)."""
    world.tks[PNE] = TKRecord(entity_id=PNE, tk=ratchet(TKS[PNE], step), tk_step=step)
    if owner is not None:
        world.add_entity(
            PNE,
            EntityKind.PNE,
            owner,
            eukeys=(bytes(32), bytes([1]) * 32),
            key_index=2,
            assigned_via=GW if owner == USER else "gw-bob",
            epoch=1,
        )


def _request(password_key: KeyOf, *, code_key: bytes) -> EUKeyAssignmentRequest:
    gateway = EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER_ID, rng=FixedRandom(1)
    )
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=code_key,
        now=FIXED_NOW,
    )
    assert gateway.request is not None
    return gateway.request


def _serve(world: Directory, request: EUKeyAssignmentRequest) -> tuple[list[object], object]:
    server = EUKeyAssignmentServer(
        policy=AssignmentPolicy(chain_length=2),
        lookups=world.lookups(),
        requester=GW,
        rng=FixedRandom(2),
        now=FIXED_NOW,
    )
    events = server.receive(request)
    (response,) = server.messages_to_send()
    return list(events), response


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_server_seals_its_ratcheted_tk_with_its_step(
    world: Directory, password_key: KeyOf, step: int
) -> None:
    """Rule 7 / D-003-13: the KeyBundle carries the server's TK_s and s; the new chain
    (length 2 by policy) is assigned with the next epoch; nothing touches the TK record
    (the server's step does not change), and the label's code is not needed for the
    user's own PNE once the record is ratcheted."""
    _ratcheted(world, step)
    events, response = _serve(world, _request(password_key, code_key=claim_key(WRONG_CLAIM_CODE)))
    assert isinstance(response, EUKeyAssignmentResponse)
    assert response.status is ErrorCode.OK
    assert response.sealed_bundle is not None
    bundle = decode_record(
        KeyBundle,
        open_sealed(
            GATEWAY_KEYS[GW],
            response.sealed_bundle,
            purpose=RESPONSE_PURPOSE,
            context=(SERVER_ID, GW, PNE, response.txid),
        ),
    )
    assert bundle.tk == ratchet(TKS[PNE], step)
    assert bundle.tk_step == step
    assert bundle.epoch == 2
    assert len(bundle.eukeys) == 2
    (chain,) = [e for e in events if isinstance(e, EUKeyChainAssigned)]
    assert (chain.epoch, chain.expected_epoch) == (2, 1)
    assert world.tks[PNE].tk_step == step


def test_server_at_step_zero_still_needs_the_claim(world: Directory, password_key: KeyOf) -> None:
    """D-003-10 unchanged before any ratchet: a wrong code is CLAIM_NOT_PROVEN even for the
    user's own PNE; the right code gives a bundle at step 0."""
    _ratcheted(world, 0)
    _, refused = _serve(world, _request(password_key, code_key=claim_key(WRONG_CLAIM_CODE)))
    assert isinstance(refused, EUKeyAssignmentResponse)
    assert refused.status is ErrorCode.CLAIM_NOT_PROVEN
    _, accepted = _serve(world, _request(password_key, code_key=claim_key_for(PNE)))
    assert isinstance(accepted, EUKeyAssignmentResponse)
    assert accepted.status is ErrorCode.OK


@pytest.mark.parametrize("owner", [None, "bob"], ids=["never-assigned", "another-users"])
def test_ratcheted_record_of_a_pne_not_this_users_is_claim_not_proven(
    world: Directory, password_key: KeyOf, owner: str | None
) -> None:
    """D-003-13: with the claim uncheckable, only the user's own assigned PNE is
    re-assigned; anything else is CLAIM_NOT_PROVEN, the same answer as a wrong code (the
    owner is not revealed), and no key material."""
    _ratcheted(world, 4, owner=owner)
    events, response = _serve(world, _request(password_key, code_key=claim_key_for(PNE)))
    assert isinstance(response, EUKeyAssignmentResponse)
    assert response.status is ErrorCode.CLAIM_NOT_PROVEN
    assert response.sealed_bundle is None
    assert not any(isinstance(e, EUKeyChainAssigned) for e in events)


def test_gateway_stores_the_step_and_the_notification_names_it(
    world: Directory, password_key: KeyOf
) -> None:
    """Rule 7: the PN GW reports the set with TK_s and s (it restarts its TK state there)
    and the Notification names s, sealed under TK_s with s in the associated data."""
    _ratcheted(world, 6)
    gateway = EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER_ID, rng=FixedRandom(1)
    )
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key(WRONG_CLAIM_CODE),
        now=FIXED_NOW,
    )
    (request,) = gateway.messages_to_send()
    assert isinstance(request, EUKeyAssignmentRequest)
    _, response = _serve(world, request)
    assert isinstance(response, EUKeyAssignmentResponse)
    (stored,) = gateway.receive(response)
    assert isinstance(stored, EUKeySetReceived)
    assert (stored.tk, stored.tk_step) == (ratchet(TKS[PNE], 6), 6)
    (note,) = gateway.messages_to_send()
    assert isinstance(note, EUKeyAssignmentNotification)
    assert note.tk_step == 6
    assert note.sealed_eukey is not None
    plain = open_sealed(
        stored.tk,
        note.sealed_eukey,
        purpose=NOTIFICATION_PURPOSE,
        context=(GW, PNE, note.txid, 1, stored.epoch, 6),
    )
    assert plain == stored.eukeys[0]


def _notification(
    step: int, *, tk: bytes | None = None, named: int | None = None, epoch: int = 2
) -> EUKeyAssignmentNotification:
    """A Notification sealed under TK_step (as a PN GW would), naming ``named`` (default
    ``step``)."""
    key = ratchet(TKS[PNE], step) if tk is None else tk
    sealed = seal(
        key,
        EUKEY,
        purpose=NOTIFICATION_PURPOSE,
        context=(GW, PNE, TXID, 1, epoch, step),
        nonce=bytes(12),
    )
    return EUKeyAssignmentNotification(
        txid=TXID,
        src=GW,
        dst=PNE,
        status=ErrorCode.OK,
        key_index=1,
        sealed_eukey=sealed,
        epoch=epoch,
        tk_step=step if named is None else named,
    )


def _state(step: int, *, index: int = 2, pending: bool = False) -> PNETKState:
    return PNETKState(
        tk=ratchet(TKS[PNE], step),
        tk_step=step,
        eukey=bytes([9]) * 32,
        key_index=index,
        pending=PNETKPending(tk_step=step + 1, key_index=index + 1, eukey=bytes([8]) * 32)
        if pending
        else None,
    )


def _device(state: PNETKState | None) -> EUKeyAssignmentDevice:
    return EUKeyAssignmentDevice(entity_id=PNE, tk=TKS[PNE], rng=FixedRandom(3), tk_state=state)


@pytest.mark.parametrize(
    ("held", "step"),
    [(None, 0), (None, 7), (0, 3), (2, 2), (2, 9), (5, 5 + 8 + 1), (3, 3 + 100)],
)
def test_pne_opens_a_notification_at_step_t_from_its_state(held: int | None, step: int) -> None:
    """Rule 7: the PNE computes TK_t forward from its confirmed TK (or the manufacturer TK
    at step 0 before any state), opens EUKey_1 and reports its new TK-flow state (TK_t, t,
    EUKey_1, 1, nothing pending) with the key, then acknowledges."""
    device = _device(None if held is None else _state(held, pending=True))
    events = device.receive(_notification(step))
    assert events == [
        EUKeyInstalled(
            gateway_id=GW,
            key_index=1,
            eukey=EUKEY,
            txid=TXID,
            epoch=2,
            tk_state=PNETKState(tk=ratchet(TKS[PNE], step), tk_step=step, eukey=EUKEY, key_index=1),
        )
    ]
    (ack,) = device.messages_to_send()
    assert isinstance(ack, EUKeyAssignmentAck)
    assert ack.status is ErrorCode.OK


def test_notification_outside_the_window_is_refused_cleanly() -> None:
    """Rule 7: a Notification at a step behind the PNE's confirmed step (TK cannot be
    computed backwards), or more than REASSIGN_WINDOW ahead (no unbounded hashing on a
    forged step), is refused with STALE_CREDENTIAL in the Ack, installs nothing, and the
    machine ends FAILED without raising."""
    for held, step in ((4, 3), (0, REASSIGN_WINDOW + 1), (10, 10 + REASSIGN_WINDOW + 1)):
        device = _device(_state(held))
        events = device.receive(_notification(step, tk=bytes(32)))
        assert [type(e) for e in events] == [ProcedureFailed]
        assert isinstance(events[0], ProcedureFailed)
        assert events[0].code is ErrorCode.STALE_CREDENTIAL
        assert device.state is DeviceState.FAILED
        (ack,) = device.messages_to_send()
        assert isinstance(ack, EUKeyAssignmentAck)
        assert ack.status is ErrorCode.STALE_CREDENTIAL
        assert ack.proof is None


def test_a_relay_cannot_rename_the_step() -> None:
    """The step is bound into the seal: a Notification sealed at t but naming another
    step opens under another TK and fails opaquely (AUTHENTICATION_FAILED)."""
    device = _device(_state(1))
    events = device.receive(_notification(3, named=4))
    assert [getattr(e, "code", None) for e in events] == [ErrorCode.AUTHENTICATION_FAILED]


def test_a_notification_without_a_step_is_step_zero() -> None:
    """Wire compatibility: a Notification of a PN GW that names no step is at step 0 (the
    manufacturer TK), as before steps existed."""
    note = _notification(0)
    note = EUKeyAssignmentNotification(
        txid=note.txid,
        src=note.src,
        dst=note.dst,
        status=note.status,
        key_index=1,
        sealed_eukey=note.sealed_eukey,
        epoch=2,
    )
    events = _device(None).receive(note)
    assert [type(e) for e in events] == [EUKeyInstalled]


def test_a_16_byte_manufacturer_tk_still_installs_without_tk_flow_state() -> None:
    """003 unchanged for a TK of another size (16..64 bytes): the key installs; no TK-flow
    state is reported (the TK flow's keys are 32 bytes)."""
    tk16 = TKS["pne-2"]
    sealed = seal(
        tk16,
        EUKEY,
        purpose=NOTIFICATION_PURPOSE,
        context=(GW, "pne-2", TXID, 1, 1, 0),
        nonce=bytes(12),
    )
    note = EUKeyAssignmentNotification(
        txid=TXID,
        src=GW,
        dst="pne-2",
        status=ErrorCode.OK,
        key_index=1,
        sealed_eukey=sealed,
        epoch=1,
        tk_step=0,
    )
    device = EUKeyAssignmentDevice(entity_id="pne-2", tk=tk16, rng=FixedRandom(3))
    (event,) = device.receive(note)
    assert isinstance(event, EUKeyInstalled)
    assert event.tk_state is None


def test_a_held_delivery_whose_ack_was_lost_is_acknowledged_after_the_tk_moved_on() -> None:
    """Rule 7 liveness: the PNE installed EUKey_1 at step 2, its Ack was lost, then TK-based
    authentications moved it to step 4; the PN GW re-sends the same Notification (step 2,
    which the PNE can no longer compute). The PNE acknowledges again with the key it holds
    (the Ack the PN GW verifies), installs nothing; a different delivery at that step is
    still refused."""
    note = _notification(2)
    held = HeldKey(txid=TXID, key_index=1, eukey=EUKEY, epoch=2)
    moved = PNETKState(tk=ratchet(TKS[PNE], 4), tk_step=4, eukey=EUKEY, key_index=1)
    device = EUKeyAssignmentDevice(
        entity_id=PNE, tk=TKS[PNE], rng=FixedRandom(3), current=held, tk_state=moved
    )
    assert device.receive(note) == []
    (ack,) = device.messages_to_send()
    assert isinstance(ack, EUKeyAssignmentAck)
    assert ack.status is ErrorCode.OK
    first = _device(None)
    first.receive(note)
    (original,) = first.messages_to_send()
    assert isinstance(original, EUKeyAssignmentAck)
    assert ack.proof == original.proof
    other = EUKeyAssignmentDevice(
        entity_id=PNE,
        tk=TKS[PNE],
        rng=FixedRandom(3),
        current=HeldKey(txid=b"\x05" * 16, key_index=1, eukey=EUKEY, epoch=2),
        tk_state=moved,
    )
    (failed,) = other.receive(note)
    assert isinstance(failed, ProcedureFailed)
    assert failed.code is ErrorCode.STALE_CREDENTIAL
