"""An independent PN GW + PNE peer, written from the public docs alone
(tests/interop/independent_peer.py), against the published vectors and a real
``cpns server``.

Rules checked: docs/wire.md sections 2, 3.2, 3.4, 7, 8.3, 8.7, 8.8, 8.10 and 8.11;
docs/procedures/pn-establishment.md (002 §7.5.4 rand/hash, the LocalEUKey);
docs/procedures/tk-authentication.md (000 §7.5 TK flow). The peer imports nothing of
``cpns``; this test uses ``cpns.localnet`` only to start the server and create users
and TK records (the operator's CLI), never for the exchange.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cbor2
import pytest
from tests.interop import independent_peer as peer

from cpns.localnet import LocalDeployment

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
PROTOCOL = json.loads((VECTORS / "protocol_v1.json").read_text())
CRYPTO = json.loads((VECTORS / "crypto_v1.json").read_text())
PASSWORD = "correct horse battery"


def _b(h: str) -> bytes:
    return bytes.fromhex(h)


def _parts(typed: list[dict[str, Any]]) -> list[peer.Part]:
    out: list[peer.Part] = []
    for p in typed:
        ((kind, value),) = p.items()
        out.append(_b(value) if kind == "bytes" else value)
    return out


# -- the published vectors, byte for byte -----------------------------------------------


def test_rand_hash_derivations_match_the_vectors() -> None:
    """wire.md 8.10: SK, hash_PNE and hash_server of establishment_002, from the docs."""
    e = PROTOCOL["establishment_002"]
    for v in e["rand_hash"]:
        ctx = tuple(p["str"] for p in v["context"])
        key, rp, rs = _b(v["key"]), _b(v["rand_pne"]), _b(v["rand_server"])
        assert peer.P("cpns/v1/pne-session-key", *ctx).hex() == v["sk"]["info"]
        sk = peer.rh_sk(key, ctx, rp, rs)
        assert sk.hex() == v["sk"]["key"]
        hp = peer.rh_hash_pne(key, ctx, rp, rs, sk)
        assert hp.hex() == v["hash_pne"]["tag"]
        assert peer.rh_hash_server(key, ctx, rp, rs, sk, hp).hex() == v["hash_server"]["tag"]


def test_local_eukey_copies_match_the_vectors() -> None:
    """wire.md 8.10 and 8.3: both LocalEUKey copies seal and open as documented."""
    e = PROTOCOL["establishment_002"]
    inputs = e["inputs"]
    for name, holder_key, holder in (
        ("local_eukey_copy_pne", _b(inputs["pnes"][0]["eukey"]), inputs["pnes"][0]["pne_id"]),
        ("local_eukey_copy_gw", _b(inputs["gateway_eukey"]), inputs["gateway_id"]),
    ):
        v = e[name]
        context = peer.local_eukey_context(
            inputs["server_id"],
            inputs["gateway_id"],
            inputs["pnes"][0]["pne_id"],
            inputs["pn_id"],
            _b(inputs["est_id"]),
            holder,
        )
        assert list(context) == _parts(v["context"])
        assert peer.seal_ad("local-eukey", *context).hex() == v["associated_data"]
        assert peer.seal_key(holder_key, "local-eukey").hex() == v["aead_key"]
        blob = peer.seal(
            holder_key, _b(v["plaintext"]), "local-eukey", *context, nonce=_b(v["nonce"])
        )
        assert blob.hex() == v["blob"]
        assert peer.open_local_eukey(
            holder_key,
            blob,
            inputs["server_id"],
            inputs["gateway_id"],
            inputs["pnes"][0]["pne_id"],
            inputs["pn_id"],
            _b(inputs["est_id"]),
            holder,
        ) == _b(inputs["local_eukey"])


def test_establishment_messages_match_the_vectors() -> None:
    """wire.md 2.1 and 3.1: the peer's encoding of the upstream messages of
    establishment_002 equals the published CBOR byte for byte; it decodes the server's."""
    e = PROTOCOL["establishment_002"]
    msgs = {m["name"]: m for m in e["messages"]}
    inputs = e["inputs"]
    gw, server, pn = inputs["gateway_id"], inputs["server_id"], inputs["pn_id"]
    est, rs = _b(inputs["est_id"]), _b(inputs["rand_server"])
    p1, p2 = inputs["pnes"]
    rh = e["rand_hash"]

    req = msgs["pn_establish_request"]
    entries = [
        {1: p1["pne_id"], 2: _b(p1["rand_pne"]), 3: True},
        {1: p2["pne_id"], 2: _b(p2["rand_pne"]), 3: False},
    ]
    txid = _b(req["decoded"]["txid"])
    ours = peer.encode(peer.PN_ESTABLISH_REQUEST, txid, gw, server, {1: entries}, pn_id=pn)
    assert ours.hex() == req["cbor"]

    areq = peer.decode(_b(msgs["authenticate_request"]["cbor"]))
    assert areq[1] == peer.AUTHENTICATE_REQUEST
    assert areq[2] == txid
    assert areq[6][2] == est
    assert areq[6][3] == rs
    assert [c[1] for c in areq[6][4]] == [p1["pne_id"], p2["pne_id"]]
    assert areq[6][4][0][3] == peer.FLOW_RAND_HASH

    # The PNEs' side (PNEAuthenticateRequest -> Response), as the PNE would answer.
    for idx, (p, name) in enumerate(((p1, "1"), (p2, "2"))):
        preq_v = msgs[f"pne_authenticate_request_{name}"]
        body: dict[int, Any] = {1: est, 2: peer.FLOW_RAND_HASH, 3: rs}
        if idx == 0:
            body[4] = areq[6][4][0][5]
        preq = peer.encode(
            peer.PNE_AUTHENTICATE_REQUEST,
            _b(preq_v["decoded"]["txid"]),
            gw,
            p["pne_id"],
            body,
            pn_id=pn,
        )
        assert preq.hex() == preq_v["cbor"]
        pne = peer.UIPNE(p["pne_id"], _b(p["eukey"]), rand_pne=_b(p["rand_pne"]))
        assert (
            pne.answer(peer.decode(preq), gw=gw, server=server).hex()
            == msgs[f"pne_authenticate_response_{name}"]["cbor"]
        )
        if idx == 0:
            assert pne.local_eukey == _b(inputs["local_eukey"])

    ares_v = msgs["authenticate_response"]
    proofs = [
        {1: p1["pne_id"], 2: peer.OK, 3: _b(rh[0]["hash_pne"]["tag"])},
        {1: p2["pne_id"], 2: peer.OK, 3: _b(rh[1]["hash_pne"]["tag"])},
    ]
    ares = peer.encode(
        peer.AUTHENTICATE_RESPONSE,
        _b(ares_v["decoded"]["txid"]),
        gw,
        server,
        {1: est, 2: proofs},
        pn_id=pn,
    )
    assert ares.hex() == ares_v["cbor"]

    eres = peer.decode(_b(msgs["pn_establish_response"]["cbor"]))
    assert eres[6][1] == peer.OK
    assert eres[6][2] == est
    assert [r[4].hex() for r in eres[6][3]] == [v["hash_server"]["tag"] for v in rh]
    assert [r[6] for r in eres[6][3]] == [False, False]


def test_tk_derivations_match_the_vectors() -> None:
    """wire.md 8.11 (tk-authentication.md "Derivations"): TK ratchet, AN, the PN GW's
    sealed next EUKey, the PNE's sealed current EUKey, SK and confirm of tk_000."""
    v = CRYPTO["tk_000"]
    r = v["run"]
    run = peer.TKRun(
        r["pn_id"],
        r["gw_id"],
        r["server_id"],
        r["pne_id"],
        _b(r["est_id"]),
        _b(r["rand_pne"]),
        _b(r["rand_server"]),
    )
    t, i = v["tk_step"], v["key_index"]
    eukeys = [_b(k) for k in v["eukeys"]]
    tk_t = peer.tk_at(_b(v["tk"]), 0, t)
    assert tk_t.hex() == v["tk_t"]
    assert peer.tk_ratchet(tk_t).hex() == v["tk_next"]
    nxt = i + 1 if i < len(eukeys) else 0  # wire.md 8.11: a next key follows EUKey_i
    assert nxt == v["next_index"]
    assert peer.tk_an(tk_t, run, t, i, nxt).hex() == v["an"]
    nonce = _b(v["nonce"])
    sealed_next = peer.tk_seal_next(tk_t, eukeys[i], run, t, i, nonce=nonce)  # EUKey_{i+1}
    assert sealed_next.hex() == v["sealed_next"]
    assert peer.tk_open_next(tk_t, sealed_next, run, t, i) == eukeys[i]
    k = i
    sealed_current = peer.tk_seal_current(tk_t, eukeys[k - 1], run, t, k, nonce=nonce)
    assert sealed_current.hex() == v["sealed_current"]
    sk = peer.tk_sk(eukeys[k - 1], tk_t, run, t, k)
    assert sk.hex() == v["sk"]
    assert peer.tk_confirm(sk, run, t, k).hex() == v["confirm"]
    # the chain: EUKey_{i-1} = Hash(EUKey_i)
    assert all(peer.chain_prev(eukeys[n]) == eukeys[n - 1] for n in range(1, len(eukeys)))


def test_enrolment_and_assignment_derivations_match_the_vectors() -> None:
    """wire.md 8.4, 8.7 and 8.8: what the peer uses to get its credentials."""
    e4 = PROTOCOL["enrolment_004"]
    i4 = e4["inputs"]
    pk = peer.password_key(i4["password"], i4["realm"], i4["user_id"])
    assert pk.hex() == e4["password_key"]
    assert (
        peer.MAC(
            pk,
            "cpns/v1/004/auth-data",
            _b(i4["rand"]),
            i4["time"],
            i4["user_id"],
            i4["entity_id"],
            i4["entity_kind"],
            i4["server_id"],
        ).hex()
        == e4["auth_data"]
    )
    a3 = PROTOCOL["assignment_003"]
    i3 = a3["inputs"]
    code = peer.claim_code(_b(i3["tk"]), i3["pne_id"])
    assert code == a3["claim_code"]
    assert peer.normalise_code(a3["claim_code_typed"]) == a3["claim_code_normalised"]
    assert peer.H("cpns/v1/003/claim-key", peer.normalise_code(code)).hex() == a3["claim_key"]
    plain = peer.open_sealed(
        _b(i3["gateway_eukey"]),
        peer.decode(_b(a3["response"]["cbor"]))[6][3],
        "003/response-bundle",
        i3["server_id"],
        i3["gateway_id"],
        i3["pne_id"],
        _b(i3["txid"]),
    )
    assert plain.hex() == a3["key_bundle"]["cbor"]
    assert [k.hex() for k in cbor2.loads(plain)[2]] == a3["eukeys"]
    for name in ("assignment_003", "reassignment_003"):  # the Notification names s
        v = PROTOCOL[name]["notification_seal"]
        step = PROTOCOL[name]["inputs"].get("tk_step", 0)
        tk_s = peer.tk_at(_b(PROTOCOL[name]["inputs"]["tk"]), 0, step, window=step)
        assert tk_s.hex() == v["secret"]
        txid = _b(PROTOCOL[name]["inputs"]["txid"])
        context = ["gw-alice", "pne-0001", txid, 1, PROTOCOL[name]["inputs"].get("epoch", 1), step]
        assert list(context) == _parts(v["context"])
        blob = peer.seal(
            tk_s, _b(v["plaintext"]), "003/notification", *context, nonce=_b(v["nonce"])
        )
        assert blob.hex() == v["blob"]


# -- against a real ``cpns server`` -----------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[LocalDeployment, str, dict[str, bytes]]]:
    """``cpns server init`` (SQLite), user alice, one manufacturer TK record, running."""
    tks = {"pne-tk": secrets.token_bytes(32)}
    net = LocalDeployment(tmp_path / "net")
    net.init_server(users=[("alice", PASSWORD)], tk_records=sorted(tks.items()))
    with net.running():
        url = net.start_server()
        try:
            yield net, url, tks
        finally:
            for link in peer.ServerLink.opened:
                link.close()
            peer.ServerLink.opened.clear()


@pytest.mark.interop
@pytest.mark.integration
def test_independent_gateway_establishes_a_pn_with_both_kinds_of_pne(
    server: tuple[LocalDeployment, str, dict[str, bytes]],
) -> None:
    """pn-establishment.md and wire.md 3.4: the independent PN GW enrols (004), assigns
    a 003 chain to a TK PNE, enrols a with-UI PNE, then establishes one PN with both:
    hash_server verifies at the rand/hash PNE, confirm at the TK PNE, both LocalEUKey
    copies open to the same key, and the server's inventory lists both as members with
    their flows. A second establishment moves the TK PNE one step and one key on."""
    net, url, tks = server
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 443
    server_id, realm = "cpns-server", "cpns"

    open_link = peer.ServerLink(host, port, str(net.ca_file))
    gw_id = "gw-peer"
    gw_key = peer.enrol_004(
        open_link,
        server=server_id,
        realm=realm,
        user_id="alice",
        password=PASSWORD,
        entity_id=gw_id,
        kind=2,
    )
    ui_key = peer.enrol_004(
        open_link,
        server=server_id,
        realm=realm,
        user_id="alice",
        password=PASSWORD,
        entity_id="pne-ui",
        kind=1,
    )
    open_link.close()

    link = peer.ServerLink(host, port, str(net.ca_file), username=gw_id, eukey=gw_key)
    tk = tks["pne-tk"]
    bundle = peer.assign_003(
        link,
        server=server_id,
        gw=gw_id,
        gw_eukey=gw_key,
        realm=realm,
        user_id="alice",
        password=PASSWORD,
        pne="pne-tk",
        code=peer.claim_code(tk, "pne-tk"),
    )
    assert bundle.tk == tk
    assert bundle.epoch == 1
    assert peer.chain_prev(bundle.eukeys[1]) == bundle.eukeys[0]

    gateway = peer.IndependentGateway(gw_id, gw_key, server_id, link)
    gateway.tk_pnes["pne-tk"] = peer.GatewayTK(bundle.tk, 0, bundle.eukeys)
    ui = peer.UIPNE("pne-ui", ui_key, wants_local=True)
    tkp = peer.TKPNE("pne-tk", tk, 0, bundle.eukeys[0], 1, wants_local=True)

    eres = gateway.establish("pn-peer", [ui, tkp])
    body = eres[6]
    assert body[1] == peer.OK
    results = {r[1]: r for r in body[3]}
    assert results["pne-ui"][2] == peer.OK
    assert results["pne-ui"][3] == peer.FLOW_RAND_HASH
    assert results["pne-tk"][2] == peer.OK
    assert results["pne-tk"][3] == peer.FLOW_TK
    assert not results["pne-tk"][6]
    assert ui.joined, "hash_server did not verify at the rand/hash PNE"
    assert tkp.joined, "confirm did not verify at the TK PNE"
    assert ui.local_eukey is not None
    assert gateway.local_eukeys["pne-ui"] == ui.local_eukey
    assert tkp.local_eukey is not None
    assert gateway.local_eukeys["pne-tk"] == tkp.local_eukey != ui.local_eukey
    assert (tkp.step, tkp.index, tkp.eukey) == (1, 2, bundle.eukeys[1])
    assert link.rspauth_checked >= 3

    shown = json.loads(
        net.cpns(
            "admin", "pn", "show", "pn-peer", "--json", "--data-dir", str(net.server_dir)
        ).stdout
    )
    assert shown["gateway_id"] == gw_id
    assert shown["owner"] == "alice"
    members = {m["pne_id"]: m for m in shown["members"]}
    assert set(members) == {"pne-ui", "pne-tk"}
    assert shown["failed"] == []
    assert members["pne-ui"]["flow"] == "rand-hash"
    assert members["pne-tk"]["flow"] == "tk"

    # A second establishment: the TK PNE proves EUKey_2 at step 1.
    ui2 = peer.UIPNE("pne-ui", ui_key)
    eres2 = gateway.establish("pn-peer", [tkp, ui2])
    assert eres2[6][1] == peer.OK
    assert tkp.joined
    assert ui2.joined
    assert (tkp.step, tkp.index) == (2, 3)
    link.close()


def _enrolled(net: LocalDeployment, url: str) -> tuple[peer.ServerLink, bytes, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 443
    open_link = peer.ServerLink(host, port, str(net.ca_file))
    keys = [
        peer.enrol_004(
            open_link,
            server="cpns-server",
            realm="cpns",
            user_id="alice",
            password=PASSWORD,
            entity_id=entity,
            kind=kind,
        )
        for entity, kind in (("gw-peer", 2), ("pne-ui", 1))
    ]
    open_link.close()
    link = peer.ServerLink(host, port, str(net.ca_file), username="gw-peer", eukey=keys[0])
    return link, keys[0], keys[1]


@pytest.mark.interop
@pytest.mark.integration
def test_reassignment_after_a_tk_establishment_carries_the_servers_step(
    server: tuple[LocalDeployment, str, dict[str, bytes]],
) -> None:
    """wire.md 3.2/3.3/8.8 and tk-authentication.md rule 7 (D-003-13): after a TK-flow
    establishment (server TK at step 1) the user's PN GW re-assigns its own PNE; the claim
    proof of a ratcheted record is not checked (the label's proof and any 32 bytes both
    do); the bundle carries TK_1 with `tk_step` 1 and a new chain; the next establishment
    is challenged at (1, 1) and runs with the new EUKey_1."""
    net, url, tks = server
    link, gw_key, _ = _enrolled(net, url)
    tk = tks["pne-tk"]
    label = peer.claim_code(tk, "pne-tk")
    common = {
        "server": "cpns-server",
        "gw": "gw-peer",
        "gw_eukey": gw_key,
        "realm": "cpns",
        "user_id": "alice",
        "password": PASSWORD,
        "pne": "pne-tk",
    }
    bundle = peer.assign_003(link, code=label, **common)  # type: ignore[arg-type]
    assert bundle.tk_step == 0
    gateway = peer.IndependentGateway("gw-peer", gw_key, "cpns-server", link)
    gateway.tk_pnes["pne-tk"] = peer.GatewayTK(bundle.tk, bundle.tk_step, bundle.eukeys)
    tkp = peer.TKPNE("pne-tk", tk, 0, bundle.eukeys[0], 1)
    assert gateway.establish("pn-peer", [tkp])[6][1] == peer.OK
    assert tkp.joined

    again = peer.assign_003(link, code=label, **common)  # type: ignore[arg-type]
    assert (again.epoch, again.tk_step) == (2, 1)
    assert again.tk == peer.tk_ratchet(tk)
    third = peer.assign_003(link, proof=bytes(32), **common)  # type: ignore[arg-type]
    assert (third.epoch, third.tk_step) == (3, 1)
    gateway.tk_pnes["pne-tk"] = peer.GatewayTK(third.tk, third.tk_step, third.eukeys)
    fresh = peer.TKPNE("pne-tk", tkp.tk, tkp.step, third.eukeys[0], 1)
    assert gateway.establish("pn-peer", [fresh])[6][1] == peer.OK
    assert fresh.joined
    assert (fresh.step, fresh.index) == (2, 2)


@pytest.mark.interop
@pytest.mark.integration
def test_server_answers_of_the_second_half_follow_the_docs(
    server: tuple[LocalDeployment, str, dict[str, bytes]],
) -> None:
    """pn-establishment.md "In the CPNS Server" and wire.md 3.2/3.4: a retried
    AuthenticateResponse (same txid, same bytes) gets the stored PNEstablishResponse byte
    for byte; the same txid with other content is REPLAY; another txid for the finished
    est_id is UNKNOWN_ESTABLISHMENT with no entries; a challenged PNE the PN GW leaves out
    of its AuthenticateResponse fails AUTHENTICATION_FAILED and an entry for a PNE the
    server did not challenge is ignored; the PN of an AuthenticateResponse is the pending
    establishment's, whatever its header says; a message whose src is not the Digest user
    is NOT_AUTHORIZED."""
    net, url, _ = server
    link, gw_key, ui_key = _enrolled(net, url)
    gateway = peer.IndependentGateway("gw-peer", gw_key, "cpns-server", link)
    ui = peer.UIPNE("pne-ui", ui_key)
    first = gateway.establish("pn-peer", [ui])
    assert first[6][1] == peer.OK
    assert ui.joined
    trace = dict(gateway.trace)
    ares, stored = trace["authenticate_response"], trace["pn_establish_response"]
    assert link.post(ares) == stored
    msg = peer.decode(ares)
    other = peer.encode(
        47, secrets.token_bytes(16), "gw-peer", "cpns-server", msg[6], pn_id="pn-peer"
    )
    unknown = peer.decode(link.post(other))
    assert unknown[6][1] == 310
    assert unknown[6][3] == []
    body = dict(msg[6])
    body[2] = [{1: "pne-ui", 2: 504}]
    replay = peer.decode(
        link.post(peer.encode(47, msg[2], "gw-peer", "cpns-server", body, pn_id="pn-peer"))
    )
    assert replay[6][1] == 204

    # Leave the challenged PNE out, list one the server did not challenge.
    ui2 = peer.UIPNE("pne-ui", ui_key)
    req = peer.encode(
        43,
        secrets.token_bytes(16),
        "gw-peer",
        "cpns-server",
        {
            1: [
                {1: "pne-ui", 2: ui2.rand_pne, 3: False},
                {1: "pne-nobody", 2: ui2.rand_pne, 3: False},
            ]
        },
        pn_id="pn-other",
    )
    areq = peer.decode(link.post(req))
    assert [(c[1], c[2]) for c in areq[6][4]] == [("pne-ui", 0), ("pne-nobody", 301)]
    res = peer.decode(
        link.post(
            peer.encode(
                47,
                secrets.token_bytes(16),
                "gw-peer",
                "cpns-server",
                {1: areq[6][2], 2: [{1: "pne-tk", 2: 504}]},
                pn_id="pn-other",
            )
        )
    )
    assert res[6][1] == peer.AUTHENTICATION_FAILED
    assert [(r[1], r[2]) for r in res[6][3]] == [("pne-ui", 200), ("pne-nobody", 301)]

    # The PN comes from the pending establishment; a header naming another PN is refused
    # and changes nothing, and a header-less answer completes it (wire.md 3.2).
    ui3 = peer.UIPNE("pne-ui", ui_key)
    req = peer.encode(
        43,
        secrets.token_bytes(16),
        "gw-peer",
        "cpns-server",
        {1: [{1: "pne-ui", 2: ui3.rand_pne, 3: False}]},
        pn_id="pn-third",
    )
    areq = peer.decode(link.post(req))
    est, rand_server = areq[6][2], areq[6][3]
    preq = peer.encode(
        45,
        secrets.token_bytes(16),
        "gw-peer",
        "pne-ui",
        {1: est, 2: 1, 3: rand_server},
        pn_id="pn-third",
    )
    pres = peer.decode(ui3.answer(peer.decode(preq), gw="gw-peer", server="cpns-server"))
    proof = {1: "pne-ui", 2: peer.OK, 3: pres[6][3]}
    ares = peer.encode(
        47,
        secrets.token_bytes(16),
        "gw-peer",
        "cpns-server",
        {1: est, 2: [proof]},
        pn_id="pn-elsewhere",
    )
    assert peer.decode(link.post(ares))[6][1] == 310  # UNKNOWN_ESTABLISHMENT
    ares = peer.encode(47, secrets.token_bytes(16), "gw-peer", "cpns-server", {1: est, 2: [proof]})
    done = peer.decode(link.post(ares))
    assert done[6][1] == peer.OK
    assert done[5] == "pn-third"
    ui3.result(done[6][3][0][4])
    assert ui3.joined

    forged = peer.encode(
        43,
        secrets.token_bytes(16),
        "gw-other",
        "cpns-server",
        {1: [{1: "pne-ui", 2: ui2.rand_pne, 3: False}]},
        pn_id="pn-peer",
    )
    assert peer.decode(link.post(forged))[6] == {1: 205, 4: []}
    link.close()
