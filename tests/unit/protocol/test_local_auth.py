"""cpns.protocol.local_auth: LocalEUKey authentication of a PNE and its PN GW, the "7.5.5"
002 §7.5.4 refers to (our definition, docs/wire.md section 3.4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from tests.helpers import FixedRandom
from tests.pn_world import GW_ID, PN_ID, World

from cpns.errors import ErrorCode
from cpns.messages.codec import decode, encode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import (
    LocalAuthRequest,
    LocalAuthResponse,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
)
from cpns.protocol import local_auth, pn_establishment, pne_auth
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.local_auth import (
    LocalAuthGateway,
    LocalAuthGatewayState,
    LocalAuthPNE,
    LocalSessionEstablished,
)

PNE_ID = "pne-r1"


def _after_establishment() -> World:
    world = World(30)
    world.add_rand_hash_pne(PNE_ID)
    world.add_tk_pne("pne-t1")
    world.establish(PNE_ID, ["pne-t1"], local={PNE_ID, "pne-t1"})
    return world


def _run(
    pne: LocalAuthPNE,
    gateway: LocalAuthGateway,
    tamper: Callable[[Message], Message | None] = lambda m: m,
) -> tuple[list[Event], list[Event]]:
    pne.start()
    queue = pne.messages_to_send()
    pne_events: list[Event] = []
    gw_events: list[Event] = []
    while queue:
        message = tamper(decode(encode(queue.pop(0))))
        if message is None:
            continue
        if message.dst == GW_ID and not gateway.terminal:
            gw_events += gateway.receive(message)
            queue += gateway.messages_to_send()
        elif message.dst != GW_ID and not pne.terminal:
            pne_events += pne.receive(message)
            queue += pne.messages_to_send()
    return pne_events, gw_events


def _machines(
    world: World, pne_id: str, *, key: bytes | None = None
) -> tuple[LocalAuthPNE, LocalAuthGateway]:
    own = world.pnes[pne_id].local_eukey
    assert own is not None
    pne = LocalAuthPNE(
        pne_id=pne_id, gw_id=GW_ID, pn_id=PN_ID, local_eukey=key or own, rng=FixedRandom(1)
    )
    gateway = LocalAuthGateway(
        gw_id=GW_ID, local_eukey=lambda p, n: world.gw_local.get((p, n)), rng=FixedRandom(2)
    )
    return pne, gateway


@pytest.mark.parametrize("pne_id", [PNE_ID, "pne-t1"])
def test_after_an_establishment_pne_and_gateway_authenticate_with_the_localeukey(
    pne_id: str,
) -> None:
    """002 §7.5.4.1/.2 ("7.5.5"): a PNE that got a LocalEUKey (either flow) and its PN GW
    run the rand/hash exchange with it, the PN GW in the server's part; both end with the
    same session key, and the exchange is the four messages of docs/wire.md 3.4."""
    world = _after_establishment()
    pne, gateway = _machines(world, pne_id)
    seen: list[Message] = []

    def record(message: Message) -> Message:
        seen.append(message)
        return message

    pne_events, gw_events = _run(pne, gateway, record)
    (a,) = pne_events
    (b,) = gw_events
    assert isinstance(a, LocalSessionEstablished)
    assert isinstance(b, LocalSessionEstablished)
    assert a.sk == b.sk
    assert (a.pne_id, a.gw_id, a.pn_id) == (pne_id, GW_ID, PN_ID)
    assert [type(m) for m in seen] == [
        LocalAuthRequest,
        PNEAuthenticateRequest,
        PNEAuthenticateResponse,
        LocalAuthResponse,
    ]
    assert len({m.txid for m in seen}) == 1
    challenge = seen[1]
    assert isinstance(challenge, PNEAuthenticateRequest)
    assert challenge.auth_flow is AuthFlow.LOCAL
    assert gateway.state is LocalAuthGatewayState.DONE
    assert a.sk.hex() not in repr(a)


def test_the_same_code_answers_and_verifies_both_procedures() -> None:
    """Issue 6 item 3 ("reuse the same machines"): the PNE side of both procedures is
    pne_auth.RandHashResponder and the verifier side pne_auth.verify_proof."""
    assert local_auth.RandHashResponder is pne_auth.RandHashResponder
    assert pn_establishment.pne.RandHashResponder is pne_auth.RandHashResponder
    assert local_auth.verify_proof is pne_auth.verify_proof
    assert pn_establishment.server.verify_proof is pne_auth.verify_proof


def _flip(cls: type[Message], **changes: object) -> Callable[[Message], Message]:
    def tamper(message: Message) -> Message:
        if isinstance(message, cls):
            return dataclasses.replace(message, **changes)  # type: ignore[arg-type]
        return message

    return tamper


@pytest.mark.parametrize(
    ("name", "tamper", "pne_code", "gw_code"),
    [
        ("hash-pne", _flip(PNEAuthenticateResponse, hash_pne=b"\x01" * 32), 200, 200),
        ("rand-pne", _flip(LocalAuthRequest, rand_pne=b"\x02" * 32), 200, 200),
        ("hash-gw", _flip(LocalAuthResponse, hash_server=b"\x03" * 32), 200, None),
        ("rand-gw", _flip(PNEAuthenticateRequest, rand_server=b"\x04" * 32), 200, 200),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_any_tampering_is_one_authentication_failure(
    name: str, tamper: Callable[[Message], Message], pne_code: int, gw_code: int | None
) -> None:
    """Ours ("7.5.5", as 002 §7.5.4): a changed rand or hash on the PAN fails the exchange
    with one opaque AUTHENTICATION_FAILED at whichever end checks it, and no session key."""
    world = _after_establishment()
    pne, gateway = _machines(world, PNE_ID)
    pne_events, gw_events = _run(pne, gateway, tamper)
    assert [e.code for e in pne_events if isinstance(e, ProcedureFailed)] == [pne_code]
    assert not [e for e in pne_events if isinstance(e, LocalSessionEstablished)]
    if gw_code is not None:
        assert [e.code for e in gw_events if isinstance(e, ProcedureFailed)] == [gw_code]


def test_a_wrong_localeukey_is_refused() -> None:
    """A PNE holding another LocalEUKey than its PN GW cannot authenticate (either end)."""
    world = _after_establishment()
    pne, gateway = _machines(world, PNE_ID, key=b"\x09" * 32)
    pne_events, gw_events = _run(pne, gateway)
    assert [type(e) for e in gw_events] == [ProcedureFailed]
    assert [e.code for e in pne_events] == [ErrorCode.AUTHENTICATION_FAILED]  # type: ignore[attr-defined]


def test_a_gateway_without_localeukey_answers_unknown_entity() -> None:
    """Ours: a PN GW holding no LocalEUKey for (PNE, PN) answers UNKNOWN_ENTITY at once."""
    world = _after_establishment()
    world.gw_local.clear()
    pne, gateway = _machines(world, PNE_ID)
    pne_events, gw_events = _run(pne, gateway)
    assert [e.code for e in gw_events] == [ErrorCode.UNKNOWN_ENTITY]  # type: ignore[attr-defined]
    assert [e.code for e in pne_events] == [ErrorCode.UNKNOWN_ENTITY]  # type: ignore[attr-defined]


def test_a_repeated_request_or_challenge_gets_the_same_answer() -> None:
    """Retries: the PN GW answers a repeated LocalAuthRequest with the same challenge; the
    PNE answers a repeated challenge with the same proof."""
    world = _after_establishment()
    pne, gateway = _machines(world, PNE_ID)
    pne.start()
    (request,) = pne.messages_to_send()
    gateway.receive(request)
    (challenge,) = gateway.messages_to_send()
    gateway.receive(request)
    assert gateway.messages_to_send() == [challenge]
    pne.receive(challenge)
    (answer,) = pne.messages_to_send()
    pne.receive(challenge)
    assert pne.messages_to_send() == [answer]
