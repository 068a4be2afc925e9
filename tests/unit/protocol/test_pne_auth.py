"""cpns.protocol.pne_auth: the rand/hash derivations of 002 §7.5.4 and the LocalEUKey
copies (docs/wire.md section 8.10), checked against an independent computation."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import pytest
from tests.helpers import ref_hkdf, ref_parts

from cpns.errors import AuthenticationFailed, LocalProtocolError
from cpns.protocol import pne_auth
from cpns.protocol.pne_auth import (
    ESTABLISHMENT,
    LOCAL,
    AuthContext,
    RandHashResponder,
    open_local_eukey,
    prove,
    seal_local_eukey,
    verify_proof,
    verify_server,
)

K = bytes(range(32))
RP, RS = b"\x11" * 32, b"\x22" * 32
CTX = AuthContext(pn_id="pn-1", gw_id="gw-alice", server_id="cpns-server", pne_id="pne-1")


def test_values_are_the_documented_derivation() -> None:
    """002 §7.5.4.1/§7.5.4.3 as docs/wire.md 8.10 instantiates them: SK = HKDF(K, rand_PNE ||
    rand_server, ctx), hash_PNE = MAC(K, ctx, rands, SK), hash_server = MAC(..., hash_PNE)."""
    info = ref_parts("cpns/v1/pne-session-key", *CTX.parts())
    sk = ref_hkdf(K, salt=RP + RS, info=info, length=32)
    h_pne = hmac.new(
        K, ref_parts("cpns/v1/hash-pne", *CTX.parts(), RP, RS, sk), hashlib.sha256
    ).digest()
    h_srv = hmac.new(
        K, ref_parts("cpns/v1/hash-server", *CTX.parts(), RP, RS, sk, h_pne), hashlib.sha256
    ).digest()
    proof = prove(K, ctx=CTX, rand_pne=RP, rand_server=RS, labels=ESTABLISHMENT)
    assert (proof.sk, proof.hash_pne) == (sk, h_pne)
    verdict = verify_proof(
        K, ctx=CTX, rand_pne=RP, rand_server=RS, hash_pne_value=h_pne, labels=ESTABLISHMENT
    )
    assert (verdict.sk, verdict.hash_server) == (sk, h_srv)
    verify_server(
        K,
        ctx=CTX,
        rand_pne=RP,
        rand_server=RS,
        proof=proof,
        hash_server_value=h_srv,
        labels=ESTABLISHMENT,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"key": bytes(32)},
        {"rand_pne": b"\x12" * 32},
        {"rand_server": b"\x23" * 32},
        {"ctx": dataclasses.replace(CTX, pne_id="pne-2")},
        {"ctx": dataclasses.replace(CTX, pn_id="pn-2")},
        {"ctx": dataclasses.replace(CTX, gw_id="gw-bob")},
        {"labels": LOCAL},
    ],
    ids=["key", "rand_pne", "rand_server", "pne", "pn", "gw", "labels"],
)
def test_any_other_input_fails_opaquely(change: dict[str, object]) -> None:
    """002 §7.5.4.3: hash_PNE verifies only from the same rands, key and context; a value
    moved to another PNE, PN or PN GW, or from "7.5.5", is one AuthenticationFailed."""
    good = prove(K, ctx=CTX, rand_pne=RP, rand_server=RS, labels=ESTABLISHMENT)
    args: dict[str, object] = {
        "key": K,
        "ctx": CTX,
        "rand_pne": RP,
        "rand_server": RS,
        "labels": ESTABLISHMENT,
    }
    args.update(change)
    key = args.pop("key")
    with pytest.raises(AuthenticationFailed) as info:
        verify_proof(key, hash_pne_value=good.hash_pne, **args)  # type: ignore[arg-type]
    assert info.value.code == 200


def test_local_labels_and_context_differ() -> None:
    """Ours ("7.5.5"): the LocalEUKey exchange has its own labels and "pngw" in the server's
    slot, so no establishment value is a local one."""
    local = AuthContext.local(pn_id="pn-1", gw_id="gw-alice", pne_id="pne-1")
    assert local.parts() == ("pn-1", "gw-alice", pne_auth.LOCAL_SERVER_ROLE, "pne-1")
    assert {LOCAL.session_key, LOCAL.hash_pne, LOCAL.hash_server}.isdisjoint(
        {ESTABLISHMENT.session_key, ESTABLISHMENT.hash_pne, ESTABLISHMENT.hash_server}
    )
    a = prove(K, ctx=local, rand_pne=RP, rand_server=RS, labels=LOCAL)
    b = prove(K, ctx=local, rand_pne=RP, rand_server=RS, labels=ESTABLISHMENT)
    assert a.hash_pne != b.hash_pne
    assert a.sk != b.sk


def test_responder_answers_once_and_checks_the_verifier() -> None:
    """002 §7.5.4.1: the PNE's side, shared by PN Establishment and "7.5.5": the same answer
    to a repeated challenge, a second rand_server refused, hash_server checked, SK returned;
    nothing secret in its repr."""
    responder = RandHashResponder(key=K, ctx=CTX, rand_pne=RP, labels=ESTABLISHMENT)
    with pytest.raises(LocalProtocolError):
        responder.accept(b"\x00" * 32)
    h = responder.answer(RS)
    assert responder.answer(RS) == h
    with pytest.raises(AuthenticationFailed):
        responder.answer(b"\x33" * 32)
    verdict = verify_proof(
        K, ctx=CTX, rand_pne=RP, rand_server=RS, hash_pne_value=h, labels=ESTABLISHMENT
    )
    with pytest.raises(AuthenticationFailed):
        responder.accept(bytes(32))
    assert responder.accept(verdict.hash_server) == verdict.sk
    assert K.hex() not in repr(responder)
    assert verdict.sk.hex() not in repr(verdict)


def test_inputs_are_checked() -> None:
    """A key or rand of the wrong length is the caller's mistake."""
    with pytest.raises(LocalProtocolError):
        prove(K[:16], ctx=CTX, rand_pne=RP, rand_server=RS, labels=ESTABLISHMENT)
    with pytest.raises(LocalProtocolError):
        prove(K, ctx=CTX, rand_pne=RP[:16], rand_server=RS, labels=ESTABLISHMENT)


WHERE = {
    "server_id": "cpns-server",
    "gw_id": "gw-alice",
    "pne_id": "pne-1",
    "pn_id": "pn-1",
    "est_id": b"\x44" * 16,
}


def test_local_eukey_copies_open_only_for_their_holder() -> None:
    """002 §7.5.4.3: one copy under the PNE's EUKey, one under the PN GW's; each opens with
    its holder's key and context only (a copy handed to the other holder, or moved to
    another establishment, is one AuthenticationFailed)."""
    local, pne_key, gw_key = b"\x55" * 32, b"\x66" * 32, b"\x77" * 32
    nonce = b"\x01" * 12
    copy_pne = seal_local_eukey(pne_key, local, holder_id="pne-1", nonce=nonce, **WHERE)  # type: ignore[arg-type]
    copy_gw = seal_local_eukey(gw_key, local, holder_id="gw-alice", nonce=nonce, **WHERE)  # type: ignore[arg-type]
    assert open_local_eukey(pne_key, copy_pne, holder_id="pne-1", **WHERE) == local  # type: ignore[arg-type]
    assert open_local_eukey(gw_key, copy_gw, holder_id="gw-alice", **WHERE) == local  # type: ignore[arg-type]
    with pytest.raises(AuthenticationFailed):
        open_local_eukey(gw_key, copy_pne, holder_id="gw-alice", **WHERE)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationFailed):
        open_local_eukey(pne_key, copy_pne, holder_id="gw-alice", **WHERE)  # type: ignore[arg-type]
    moved = {**WHERE, "est_id": b"\x45" * 16}
    with pytest.raises(AuthenticationFailed):
        open_local_eukey(pne_key, copy_pne, holder_id="pne-1", **moved)  # type: ignore[arg-type]
