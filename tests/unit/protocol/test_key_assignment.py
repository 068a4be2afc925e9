"""EUKey assignment for a PNE without UI (003 §7.4.2.2): server, PN GW and PNE machines.

Full happy paths run through :class:`tests.helpers.Exchange` (every message crosses the
real codec) and assert the complete event lists; the failure tables alter one request
field or one stored fact per row and assert the exact ErrorCode in both the
ProcedureFailed event and the reply, and the FAILED state (STYLE §8).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import (
    FIXED_NOW,
    GATEWAY_KEYS,
    PASSWORDS,
    SERVER_ID,
    TKS,
    WRONG_CLAIM_CODE,
    Directory,
    Exchange,
    FailedWith,
    FixedRandom,
    claim_key_for,
    ref_claim_code,
    ref_claim_proof,
    ref_parts,
)

from cpns.crypto.hashchain import build_chain, chain_step
from cpns.crypto.keywrap import seal
from cpns.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from cpns.messages.codec import encode, encode_record
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    KeyBundle,
    Message,
    PNEHello,
)
from cpns.protocol._checks import check_addressed, check_fresh, check_reply_to
from cpns.protocol._machine import NonceConsumed, ProcedureFailed, render_transitions
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    DeviceState,
    EUKeyAssignmentDevice,
    EUKeyAssignmentGateway,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    EUKeyDelivered,
    EUKeyInstalled,
    EUKeySetReceived,
    GatewayState,
    HeldKey,
    ServerState,
    auth_data,
    claim_code,
    claim_key,
    normalize_claim_code,
    request_digest,
    seed_pne,
)
from cpns.protocol.tk_auth import PNETKState
from cpns.types import EntityKind

GW, PNE, USER = "gw-alice", "pne-1", "alice"
TXID = bytes(range(16))
RAND = b"\x42" * 32
VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "crypto_v1.json").read_text(encoding="ascii")
)

type KeyOf = Callable[[str, str], bytes]


def ref_auth_data(
    password_key: bytes, rand: bytes, time: int, user: str, pne: str, gateway: str
) -> bytes:
    """AuthData of D-003-1 written out: HMAC(password key, label, RANDPNGW, Time, ids)."""
    msg = ref_parts("cpns/v1/003/auth-data", rand, time, user, pne, gateway)
    return hmac.new(password_key, msg, hashlib.sha256).digest()


def ref_ack_proof(
    eukey: bytes, gateway: str, pne: str, txid: bytes, index: int, epoch: int = 1
) -> bytes:
    """The acknowledgement proof of D-003-4 written out (with the epoch of D-003-11)."""
    msg = ref_parts("cpns/v1/003/ack", gateway, pne, txid, index, epoch)
    return hmac.new(eukey, msg, hashlib.sha256).digest()


def make_request(
    key_of: KeyOf,
    *,
    password: str = PASSWORDS[USER],
    user: str = USER,
    pne: str = PNE,
    src: str = GW,
    dst: str = SERVER_ID,
    time: int = FIXED_NOW,
    rand: bytes = RAND,
    txid: bytes = TXID,
    proof_for: dict[str, Any] | None = None,
    code: str | None = None,
    claim_for: dict[str, Any] | None = None,
) -> EUKeyAssignmentRequest:
    """A request whose AuthData and claim proof are computed independently (``proof_for``
    overrides the values the proofs cover, to move a proof to another request; ``code``
    the claim code typed, by default the one of the PNE's label)."""
    covered = {"rand": rand, "time": time, "user": user, "pne": pne, "gateway": src}
    covered.update(proof_for or {})
    if code is None:
        code = ref_claim_code(TKS[pne], pne) if pne in TKS else WRONG_CLAIM_CODE
    return EUKeyAssignmentRequest(
        txid=txid,
        src=src,
        dst=dst,
        pne_id=pne,
        user_id=user,
        time=time,
        rand_pngw=rand,
        auth_data=ref_auth_data(key_of(user, password), **covered),
        claim_proof=ref_claim_proof(code, **{**covered, **(claim_for or {})}),
    )


def new_server(
    world: Directory,
    *,
    requester: str = GW,
    now: int = FIXED_NOW,
    policy: AssignmentPolicy | None = None,
    seed: int = 2,
) -> EUKeyAssignmentServer:
    return EUKeyAssignmentServer(
        policy=policy or AssignmentPolicy(),
        lookups=world.lookups(),
        requester=requester,
        rng=FixedRandom(seed),
        now=now,
    )


def new_gateway(seed: int = 1, *, gateway_id: str = GW) -> EUKeyAssignmentGateway:
    return EUKeyAssignmentGateway(
        gateway_id=gateway_id,
        gateway_eukey=GATEWAY_KEYS[gateway_id],
        server_id=SERVER_ID,
        rng=FixedRandom(seed),
    )


def new_device(
    *,
    tk: bytes = TKS[PNE],
    current: HeldKey | None = None,
) -> EUKeyAssignmentDevice:
    return EUKeyAssignmentDevice(entity_id=PNE, tk=tk, rng=FixedRandom(3), current=current)


def installed(
    *,
    gateway_id: str,
    key_index: int,
    eukey: bytes,
    txid: bytes,
    epoch: int,
    tk: bytes = TKS[PNE],
    tk_step: int = 0,
) -> EUKeyInstalled:
    """The EUKeyInstalled a PNE reports, with its new TK-flow state (tk_auth.pne_reassigned)."""
    return EUKeyInstalled(
        gateway_id=gateway_id,
        key_index=key_index,
        eukey=eukey,
        txid=txid,
        epoch=epoch,
        tk_state=PNETKState(tk=tk, tk_step=tk_step, eukey=eukey, key_index=key_index),
    )


def expected_chain(server_seed: int, rand_pngw: bytes, n: int = 16) -> tuple[bytes, ...]:
    """The chain a server with FixedRandom(server_seed) derives: RANDSVR is its first draw."""
    rand_svr = FixedRandom(server_seed).token_bytes(32)
    return tuple(build_chain(seed_pne(rand_svr, rand_pngw), n))


# -- derivations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["auth_data_003"])
def test_auth_data_vector(vector: dict[str, Any]) -> None:
    """003 §7.4.2.1.1.1 step 3 / D-003-1: Hash(AuthData) = HMAC(Hash(Password), RANDPNGW, Time,
    User ID, PNE ID, PN GW ID); crypto_v1.json and an independent hmac computation."""
    args = {
        "rand_pngw": bytes.fromhex(vector["rand_pngw"]),
        "time": vector["time"],
        "user_id": vector["user_id"],
        "pne_id": vector["pne_id"],
        "gateway_id": vector["gateway_id"],
    }
    key = bytes.fromhex(vector["password_key"])
    assert auth_data(key, **args).hex() == vector["auth_data"]
    independent = ref_auth_data(key, *args.values())
    assert independent.hex() == vector["auth_data"]


@pytest.mark.parametrize("vector", VECTORS["seed_pne"])
def test_seed_pne_vector(vector: dict[str, Any]) -> None:
    """003 §7.4.2.1.1.2 step 4: SeedPNE = Hash(RANDSVR, RANDPNGW) (labelled SHA-256)."""
    rand_svr, rand_pngw = bytes.fromhex(vector["rand_svr"]), bytes.fromhex(vector["rand_pngw"])
    assert seed_pne(rand_svr, rand_pngw).hex() == vector["seed"]
    msg = ref_parts("cpns/v1/003/seed-pne", rand_svr, rand_pngw)
    assert hashlib.sha256(msg).hexdigest() == vector["seed"]


def test_claim_code_matches_the_written_derivation() -> None:
    """D-003-10: the label's claim code is base32(HMAC(TK, label, PNE ID)[:10]) in four
    groups of four, computed independently; its key and the proof match too."""
    for pne_id, tk in TKS.items():
        code = claim_code(tk, pne_id)
        assert code == ref_claim_code(tk, pne_id)
        assert len(code) == 19
        assert code.count("-") == 3
    code = claim_code(TKS[PNE], PNE)
    proof = ref_claim_proof(code, RAND, FIXED_NOW, USER, PNE, GW)
    request = make_request(lambda u, p: bytes(32), code=code)
    assert request.claim_proof == proof
    # Two PNEs, or one PNE under another TK, never share a code.
    assert claim_code(TKS[PNE], PNE) != claim_code(TKS[PNE], "pne-2")
    assert claim_code(TKS[PNE], PNE) != claim_code(TKS["pne-2"], PNE)


@pytest.mark.parametrize(
    "typed",
    [
        lambda c: c,
        lambda c: c.lower(),
        lambda c: c.replace("-", ""),
        lambda c: " ".join(c.split("-")),
        lambda c: c.replace("O", "0").replace("I", "1").replace("B", "8"),
    ],
    ids=["as-printed", "lower-case", "no-dashes", "spaces", "digits-for-letters"],
)
def test_claim_code_typing_is_forgiving(typed: Callable[[str], str]) -> None:
    """D-003-10: what a user types from a label maps to the same key (case, dashes, spaces
    and the look-alike digits 0/1/8 do not matter)."""
    code = "BOIB-ABCD-EFGH-2345"
    assert claim_key(typed(code)) == claim_key(code)
    assert normalize_claim_code(typed(code)) == "BOIBABCDEFGH2345"


@pytest.mark.parametrize("typed", ["", "ABCD", "ABCD-EFGH-IJKL-MNO9", "ABCD-EFGH-IJKL-MNOPQ"])
def test_claim_code_of_wrong_shape_is_refused(typed: str) -> None:
    """D-003-10: anything but 16 base32 characters is a usage error, not a wrong proof."""
    with pytest.raises(ValueError, match="claim code"):
        claim_key(typed)


def test_request_digest_is_sha256_of_the_encoding(password_key: KeyOf) -> None:
    """D-003-5: a retry is told from a reused txid by the SHA-256 of the request bytes."""
    request = make_request(password_key)
    assert request_digest(request) == hashlib.sha256(encode(request)).digest()


# -- happy path ----------------------------------------------------------------------------------


def test_full_assignment(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.1-3: request, response, notification, acknowledgement; every party
    ends DONE and reports exactly the facts to persist, in order."""
    gateway, server, device = new_gateway(), new_server(world), new_device()
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for(PNE),
        now=FIXED_NOW,
    )
    request = gateway.request
    assert request is not None
    exchange = Exchange({SERVER_ID: server, GW: gateway, PNE: device})
    events = exchange.run()

    eukeys = expected_chain(2, request.rand_pngw)
    assert events == [
        (SERVER_ID, NonceConsumed(nonce=request.rand_pngw, expires_at=FIXED_NOW + 300)),
        (
            SERVER_ID,
            EUKeyChainAssigned(
                pne_id=PNE, user_id=USER, gateway_id=GW, eukeys=eukeys, epoch=1, expected_epoch=0
            ),
        ),
        (
            GW,
            EUKeySetReceived(
                pne_id=PNE, user_id=USER, tk=TKS[PNE], eukeys=eukeys, key_index=1, epoch=1
            ),
        ),
        (
            PNE,
            installed(gateway_id=GW, key_index=1, eukey=eukeys[0], txid=request.txid, epoch=1),
        ),
        (GW, EUKeyDelivered(pne_id=PNE, key_index=1)),
    ]
    assert exchange.states() == {SERVER_ID: "DONE", GW: "DONE", PNE: "DONE"}
    assert [type(m) for _, m in exchange.transcript] == [
        EUKeyAssignmentRequest,
        EUKeyAssignmentResponse,
        EUKeyAssignmentNotification,
        EUKeyAssignmentAck,
    ]
    assert all(m.txid == request.txid for _, m in exchange.transcript)
    assert exchange.undelivered == []


def test_request_contents(password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.1 steps 2-4: the request carries PNE ID, User ID, Time, a fresh
    RANDPNGW and the AuthData over them; the txid is a fresh 16-byte value."""
    gateway = new_gateway(seed=7)
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for(PNE),
        now=FIXED_NOW,
    )
    twin = FixedRandom(7)
    rand, txid = twin.token_bytes(32), twin.token_bytes(16)
    key = password_key(USER, PASSWORDS[USER])
    expected = EUKeyAssignmentRequest(
        txid=txid,
        src=GW,
        dst=SERVER_ID,
        pne_id=PNE,
        user_id=USER,
        time=FIXED_NOW,
        rand_pngw=rand,
        auth_data=ref_auth_data(key, rand, FIXED_NOW, USER, PNE, GW),
        claim_proof=ref_claim_proof(ref_claim_code(TKS[PNE], PNE), rand, FIXED_NOW, USER, PNE, GW),
    )
    assert gateway.messages_to_send() == [expected]
    assert gateway.request == expected
    assert gateway.state is GatewayState.EXPECT_RESPONSE
    assert gateway.messages_to_send() == []  # the outbox drains


def test_chain_follows_the_seed(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.2 step 4: EUKey_n = Hash(SeedPNE) and EUKey_{i-1} = Hash(EUKey_i); the
    chain has the policy's n keys."""
    server = new_server(world, policy=AssignmentPolicy(chain_length=5), seed=9)
    events = server.receive(make_request(password_key))
    [assigned] = [e for e in events if isinstance(e, EUKeyChainAssigned)]
    rand_svr = FixedRandom(9).token_bytes(32)
    assert len(assigned.eukeys) == 5
    assert assigned.eukeys[-1] == chain_step(seed_pne(rand_svr, RAND))
    for i in range(4):
        assert chain_step(assigned.eukeys[i + 1]) == assigned.eukeys[i]


def test_response_bundle_is_sealed_for_the_gateway(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.2 step 7 / D-003-3: the OK Response carries Status and, sealed under the
    PN GW's EUKey, the TK and the EUKey set; the plaintext never appears in the message."""
    server = new_server(world)
    server.receive(make_request(password_key))
    [response] = server.messages_to_send()
    assert isinstance(response, EUKeyAssignmentResponse)
    assert (response.status, response.pne_id, response.txid) == (ErrorCode.OK, PNE, TXID)
    assert (response.src, response.dst) == (SERVER_ID, GW)
    assert response.sealed_bundle is not None
    assert TKS[PNE] not in response.sealed_bundle
    assert TKS[PNE].hex() not in json.dumps(response.body(), default=repr)


@pytest.mark.parametrize("offset", [-300, 300, 0])
def test_time_window_edges_accepted(world: Directory, password_key: KeyOf, offset: int) -> None:
    """D-003-5: a Time exactly time_window (300 s) before or after the server's clock is
    accepted; the nonce is remembered until Time + window."""
    server = new_server(world)
    events = server.receive(make_request(password_key, time=FIXED_NOW + offset))
    assert server.state is ServerState.DONE
    assert events[0] == NonceConsumed(nonce=RAND, expires_at=FIXED_NOW + offset + 300)


def test_assigning_again_to_an_owned_pne(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.2: a PNE already registered to the same user gets a fresh chain."""
    world.add_entity(PNE, EntityKind.PNE, USER, eukeys=(b"\x01" * 32,), key_index=1, epoch=4)
    server = new_server(world)
    events = server.receive(make_request(password_key))
    assert server.state is ServerState.DONE
    assert events[1] == EUKeyChainAssigned(
        pne_id=PNE,
        user_id=USER,
        gateway_id=GW,
        eukeys=expected_chain(2, RAND),
        epoch=5,
        expected_epoch=4,
    )


@pytest.mark.parametrize("n", [1, 16, 479, 480, 1024])
def test_every_accepted_chain_length_is_delivered(
    world: Directory, password_key: KeyOf, n: int
) -> None:
    """003 §7.4.2.1.1.2 steps 4 and 7: AssignmentPolicy accepts any n in 1..1024, and the
    Response must then carry the whole set (a KeyBundle holds up to 1024 EUKeys): the
    exchange completes for every accepted n instead of raising out of receive()."""
    gateway, server, device = (
        new_gateway(),
        new_server(world, policy=AssignmentPolicy(chain_length=n)),
        new_device(),
    )
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for(PNE),
        now=FIXED_NOW,
    )
    events = Exchange({SERVER_ID: server, GW: gateway, PNE: device}).run()
    assert [type(e).__name__ for _, e in events] == [
        "NonceConsumed",
        "EUKeyChainAssigned",
        "EUKeySetReceived",
        "EUKeyInstalled",
        "EUKeyDelivered",
    ]
    assert len(events[2][1].eukeys) == n  # type: ignore[attr-defined]


# -- server failure table ------------------------------------------------------------------------


def _other_pne_kind(world: Directory) -> None:
    world.add_entity(PNE, EntityKind.PN_GW, USER, eukeys=(b"\x01" * 32,), key_index=1)


SERVER_FAILURES: list[Any] = [
    # (id, alter the stored facts, request overrides, server overrides, code)
    # The PN GW's own user no longer exists: UNKNOWN_USER (003 §7.4.2.1.1.2 step 2).
    ("unknown-user", lambda w: w.users.pop(USER), {}, {}, ErrorCode.UNKNOWN_USER),
    # Any other user, existing or not, named through this PN GW: D-003-9.
    ("user-not-the-gateway-owner", None, {"user": "carol"}, {}, ErrorCode.NOT_AUTHORIZED),
    # D-SRV-1: after max_auth_failures failed proofs, even the right password is not tried.
    (
        "too-many-attempts",
        lambda w: w.auth_failures.update(alice=10),
        {},
        {},
        ErrorCode.TOO_MANY_ATTEMPTS,
    ),
    ("wrong-password", None, {"password": "not the password"}, {}, ErrorCode.WRONG_PASSWORD),
    (
        "proof-for-other-pne",
        None,
        {"pne": "pne-2", "proof_for": {"pne": PNE}},
        {},
        ErrorCode.WRONG_PASSWORD,
    ),
    (
        "proof-for-other-time",
        None,
        {"proof_for": {"time": FIXED_NOW - 1}},
        {},
        ErrorCode.WRONG_PASSWORD,
    ),
    (
        "proof-for-other-rand",
        None,
        {"proof_for": {"rand": b"\x43" * 32}},
        {},
        ErrorCode.WRONG_PASSWORD,
    ),
    (
        "disabled-user",
        lambda w: w.users.update(alice=dataclasses.replace(w.users["alice"], disabled=True)),
        {},
        {},
        ErrorCode.NOT_AUTHORIZED,
    ),
    # D-003-10: an Entity ID alone releases nothing; an unknown PNE reads the same.
    ("unknown-entity", None, {"pne": "pne-9"}, {}, ErrorCode.CLAIM_NOT_PROVEN),
    ("no-tk-record", lambda w: w.tks.pop(PNE), {}, {}, ErrorCode.CLAIM_NOT_PROVEN),
    ("wrong-claim-code", None, {"code": WRONG_CLAIM_CODE}, {}, ErrorCode.CLAIM_NOT_PROVEN),
    (
        "claim-code-of-another-pne",
        None,
        {"code": ref_claim_code(TKS["pne-2"], "pne-2")},
        {},
        ErrorCode.CLAIM_NOT_PROVEN,
    ),
    (
        "claim-proof-for-other-rand",
        None,
        {"claim_for": {"rand": b"\x43" * 32}},
        {},
        ErrorCode.CLAIM_NOT_PROVEN,
    ),
    (
        "claim-proof-for-other-gateway",
        None,
        {"claim_for": {"gateway": "gw-bob"}},
        {},
        ErrorCode.CLAIM_NOT_PROVEN,
    ),
    (
        "another-users-gateway-claims-an-unowned-pne",
        None,
        {"src": "gw-bob", "user": "bob", "password": PASSWORDS["bob"], "code": WRONG_CLAIM_CODE},
        {"requester": "gw-bob"},
        ErrorCode.CLAIM_NOT_PROVEN,
    ),
    (
        "entity-of-other-user",
        lambda w: w.add_entity(PNE, EntityKind.PNE, "bob"),
        {},
        {},
        ErrorCode.OWNED_BY_OTHER_USER,
    ),
    ("entity-of-wrong-kind", _other_pne_kind, {}, {}, ErrorCode.WRONG_ENTITY_KIND),
    (
        "gateway-as-its-own-pne",
        lambda w: w.add_tk(GW, b"\x07" * 32),
        {"pne": GW, "code": ref_claim_code(b"\x07" * 32, GW)},
        {},
        ErrorCode.WRONG_ENTITY_KIND,
    ),
    (
        "revoked-entity",
        lambda w: w.add_entity(PNE, EntityKind.PNE, USER, revoked=True),
        {},
        {},
        ErrorCode.ENTITY_REVOKED,
    ),
    (
        "revoked-gateway",
        lambda w: w.update_entity(GW, revoked=True),
        {},
        {},
        ErrorCode.ENTITY_REVOKED,
    ),
    (
        "requester-unknown",
        None,
        {"src": "gw-ghost"},
        {"requester": "gw-ghost"},
        ErrorCode.NOT_AUTHORIZED,
    ),
    (
        "requester-is-a-pne",
        lambda w: w.add_entity("pne-2", EntityKind.PNE, USER, eukeys=(b"\x02" * 32,), key_index=1),
        {"src": "pne-2"},
        {"requester": "pne-2"},
        ErrorCode.NOT_AUTHORIZED,
    ),
    (
        "requester-without-eukey",
        lambda w: w.update_entity(GW, eukeys=(), key_index=0),
        {},
        {},
        ErrorCode.NOT_AUTHORIZED,
    ),
    (
        "gateway-of-other-user",
        None,
        {"src": "gw-bob"},
        {"requester": "gw-bob"},
        ErrorCode.NOT_AUTHORIZED,
    ),
    ("src-is-not-the-requester", None, {}, {"requester": "gw-bob"}, ErrorCode.NOT_AUTHORIZED),
    ("stale-time-past", None, {"time": FIXED_NOW - 301}, {}, ErrorCode.STALE_TIME),
    ("stale-time-future", None, {"time": FIXED_NOW + 301}, {}, ErrorCode.STALE_TIME),
    ("stale-time-zero", None, {"time": 0}, {}, ErrorCode.STALE_TIME),
    (
        "narrow-window",
        None,
        {"time": FIXED_NOW - 11},
        {"policy": AssignmentPolicy(time_window=10)},
        ErrorCode.STALE_TIME,
    ),
    (
        "replayed-randpngw",
        lambda w: w.used_nonces.update({RAND: FIXED_NOW + 100}),
        {},
        {},
        ErrorCode.REPLAY,
    ),
    ("wrong-destination", None, {"dst": "other-server"}, {}, ErrorCode.WRONG_DESTINATION),
    (
        "server-of-other-id",
        None,
        {},
        {"policy": AssignmentPolicy(server_id="cpns-2")},
        ErrorCode.WRONG_DESTINATION,
    ),
    # Check order: authentication comes before anything about the PNE or the nonce, so an
    # unauthenticated request learns nothing about them.
    (
        "wrong-password-and-unknown-pne",
        None,
        {"pne": "pne-9", "password": "x"},
        {},
        ErrorCode.WRONG_PASSWORD,
    ),
    (
        "wrong-password-and-pne-of-other-user",
        lambda w: w.add_entity(PNE, EntityKind.PNE, "bob"),
        {"password": "x"},
        {},
        ErrorCode.WRONG_PASSWORD,
    ),
    (
        "wrong-password-and-replay",
        lambda w: w.used_nonces.update({RAND: 0}),
        {"password": "x"},
        {},
        ErrorCode.WRONG_PASSWORD,
    ),
    (
        "stale-and-wrong-password",
        None,
        {"time": FIXED_NOW + 301, "password": "x"},
        {},
        ErrorCode.STALE_TIME,
    ),
]


@pytest.mark.parametrize(
    ("alter", "request_kw", "server_kw", "code"),
    [pytest.param(*row[1:], id=row[0]) for row in SERVER_FAILURES],
)
def test_server_refusal(
    world: Directory,
    password_key: KeyOf,
    alter: Callable[[Directory], object] | None,
    request_kw: dict[str, Any],
    server_kw: dict[str, Any],
    code: ErrorCode,
) -> None:
    """003 §7.4.2.1.1.2 step 2 ("send the EUKey Assignment Response ... with fail status
    code"), D-003-5 and D-003-9: each refusal is one ProcedureFailed with its exact code, the
    machine is FAILED, the Response carries the same code and no bundle, and nothing is
    reported to persist."""
    if alter is not None:
        alter(world)
    request = make_request(password_key, **request_kw)
    server = new_server(world, **server_kw)
    events = server.receive(request)
    assert events == [FailedWith(code, "server")]
    assert server.state is ServerState.FAILED
    policy = server_kw.get("policy", AssignmentPolicy())
    assert server.messages_to_send() == [
        EUKeyAssignmentResponse(
            txid=request.txid,
            src=policy.server_id,
            dst=request.src,
            status=code,
            pne_id=request.pne_id,
        )
    ]
    with pytest.raises(LocalProtocolError):
        server.receive(request)


def test_gateway_of_another_user_learns_nothing_about_users(
    world: Directory, password_key: KeyOf
) -> None:
    """D-003-9 / D-004-2: distinct UNKNOWN_USER and WRONG_PASSWORD codes are justified only
    because the requester is "a Digest-authenticated PN GW of the user". A PN GW of bob
    naming alice (wrong password) or a user that does not exist must get NOT_AUTHORIZED,
    the same answer as with alice's right password; otherwise any enrolled PN GW can
    enumerate users and test another user's password online."""
    codes = {}
    for label, kw in {
        "unknown-user": {"user": "carol"},
        "wrong-password": {"password": "guess"},
        "right-password": {},
    }.items():
        server = new_server(world, requester="gw-bob")
        [event] = server.receive(make_request(password_key, src="gw-bob", **kw))
        assert isinstance(event, ProcedureFailed)
        codes[label] = event.code
    assert codes == dict.fromkeys(codes, ErrorCode.NOT_AUTHORIZED)


def test_server_refuses_other_messages(world: Directory) -> None:
    """STYLE §5: a message not in the server's table is UNEXPECTED_MESSAGE and FAILED; no
    Response is sent for something that was not a request."""
    server = new_server(world)
    ack = EUKeyAssignmentAck(txid=TXID, src=GW, dst=SERVER_ID, status=ErrorCode.OK, key_index=1)
    assert server.receive(ack) == [FailedWith(ErrorCode.UNEXPECTED_MESSAGE, "server")]
    assert server.state is ServerState.FAILED
    assert server.messages_to_send() == []


def test_server_fail_from_the_io_layer(world: Directory, password_key: KeyOf) -> None:
    """_machine.fail: the I/O layer ends a live machine (e.g. storage down) with a code; the
    procedure's failure reply is queued and ProcedureFailed returned."""
    server = new_server(world)
    request = make_request(password_key)
    events = server.fail(ErrorCode.INTERNAL_ERROR, "store unavailable", request)
    assert events == [
        ProcedureFailed(code=ErrorCode.INTERNAL_ERROR, reason="store unavailable", hop="server")
    ]
    assert server.terminal
    assert server.messages_to_send() == [
        EUKeyAssignmentResponse(
            txid=TXID, src=SERVER_ID, dst=GW, status=ErrorCode.INTERNAL_ERROR, pne_id=PNE
        )
    ]
    with pytest.raises(LocalProtocolError):
        server.fail(ErrorCode.INTERNAL_ERROR, "again")


@pytest.mark.parametrize(
    "kw",
    [
        {"chain_length": 0},
        {"chain_length": 1025},
        {"time_window": 0},
        {"time_window": 86401},
        {"max_auth_failures": 0},
        {"max_auth_failures": 1_000_001},
        {"auth_failure_window": 0},
        {"auth_failure_window": 7 * 86400 + 1},
    ],
)
def test_policy_validation(kw: dict[str, int]) -> None:
    """STYLE §5: configuration is validated with ValueError: n is 1..1024, the window
    1..86400 s, the guessing guard (D-SRV-1) 1..1000000 failures within 1 s..7 days."""
    with pytest.raises(ValueError, match=r"\w"):
        AssignmentPolicy(**kw)


# -- PN GW ---------------------------------------------------------------------------------------


def started(password_key: KeyOf, seed: int = 1) -> EUKeyAssignmentGateway:
    gateway = new_gateway(seed)
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for(PNE),
        now=FIXED_NOW,
    )
    return gateway


def served(world: Directory, gateway: EUKeyAssignmentGateway) -> EUKeyAssignmentResponse:
    """Run the gateway's outstanding request through a server; return the Response."""
    server = new_server(world)
    [request] = gateway.messages_to_send()
    server.receive(request)
    [response] = server.messages_to_send()
    assert isinstance(response, EUKeyAssignmentResponse)
    return response


def at_expect_ack(
    world: Directory, password_key: KeyOf
) -> tuple[EUKeyAssignmentGateway, EUKeyAssignmentNotification]:
    gateway = started(password_key)
    gateway.receive(served(world, gateway))
    [notification] = gateway.messages_to_send()
    assert isinstance(notification, EUKeyAssignmentNotification)
    return gateway, notification


def test_gateway_api_misuse(world: Directory, password_key: KeyOf) -> None:
    """STYLE §5: start() once, resume() only on a new machine, resend() only while a request
    is outstanding, renotify() only while a notification is; misuse is LocalProtocolError."""
    fresh = new_gateway()
    assert fresh.request is None
    with pytest.raises(LocalProtocolError):
        fresh.renotify()
    gateway = started(password_key)
    with pytest.raises(LocalProtocolError):
        gateway.start(
            pne_id=PNE,
            user_id=USER,
            password_key=b"k" * 32,
            claim_key=claim_key_for(PNE),
            now=FIXED_NOW,
        )
    with pytest.raises(LocalProtocolError):
        gateway.resume(
            EUKeySetReceived(
                pne_id=PNE, user_id=USER, tk=TKS[PNE], eukeys=(b"\x01" * 32,), key_index=1, epoch=1
            ),
            txid=TXID,
        )
    gateway.receive(served(world, gateway))
    assert gateway.state is GatewayState.EXPECT_ACK
    with pytest.raises(LocalProtocolError):
        gateway.resend(gateway.request)  # type: ignore[arg-type]


def test_gateway_resend_is_byte_identical(password_key: KeyOf) -> None:
    """D-003-5 idempotent retry: resend() queues the stored request unchanged (same txid,
    RANDPNGW and AuthData), so the server can answer it with the reply already sent."""
    gateway = started(password_key)
    [first] = gateway.messages_to_send()
    gateway.resend(first)  # type: ignore[arg-type]
    assert gateway.messages_to_send() == [first]
    rebuilt = new_gateway(seed=99)
    rebuilt.resend(first)  # type: ignore[arg-type]  # after a restart, from storage
    assert rebuilt.state is GatewayState.EXPECT_RESPONSE
    assert [encode(m) for m in rebuilt.messages_to_send()] == [encode(first)]


def test_notification_is_sealed_under_the_tk(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.3 steps 2-3 / D-003-6: the PN GW selects EUKey_1 and sends it encrypted
    with the TK; the EUKey never appears in the clear."""
    gateway, notification = at_expect_ack(world, password_key)
    eukeys = expected_chain(2, gateway.request.rand_pngw)  # type: ignore[union-attr]
    assert (notification.status, notification.key_index) == (ErrorCode.OK, 1)
    assert (notification.src, notification.dst, notification.txid) == (
        GW,
        PNE,
        gateway.request.txid,
    )  # type: ignore[union-attr]
    assert notification.sealed_eukey is not None
    assert eukeys[0] not in notification.sealed_eukey


def _tamper_bundle(response: EUKeyAssignmentResponse) -> EUKeyAssignmentResponse:
    blob = bytearray(response.sealed_bundle or b"")
    blob[-1] ^= 1
    return dataclasses.replace(response, sealed_bundle=bytes(blob))


def _reseal(
    plaintext: bytes, *, key: bytes = GATEWAY_KEYS[GW], txid_for: bytes | None = None
) -> Callable[[EUKeyAssignmentResponse], EUKeyAssignmentResponse]:
    def alter(response: EUKeyAssignmentResponse) -> EUKeyAssignmentResponse:
        context = (SERVER_ID, GW, PNE, (txid_for or response.txid))
        blob = seal(key, plaintext, purpose="003/response-bundle", context=context, nonce=bytes(12))
        return dataclasses.replace(response, sealed_bundle=blob)

    return alter


BUNDLE = encode_record(KeyBundle(tk=TKS[PNE], eukeys=(b"\x01" * 32,), epoch=1))

GATEWAY_RESPONSE_FAILURES: list[Any] = [
    pytest.param(_tamper_bundle, ErrorCode.AUTHENTICATION_FAILED, id="tampered-sealed-bundle"),
    pytest.param(
        _reseal(BUNDLE, key=GATEWAY_KEYS["gw-bob"]),
        ErrorCode.AUTHENTICATION_FAILED,
        id="bundle-sealed-for-other-gateway",
    ),
    pytest.param(
        _reseal(BUNDLE, txid_for=bytes(16)),
        ErrorCode.AUTHENTICATION_FAILED,
        id="bundle-of-other-transaction",
    ),
    pytest.param(_reseal(b"\xa0"), ErrorCode.MALFORMED_MESSAGE, id="bundle-not-a-key-bundle"),
    pytest.param(
        lambda r: dataclasses.replace(r, txid=bytes(16)),
        ErrorCode.UNEXPECTED_MESSAGE,
        id="response-for-another-txid",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, src="cpns-2"),
        ErrorCode.UNEXPECTED_MESSAGE,
        id="response-from-another-server",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, dst="gw-bob"),
        ErrorCode.UNEXPECTED_MESSAGE,
        id="response-to-another-gateway",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, pne_id="pne-2"),
        ErrorCode.UNEXPECTED_MESSAGE,
        id="response-about-another-pne",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, sealed_bundle=None),
        ErrorCode.MALFORMED_MESSAGE,
        id="ok-without-bundle",
    ),
] + [
    pytest.param(
        lambda r, code=code: dataclasses.replace(r, status=code, sealed_bundle=None),
        code,
        id=f"relayed-{code.name}",
    )
    for code in (
        ErrorCode.WRONG_PASSWORD,
        ErrorCode.UNKNOWN_USER,
        ErrorCode.UNKNOWN_ENTITY,
        ErrorCode.OWNED_BY_OTHER_USER,
        ErrorCode.STALE_TIME,
        ErrorCode.REPLAY,
        ErrorCode.INTERNAL_ERROR,
    )
]


@pytest.mark.parametrize(("alter", "code"), GATEWAY_RESPONSE_FAILURES)
def test_gateway_refuses_response(
    world: Directory,
    password_key: KeyOf,
    alter: Callable[[EUKeyAssignmentResponse], EUKeyAssignmentResponse],
    code: ErrorCode,
) -> None:
    """003 §7.4.2.1.1.3 / DESIGN §5: a Response that does not answer our request, does not
    open, or refuses, ends the PN GW's machine FAILED with that exact code (a server's
    verdict is relayed unchanged), nothing stored and no Notification sent."""
    gateway = started(password_key)
    response = alter(served(world, gateway))
    assert gateway.receive(response) == [FailedWith(code, "gateway")]
    assert gateway.state is GatewayState.FAILED
    assert gateway.messages_to_send() == []
    with pytest.raises(LocalProtocolError):
        gateway.receive(response)


def test_gateway_relays_server_refusal_end_to_end(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.2 step 2 + DESIGN §5: the server's fail status reaches the PN GW's
    event unchanged, and the PNE hears nothing."""
    gateway = new_gateway()
    gateway.start(
        pne_id="pne-9",
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for("pne-9"),
        now=FIXED_NOW,
    )
    device = new_device()
    exchange = Exchange({SERVER_ID: new_server(world), GW: gateway, PNE: device})
    assert exchange.run() == [
        (SERVER_ID, FailedWith(ErrorCode.CLAIM_NOT_PROVEN, "server")),
        (GW, FailedWith(ErrorCode.CLAIM_NOT_PROVEN, "gateway")),
    ]
    assert exchange.states() == {SERVER_ID: "FAILED", GW: "FAILED", PNE: "EXPECT_NOTIFICATION"}


def test_tampered_bundle_in_transit(world: Directory, password_key: KeyOf) -> None:
    """D-003-3: a bundle altered between server and PN GW is AUTHENTICATION_FAILED at the PN
    GW, after the server already reported the chain (the I/O layer keeps it; a retry with
    the same txid gets the stored reply)."""
    gateway = started(password_key)
    exchange = Exchange(
        {SERVER_ID: new_server(world), GW: gateway, PNE: new_device()},
        tamper=lambda m: _tamper_bundle(m) if isinstance(m, EUKeyAssignmentResponse) else m,
    )
    events = exchange.run()
    assert [type(e).__name__ for _, e in events] == [
        "NonceConsumed",
        "EUKeyChainAssigned",
        "ProcedureFailed",
    ]
    assert events[-1] == (GW, FailedWith(ErrorCode.AUTHENTICATION_FAILED, "gateway"))


def _ack(
    notification: EUKeyAssignmentNotification, eukey: bytes, **changes: Any
) -> EUKeyAssignmentAck:
    fields: dict[str, Any] = {
        "txid": notification.txid,
        "src": PNE,
        "dst": GW,
        "status": ErrorCode.OK,
        "key_index": notification.key_index,
        "proof": ref_ack_proof(eukey, GW, PNE, notification.txid, notification.key_index),
    }
    fields.update(changes)
    return EUKeyAssignmentAck(**fields)


ACK_FAILURES: list[Any] = [
    pytest.param({"proof": b"\x00" * 32}, ErrorCode.AUTHENTICATION_FAILED, id="bad-proof"),
    pytest.param(
        {"proof_key": b"\x02" * 32}, ErrorCode.AUTHENTICATION_FAILED, id="proof-under-other-key"
    ),
    pytest.param({"key_index": 2}, ErrorCode.UNEXPECTED_MESSAGE, id="ack-for-other-index"),
    pytest.param({"txid": bytes(16)}, ErrorCode.UNEXPECTED_MESSAGE, id="ack-for-other-txid"),
    pytest.param({"src": "pne-2"}, ErrorCode.NOT_AUTHORIZED, id="ack-from-other-pne"),
    pytest.param({"dst": "gw-bob"}, ErrorCode.WRONG_DESTINATION, id="ack-to-other-gateway"),
    pytest.param({"proof": None}, ErrorCode.MALFORMED_MESSAGE, id="ok-without-proof"),
    pytest.param(
        {"status": ErrorCode.AUTHENTICATION_FAILED, "proof": None},
        ErrorCode.AUTHENTICATION_FAILED,
        id="pne-could-not-open",
    ),
    pytest.param(
        {"status": ErrorCode.WRONG_DESTINATION, "proof": None},
        ErrorCode.WRONG_DESTINATION,
        id="pne-refused-other",
    ),
]


@pytest.mark.parametrize(("changes", "code"), ACK_FAILURES)
def test_gateway_refuses_ack(
    world: Directory, password_key: KeyOf, changes: dict[str, Any], code: ErrorCode
) -> None:
    """D-003-4: the PN GW accepts only an OK acknowledgement of this delivery, from this PNE,
    with a MAC under the delivered EUKey; anything else is FAILED with the exact code (a
    PNE's refusal code relayed)."""
    gateway, notification = at_expect_ack(world, password_key)
    eukey = expected_chain(2, gateway.request.rand_pngw)[0]  # type: ignore[union-attr]
    proof_key = changes.pop("proof_key", None)
    if proof_key is not None:
        changes["proof"] = ref_ack_proof(proof_key, GW, PNE, notification.txid, 1)
    assert gateway.receive(_ack(notification, eukey, **changes)) == [FailedWith(code, "gateway")]
    assert gateway.state is GatewayState.FAILED
    assert gateway.messages_to_send() == []


def test_gateway_accepts_the_right_ack(world: Directory, password_key: KeyOf) -> None:
    """D-003-4: an ack whose proof is HMAC(EUKey_1, label, PN GW, PNE, txid, 1) (computed
    independently here) completes the delivery."""
    gateway, notification = at_expect_ack(world, password_key)
    eukey = expected_chain(2, gateway.request.rand_pngw)[0]  # type: ignore[union-attr]
    assert gateway.receive(_ack(notification, eukey)) == [EUKeyDelivered(pne_id=PNE, key_index=1)]
    assert gateway.state is GatewayState.DONE
    assert gateway.terminal


def test_renotify_sends_a_fresh_seal_the_device_accepts(
    world: Directory, password_key: KeyOf
) -> None:
    """D-003-4: while unacknowledged, the PN GW re-sends the Notification (same txid and
    index, a new nonce) when the PNE reconnects; the PNE accepts it."""
    gateway, first = at_expect_ack(world, password_key)
    gateway.renotify()
    [second] = gateway.messages_to_send()
    assert isinstance(second, EUKeyAssignmentNotification)
    assert (second.txid, second.key_index) == (first.txid, first.key_index)
    assert second.sealed_eukey != first.sealed_eukey
    device = new_device()
    eukey = expected_chain(2, gateway.request.rand_pngw)[0]  # type: ignore[union-attr]
    assert device.receive(second) == [
        installed(gateway_id=GW, key_index=1, eukey=eukey, txid=first.txid, epoch=1)
    ]


def test_resume_after_restart(world: Directory, password_key: KeyOf) -> None:
    """003 §7.4.2.1.1.3 step 1 / D-003-4: the PN GW stored the set before notifying; a new
    machine resumed from it after a restart re-sends the Notification, the PNE installs the
    key and the acknowledgement completes the delivery."""
    gateway = started(password_key)
    [stored] = gateway.receive(served(world, gateway))
    assert isinstance(stored, EUKeySetReceived)
    txid = gateway.request.txid  # type: ignore[union-attr]
    del gateway  # the process died before the PNE answered

    resumed = new_gateway(seed=50)
    resumed.resume(stored, txid=txid)
    assert resumed.state is GatewayState.EXPECT_ACK
    device = new_device()
    exchange = Exchange({GW: resumed, PNE: device})
    assert exchange.run() == [
        (
            PNE,
            installed(gateway_id=GW, key_index=1, eukey=stored.eukeys[0], txid=txid, epoch=1),
        ),
        (GW, EUKeyDelivered(pne_id=PNE, key_index=1)),
    ]
    assert exchange.states() == {GW: "DONE", PNE: "DONE"}


@pytest.mark.parametrize("index", [2, 16])
def test_resume_with_a_later_key(world: Directory, password_key: KeyOf, index: int) -> None:
    """D-003-6: a resumed set whose selected position is i delivers EUKey_i (context binds i)."""
    eukeys = expected_chain(2, RAND)
    stored = EUKeySetReceived(
        pne_id=PNE, user_id=USER, tk=TKS[PNE], eukeys=eukeys, key_index=index, epoch=1
    )
    gateway = new_gateway()
    gateway.resume(stored, txid=TXID)
    exchange = Exchange({GW: gateway, PNE: new_device()})
    assert exchange.run() == [
        (
            PNE,
            installed(gateway_id=GW, key_index=index, eukey=eukeys[index - 1], txid=TXID, epoch=1),
        ),
        (GW, EUKeyDelivered(pne_id=PNE, key_index=index)),
    ]


def test_gateway_unexpected_messages(world: Directory, password_key: KeyOf) -> None:
    """STYLE §5: an Ack while waiting for the Response, or a Response while waiting for the
    Ack, is UNEXPECTED_MESSAGE and FAILED."""
    gateway = started(password_key)
    ack = EUKeyAssignmentAck(txid=TXID, src=PNE, dst=GW, status=ErrorCode.OK, key_index=1)
    assert gateway.receive(ack) == [FailedWith(ErrorCode.UNEXPECTED_MESSAGE, "gateway")]
    gateway, _ = at_expect_ack(world, password_key)
    response = EUKeyAssignmentResponse(
        txid=TXID, src=SERVER_ID, dst=GW, status=ErrorCode.OK, pne_id=PNE
    )
    assert gateway.receive(response) == [FailedWith(ErrorCode.UNEXPECTED_MESSAGE, "gateway")]
    assert gateway.state is GatewayState.FAILED


# -- PNE -----------------------------------------------------------------------------------------

EUKEYS = expected_chain(2, RAND)


def notification(
    *,
    txid: bytes = TXID,
    index: int = 1,
    eukey: bytes | None = None,
    tk: bytes = TKS[PNE],
    epoch: int = 1,
    tk_step: int = 0,
    **changes: Any,
) -> EUKeyAssignmentNotification:
    """A Notification sealed as the PN GW would (independently of the gateway machine)."""
    key = EUKEYS[index - 1] if eukey is None else eukey
    sealed = seal(
        tk,
        key,
        purpose="003/notification",
        context=(GW, PNE, txid, index, epoch, tk_step),
        nonce=bytes(12),
    )
    fields: dict[str, Any] = {
        "txid": txid,
        "src": GW,
        "dst": PNE,
        "status": ErrorCode.OK,
        "key_index": index,
        "sealed_eukey": sealed,
        "epoch": epoch,
        "tk_step": tk_step,
    }
    fields.update(changes)
    return EUKeyAssignmentNotification(**fields)


def test_device_installs_and_acknowledges() -> None:
    """003 §7.4.2.1.1.3 (PNE) step 1 / D-003-4: the PNE decrypts with the TK, reports the key
    to store, and acknowledges with HMAC(EUKey, PN GW, PNE, txid, index)."""
    device = new_device()
    assert device.receive(notification()) == [
        installed(gateway_id=GW, key_index=1, eukey=EUKEYS[0], txid=TXID, epoch=1)
    ]
    assert device.state is DeviceState.DONE
    assert device.messages_to_send() == [
        EUKeyAssignmentAck(
            txid=TXID,
            src=PNE,
            dst=GW,
            status=ErrorCode.OK,
            key_index=1,
            proof=ref_ack_proof(EUKEYS[0], GW, PNE, TXID, 1),
        )
    ]
    with pytest.raises(LocalProtocolError):
        device.receive(notification())


DEVICE_FAILURES: list[Any] = [
    pytest.param(
        {"tk": b"\x09" * 32}, {}, ErrorCode.AUTHENTICATION_FAILED, id="sealed-under-another-tk"
    ),
    pytest.param({}, {"key_index": 2}, ErrorCode.AUTHENTICATION_FAILED, id="index-altered"),
    pytest.param({}, {"txid": bytes(16)}, ErrorCode.AUTHENTICATION_FAILED, id="txid-altered"),
    pytest.param({}, {"src": "gw-bob"}, ErrorCode.AUTHENTICATION_FAILED, id="from-another-gateway"),
    # D-003-11: the epoch is bound into the seal; a relay cannot renumber an assignment.
    pytest.param({}, {"epoch": 7}, ErrorCode.AUTHENTICATION_FAILED, id="epoch-altered"),
    pytest.param({}, {"epoch": None}, ErrorCode.MALFORMED_MESSAGE, id="ok-without-epoch"),
    pytest.param(
        {}, {"sealed_eukey": b"\x01" * 61}, ErrorCode.AUTHENTICATION_FAILED, id="garbage-seal"
    ),
    pytest.param({}, {"dst": "pne-2"}, ErrorCode.WRONG_DESTINATION, id="for-another-pne"),
    pytest.param({}, {"sealed_eukey": None}, ErrorCode.MALFORMED_MESSAGE, id="ok-without-key"),
    pytest.param(
        {},
        {"status": ErrorCode.INTERNAL_ERROR, "sealed_eukey": None},
        ErrorCode.INTERNAL_ERROR,
        id="not-ok-status",
    ),
]


@pytest.mark.parametrize(("seal_kw", "changes", "code"), DEVICE_FAILURES)
def test_device_refuses_notification(
    seal_kw: dict[str, Any], changes: dict[str, Any], code: ErrorCode
) -> None:
    """D-003-4 / D-003-7: a Notification the PNE cannot open with its TK (or that is not for
    it) ends FAILED with the exact code, and the PNE queues an Ack carrying that code and
    no proof, so the PN GW stops re-sending; no key is reported."""
    base = notification(**seal_kw)
    message = dataclasses.replace(base, **changes)
    device = new_device()
    assert device.receive(message) == [FailedWith(code, "device")]
    assert device.state is DeviceState.FAILED
    assert device.messages_to_send() == [
        EUKeyAssignmentAck(
            txid=message.txid, src=PNE, dst=message.src, status=code, key_index=message.key_index
        )
    ]


def test_device_failure_reaches_the_gateway(world: Directory, password_key: KeyOf) -> None:
    """D-003-4: a PNE whose TK does not open the Notification answers AUTHENTICATION_FAILED,
    and the PN GW's machine ends with that code."""
    gateway = started(password_key)
    exchange = Exchange(
        {SERVER_ID: new_server(world), GW: gateway, PNE: new_device(tk=b"\x09" * 32)}
    )
    events = exchange.run()
    assert events[-2:] == [
        (PNE, FailedWith(ErrorCode.AUTHENTICATION_FAILED, "device")),
        (GW, FailedWith(ErrorCode.AUTHENTICATION_FAILED, "gateway")),
    ]
    assert exchange.states() == {SERVER_ID: "DONE", GW: "FAILED", PNE: "FAILED"}


def held(txid: bytes = TXID, index: int = 1, epoch: int = 1) -> HeldKey:
    """What a PNE holds after installing EUKey_index of assignment ``epoch``."""
    return HeldKey(txid=txid, key_index=index, eukey=EUKEYS[index - 1], epoch=epoch)


def test_redelivery_of_the_held_key_is_reacknowledged() -> None:
    """D-003-4 / D-003-11: a re-delivered Notification of the key the PNE holds (same
    epoch, txid and key: its acknowledgement was lost) is acknowledged again, without a new
    EUKeyInstalled."""
    device = new_device(current=held())
    assert device.receive(notification()) == []
    assert device.state is DeviceState.DONE
    assert device.messages_to_send() == [
        EUKeyAssignmentAck(
            txid=TXID,
            src=PNE,
            dst=GW,
            status=ErrorCode.OK,
            key_index=1,
            proof=ref_ack_proof(EUKEYS[0], GW, PNE, TXID, 1),
        )
    ]


OLD_TXID = bytes([0xEE]) * 16


@pytest.mark.parametrize(
    ("current", "message"),
    [
        # Issue 5 item 3: a Notification captured before delivery, then superseded by a
        # re-assignment the PNE installed (epoch 2), is refused however it is replayed.
        pytest.param(
            held(txid=TXID, epoch=2),
            notification(txid=OLD_TXID, index=1, epoch=1),
            id="superseded-assignment-new-txid",
        ),
        pytest.param(
            held(txid=TXID, index=2, epoch=2),
            notification(txid=OLD_TXID, index=1, epoch=1),
            id="superseded-assignment-older-key",
        ),
        pytest.param(
            held(txid=TXID, index=2, epoch=1),
            notification(txid=TXID, index=1, epoch=1),
            id="same-epoch-other-key",
        ),
        pytest.param(
            held(txid=TXID, epoch=3),
            notification(txid=OLD_TXID, index=1, epoch=3),
            id="same-epoch-other-txid",
        ),
    ],
)
def test_replayed_old_notification_is_refused(
    current: HeldKey, message: EUKeyAssignmentNotification
) -> None:
    """D-003-11: a recorded Notification of a superseded (lower-epoch) assignment, or one
    of the held epoch with other content, cannot roll the PNE back: REPLAY, FAILED, no
    key, an Ack with that code and no proof."""
    device = new_device(current=current)
    assert device.receive(message) == [FailedWith(ErrorCode.REPLAY, "device")]
    assert device.state is DeviceState.FAILED
    [ack] = device.messages_to_send()
    assert isinstance(ack, EUKeyAssignmentAck)
    assert (ack.status, ack.proof) == (ErrorCode.REPLAY, None)


@pytest.mark.parametrize("held_epoch", [0, 1, 41])
def test_newer_assignment_installs_its_key(held_epoch: int) -> None:
    """D-003-11: a Notification of a higher epoch installs its key even when the PNE holds
    one (epoch 0: a key stored before epochs existed)."""
    device = new_device(current=held(txid=OLD_TXID, epoch=held_epoch))
    assert device.receive(notification(index=2, epoch=held_epoch + 1)) == [
        installed(gateway_id=GW, key_index=2, eukey=EUKEYS[1], txid=TXID, epoch=held_epoch + 1)
    ]


def test_old_notification_replayed_after_reassignment_end_to_end(
    world: Directory, password_key: KeyOf
) -> None:
    """Issue 5 item 3 end to end over the real machines: Notification A (epoch 1) is captured
    before delivery; the user re-assigns (epoch 2) and the PNE installs it; replaying A is
    refused and the PNE keeps the key matching the server's current chain."""
    first = started(password_key)
    server = new_server(world)
    [request] = first.messages_to_send()
    world.apply(server.receive(request))
    first.receive(*server.messages_to_send())
    [captured] = first.messages_to_send()
    assert isinstance(captured, EUKeyAssignmentNotification)
    assert captured.epoch == 1
    second = new_gateway(seed=11)
    second.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for(PNE),
        now=FIXED_NOW,
    )
    server = new_server(world, seed=12)
    [request] = second.messages_to_send()
    world.apply(server.receive(request))
    assert world.entities[PNE].epoch == 2
    second.receive(*server.messages_to_send())
    [fresh] = second.messages_to_send()
    device = new_device()
    [installed] = device.receive(fresh)
    assert isinstance(installed, EUKeyInstalled)
    assert installed.epoch == 2
    holder = HeldKey(
        txid=installed.txid,
        key_index=installed.key_index,
        eukey=installed.eukey,
        epoch=installed.epoch,
    )
    replay = new_device(current=holder)
    assert replay.receive(captured) == [FailedWith(ErrorCode.REPLAY, "device")]
    assert holder.eukey == world.entities[PNE].eukeys[0]


@pytest.mark.parametrize(
    "message",
    [
        PNEHello(txid=TXID, src=GW, dst=PNE, has_ui=False, key_index=0),
        ErrorMessage(txid=TXID, src=GW, dst=PNE, status=ErrorCode.INTERNAL_ERROR),
        EUKeyAssignmentAck(txid=TXID, src=GW, dst=PNE, status=ErrorCode.OK, key_index=1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_device_unexpected_message(message: Message) -> None:
    """STYLE §5: anything but a Notification is UNEXPECTED_MESSAGE; only a Notification
    gets an Ack back."""
    device = new_device()
    assert device.receive(message) == [FailedWith(ErrorCode.UNEXPECTED_MESSAGE, "device")]
    assert device.state is DeviceState.FAILED
    assert device.messages_to_send() == []


# -- terminal means terminal ---------------------------------------------------------------------


def test_terminal_machines_raise(world: Directory, password_key: KeyOf) -> None:
    """STYLE §5: after DONE or FAILED every receive() raises LocalProtocolError, whatever the
    message, and nothing is queued."""
    done_device = new_device()
    done_device.receive(notification())
    done_device.messages_to_send()
    failed_server = new_server(world)
    failed_server.receive(make_request(password_key, password="x"))
    failed_server.messages_to_send()
    for machine in (done_device, failed_server):
        assert machine.terminal
        for message in (notification(), make_request(password_key)):
            with pytest.raises(LocalProtocolError):
                machine.receive(message)
        assert machine.messages_to_send() == []


# -- shared machinery: _checks and _machine ------------------------------------------------------


@pytest.mark.parametrize(
    ("sent_at", "ok"),
    [
        (FIXED_NOW, True),
        (FIXED_NOW - 300, True),
        (FIXED_NOW + 300, True),
        (FIXED_NOW - 301, False),
        (FIXED_NOW + 301, False),
    ],
)
def test_check_fresh(sent_at: int, ok: bool) -> None:
    """003 §7.4.2.1.1.1 step 3 / D-003-5: |now - Time| <= window passes, else STALE_TIME."""
    if ok:
        check_fresh(sent_at, now=FIXED_NOW, window=300)
    else:
        with pytest.raises(RemoteProtocolError) as info:
            check_fresh(sent_at, now=FIXED_NOW, window=300)
        assert info.value.code is ErrorCode.STALE_TIME


def test_check_addressed_and_reply_to() -> None:
    """_checks: wrong destination is WRONG_DESTINATION, wrong sender NOT_AUTHORIZED; a reply
    must match the request's txid and swap its parties (UNEXPECTED_MESSAGE otherwise)."""
    request = ErrorMessage(txid=TXID, src="a", dst="b", status=ErrorCode.OK)
    check_addressed(request, to="b", sender="a")
    check_addressed(request, to="b")
    with pytest.raises(RemoteProtocolError) as info:
        check_addressed(request, to="c")
    assert info.value.code is ErrorCode.WRONG_DESTINATION
    with pytest.raises(RemoteProtocolError) as info:
        check_addressed(request, to="b", sender="x")
    assert info.value.code is ErrorCode.NOT_AUTHORIZED
    check_reply_to(ErrorMessage(txid=TXID, src="b", dst="a", status=ErrorCode.OK), request)
    for reply in (
        ErrorMessage(txid=bytes(16), src="b", dst="a", status=ErrorCode.OK),
        ErrorMessage(txid=TXID, src="c", dst="a", status=ErrorCode.OK),
        ErrorMessage(txid=TXID, src="b", dst="c", status=ErrorCode.OK),
    ):
        with pytest.raises(RemoteProtocolError) as info:
            check_reply_to(reply, request)
        assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


@pytest.mark.parametrize(
    ("cls", "rows"),
    [
        (
            EUKeyAssignmentServer,
            ["| EXPECT_REQUEST | EUKeyAssignmentRequest | `_on_request` | DONE |"],
        ),
        (
            EUKeyAssignmentGateway,
            [
                "| EXPECT_RESPONSE | EUKeyAssignmentResponse | `_on_response` | EXPECT_ACK |",
                "| EXPECT_ACK | EUKeyAssignmentAck | `_on_ack` | DONE |",
            ],
        ),
        (
            EUKeyAssignmentDevice,
            ["| EXPECT_NOTIFICATION | EUKeyAssignmentNotification | `_on_notification` | DONE |"],
        ),
    ],
)
def test_render_transitions(cls: Any, rows: list[str]) -> None:
    """STYLE §5: the transition table is data, and docs render it as Markdown."""
    lines = render_transitions(cls).splitlines()
    assert lines[:2] == ["| state | message | handler | next state |", "|---|---|---|---|"]
    assert lines[2:-1] == rows
    assert lines[-1] == "| any other pair | | | FAILED (`UNEXPECTED_MESSAGE`) |"
