"""tests/vectors/protocol_v1.json: recomputed by the library AND by an independent
re-implementation of docs/wire.md section 8 (issue 5 item 16).

The independent side below uses only ``hashlib``, ``hmac``, ``base64``, ``unicodedata``,
plain ``cbor2`` and the raw AES-GCM primitive, written from the specification's text, never
through :mod:`cpns.crypto` or :mod:`cpns.protocol`. So the document, the vectors and the
code cannot disagree without a test failing here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import unicodedata
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cpns.crypto.hashchain import build_chain
from cpns.crypto.hashing import encode_parts, hash_values, mac
from cpns.crypto.kdf import derive_key, password_key
from cpns.crypto.keywrap import open_sealed, seal
from cpns.messages.codec import decode, encode, to_json
from cpns.messages.constants import HeaderKey, MessageType
from cpns.protocol.digest import DigestAlgorithm, compute_response, parse_auth_params

ROOT = Path(__file__).resolve().parents[2]
VECTORS_PATH = ROOT / "tests" / "vectors" / "protocol_v1.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="ascii"))


# -- the independent implementation (docs/wire.md section 8) --------------------------------


def enc(value: bytes | str | int) -> bytes:
    """8.1: 4-byte big-endian length, then bytes / UTF-8 / 8-byte big-endian integer."""
    raw = (
        value.to_bytes(8, "big")
        if isinstance(value, int)
        else value.encode("utf-8")
        if isinstance(value, str)
        else value
    )
    return len(raw).to_bytes(4, "big") + raw


def p(label: str, *parts: bytes | str | int) -> bytes:
    """8.1: P(label, v...)."""
    return b"".join(enc(v) for v in (label, *parts))


def h(label: str, *parts: bytes | str | int) -> bytes:
    """8.2: Hash."""
    return hashlib.sha256(p(label, *parts)).digest()


def m(key: bytes, label: str, *parts: bytes | str | int) -> bytes:
    """8.2: MAC."""
    return hmac.new(key, p(label, *parts), hashlib.sha256).digest()


def hkdf(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out; an empty salt is HashLen zero bytes."""
    prk = hmac.new(salt or bytes(32), secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def seal_ref(
    secret: bytes, plaintext: bytes, purpose: str, context: list[Any], nonce: bytes
) -> tuple[bytes, bytes, bytes]:
    """8.3: (AES key, associated data, blob)."""
    key = hkdf(secret, b"", p("cpns/v1/seal-key", purpose))
    ad = b"\x01" + p("cpns/v1/seal/" + purpose, *context)
    return key, ad, b"\x01" + nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def parts(items: list[dict[str, Any]]) -> list[bytes | str | int]:
    """Typed JSON parts back to values."""
    out: list[bytes | str | int] = []
    for item in items:
        ((kind, value),) = item.items()
        out.append(bytes.fromhex(value) if kind == "bytes" else value)
    return out


def x(value: str) -> bytes:
    """Hex to bytes."""
    return bytes.fromhex(value)


def check_seal(vector: dict[str, Any]) -> None:
    """A sealed-value vector, both ways, and it opens with the library."""
    context = parts(vector["context"])
    key, ad, blob = seal_ref(
        x(vector["secret"]), x(vector["plaintext"]), vector["purpose"], context, x(vector["nonce"])
    )
    assert key.hex() == vector["aead_key"]
    assert ad.hex() == vector["associated_data"]
    assert blob.hex() == vector["blob"]
    library = seal(
        x(vector["secret"]),
        x(vector["plaintext"]),
        purpose=vector["purpose"],
        context=context,
        nonce=x(vector["nonce"]),
    )
    assert library == blob
    opened = open_sealed(x(vector["secret"]), blob, purpose=vector["purpose"], context=context)
    assert opened.hex() == vector["plaintext"]


def body(vector: dict[str, Any]) -> dict[int, Any]:
    """The body map of a message vector, read with plain cbor2."""
    top = cbor2.loads(x(vector["cbor"]))
    result: dict[int, Any] = top[HeaderKey.BODY]
    return result


# -- the tests -------------------------------------------------------------------------------


def test_the_file_is_what_the_generator_writes() -> None:
    """The committed file is the generator's output today: the machines (PN GW, server
    bundle, PNE) still produce these exact bytes from these inputs (regression)."""
    path = ROOT / "tests" / "vectors" / "make_protocol_vectors.py"
    spec = importlib.util.spec_from_file_location("make_protocol_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == VECTORS_PATH.read_text(encoding="ascii")


def test_every_message_type_has_a_vector() -> None:
    """Issue 5 item 16: every message type is published as bytes; the optional header
    fields (PN ID, flow ID) each appear in at least one vector."""
    assert {v["type"] for v in VECTORS["messages"]} == {int(t) for t in MessageType}
    assert any("pn_id" in v["decoded"] for v in VECTORS["messages"])
    assert any("flow" in v["decoded"] for v in VECTORS["messages"])


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=lambda v: v["name"])
def test_message_vectors_decode_re_encode_and_match_their_json(vector: dict[str, Any]) -> None:
    """Each message's bytes decode to its JSON view, re-encode byte for byte, and read
    with plain cbor2 as the envelope of docs/wire.md section 2."""
    data = x(vector["cbor"])
    message = decode(data)
    assert encode(message) == data
    assert to_json(message, reveal_secrets=True) == vector["decoded"]
    top = cbor2.loads(data)
    assert top[0] == 1
    assert top[1] == vector["type"]
    assert top[2].hex() == vector["decoded"]["txid"]
    assert top[3] == vector["decoded"]["src"]
    assert top[4] == vector["decoded"]["dst"]
    assert top.get(5) == vector["decoded"].get("pn_id")
    assert (top[7].hex() if 7 in top else None) == vector["decoded"].get("flow")
    assert cbor2.dumps(top, canonical=True) == data


def test_primitives() -> None:
    """8.1-8.5 on throwaway inputs: library and independent implementation agree."""
    prim = VECTORS["primitives"]
    v = prim["encode_parts"]
    assert p(v["label"], *parts(v["parts"])).hex() == v["encoding"]
    assert encode_parts(v["label"], parts(v["parts"])).hex() == v["encoding"]
    v = prim["hash"]
    assert h(v["label"], *parts(v["parts"])).hex() == v["digest"]
    assert hash_values(v["label"], *parts(v["parts"])).hex() == v["digest"]
    v = prim["mac"]
    assert m(x(v["key"]), v["label"], *parts(v["parts"])).hex() == v["tag"]
    assert mac(x(v["key"]), v["label"], *parts(v["parts"])).hex() == v["tag"]
    v = prim["hkdf"]
    info = p(v["label"], *parts(v["context"]))
    assert info.hex() == v["info"]
    assert hkdf(x(v["secret"]), x(v["salt"]), info, v["length"]).hex() == v["okm"]
    library = derive_key(
        x(v["secret"]),
        salt=x(v["salt"]),
        label=v["label"],
        context=parts(v["context"]),
        length=v["length"],
    )
    assert library.hex() == v["okm"]
    v = prim["password_key"]
    salt = h("cpns/v1/password-salt", v["realm"], v["user_id"])
    assert salt.hex() == v["salt"]
    s = v["scrypt"]
    ref = hashlib.scrypt(
        unicodedata.normalize("NFKC", v["password"]).encode(),
        salt=salt,
        n=s["n"],
        r=s["r"],
        p=s["p"],
        dklen=s["dklen"],
        maxmem=64 * 1024 * 1024,
    )
    assert ref.hex() == v["key"]
    assert password_key(v["password"], realm=v["realm"], user_id=v["user_id"]) == ref
    v = prim["chain"]
    keys = [h(v["label"], x(v["seed"]))]
    for _ in range(v["n"] - 1):
        keys.append(h(v["label"], keys[-1]))
    assert [k.hex() for k in reversed(keys)] == v["eukeys"]
    assert [k.hex() for k in build_chain(x(v["seed"]), v["n"])] == v["eukeys"]
    check_seal(prim["seal"])


def test_enrolment_004() -> None:
    """8.7: auth_data, reply key and sealed EUKey, against the messages that carry them."""
    e = VECTORS["enrolment_004"]
    i = e["inputs"]
    txid, rand, rand_server = x(i["txid"]), x(i["rand"]), x(i["rand_server"])
    pk = x(e["password_key"])
    assert h("cpns/v1/password-salt", i["realm"], i["user_id"]).hex() == e["password_salt"]
    auth = m(
        pk,
        "cpns/v1/004/auth-data",
        rand,
        i["time"],
        i["user_id"],
        i["entity_id"],
        i["entity_kind"],
        i["server_id"],
    )
    assert auth.hex() == e["auth_data"]
    request = body(e["request"])
    assert request == {
        1: i["user_id"],
        2: i["entity_kind"],
        3: i["time"],
        4: rand,
        5: auth,
    }
    info = p("cpns/v1/004/reply-key", i["entity_id"], i["user_id"], txid)
    assert info.hex() == e["reply_key"]["info"]
    reply_key = hkdf(pk, rand + rand_server, info)
    assert reply_key.hex() == e["reply_key"]["key"]
    sealed = e["sealed_eukey"]
    assert sealed["secret"] == reply_key.hex()
    assert sealed["plaintext"] == i["eukey"]
    assert parts(sealed["context"]) == [i["server_id"], i["entity_id"], txid]
    check_seal(sealed)
    assert body(e["response"]) == {1: 0, 2: rand_server, 3: x(sealed["blob"])}


@pytest.mark.parametrize("name", ["assignment_003", "reassignment_003"])
def test_assignment_003(name: str) -> None:
    """8.8: claim code, claim key and proof, AuthData, SeedPNE, chain, the sealed bundle,
    the sealed Notification and the Ack proof, against the messages that carry them; the
    re-assignment carries the server's TK_t at its ratchet step t (000) in the bundle and
    seals the Notification under TK_t, t named and bound (docs/procedures/eukey-assignment.md)."""
    a = VECTORS[name]
    i = a["inputs"]
    gw, pne, server, txid = i["gateway_id"], i["pne_id"], i["server_id"], x(i["txid"])
    tk, rand_pngw, epoch = x(i["tk"]), x(i["rand_pngw"]), i["epoch"]
    step = i["tk_step"]
    tk_t = tk
    for _ in range(step):
        tk_t = h("cpns/v1/tk-ratchet", tk_t)
    assert tk_t.hex() == a["tk_t"]
    raw = m(tk, "cpns/v1/003/claim-code", pne)[:10]
    text = base64.b32encode(raw).decode()
    code = "-".join(text[k : k + 4] for k in range(0, 16, 4))
    assert code == a["claim_code"]
    typed = a["claim_code_typed"]
    normalised = "".join(typed.split()).replace("-", "").upper()
    normalised = normalised.translate(str.maketrans("018", "OIB"))
    assert normalised == a["claim_code_normalised"] == code.replace("-", "")
    assert typed != code
    claim_key = h("cpns/v1/003/claim-key", normalised)
    assert claim_key.hex() == a["claim_key"]
    proof_args = (rand_pngw, i["time"], i["user_id"], pne, gw)
    assert m(claim_key, "cpns/v1/003/claim-proof", *proof_args).hex() == a["claim_proof"]
    auth = m(x(i["password_key"]), "cpns/v1/003/auth-data", *proof_args)
    assert auth.hex() == a["auth_data"]
    assert body(a["request"]) == {
        1: pne,
        2: i["user_id"],
        3: i["time"],
        4: rand_pngw,
        5: auth,
        6: x(a["claim_proof"]),
    }
    seed = h("cpns/v1/003/seed-pne", x(i["rand_svr"]), rand_pngw)
    assert seed.hex() == a["seed_pne"]
    keys = [h("cpns/v1/eukey-chain", seed)]
    for _ in range(i["chain_length"] - 1):
        keys.append(h("cpns/v1/eukey-chain", keys[-1]))
    keys.reverse()
    assert [k.hex() for k in keys] == a["eukeys"]
    bundle = cbor2.dumps({1: tk_t, 2: keys, 3: epoch, 4: step}, canonical=True)
    assert bundle.hex() == a["key_bundle"]["cbor"]
    sealed = a["bundle_seal"]
    assert sealed["secret"] == i["gateway_eukey"]
    assert sealed["plaintext"] == bundle.hex()
    assert parts(sealed["context"]) == [server, gw, pne, txid]
    check_seal(sealed)
    assert body(a["response"]) == {1: 0, 2: pne, 3: x(sealed["blob"])}
    note = a["notification_seal"]
    assert note["secret"] == tk_t.hex()
    assert note["plaintext"] == keys[0].hex()
    assert parts(note["context"]) == [gw, pne, txid, 1, epoch, step]
    check_seal(note)
    assert body(a["notification"]) == {1: 0, 2: 1, 3: x(note["blob"]), 4: epoch, 5: step}
    proof = m(keys[0], "cpns/v1/003/ack", gw, pne, txid, 1, epoch)
    assert proof.hex() == a["ack_proof"]["tag"]
    assert body(a["ack"]) == {1: 0, 2: 1, 3: proof}
    for name in ("request", "response", "notification", "ack"):
        assert cbor2.loads(x(a[name]["cbor"]))[2] == txid  # one txid for the exchange


def _hex(algorithm: str, text: str) -> str:
    if algorithm == "MD5":
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()


def test_digest() -> None:
    """8.9 and 7.3: the nonce layout, response and rspauth (RFC 7616 written out), and
    the three headers of one request verify against each other."""
    d = VECTORS["digest"]
    n = d["nonce"]
    tag = m(x(n["nonce_key"]), n["label"], n["realm"], n["issued"], x(n["random"]))
    assert tag.hex() == n["tag"]
    raw = n["issued"].to_bytes(8, "big") + x(n["random"]) + tag
    assert base64.urlsafe_b64encode(raw).decode() == n["nonce"]
    assert len(n["nonce"]) == 64
    for r in d["responses"]:
        alg = r["algorithm"]
        ha1 = _hex(alg, f"{r['username']}:{r['realm']}:{r['password']}")
        tail = f"{r['nonce']}:{r['nc']}:{r['cnonce']}:{r['qop']}"
        assert _hex(alg, f"{ha1}:{tail}:{_hex(alg, 'POST:' + r['uri'])}") == r["response"]
        assert _hex(alg, f"{ha1}:{tail}:{_hex(alg, ':' + r['uri'])}") == r["rspauth"]
        assert len(r["password"]) == 64
        assert r["password"] == r["password"].lower()
        library = compute_response(
            algorithm=DigestAlgorithm(alg),
            username=r["username"],
            realm=r["realm"],
            password=r["password"],
            method="POST",
            uri=r["uri"],
            nonce=r["nonce"],
            nc=r["nc"],
            cnonce=r["cnonce"],
        )
        assert library == r["response"]
    exchange = d["exchange"]
    assert exchange["www_authenticate"] == (
        f'Digest realm="{n["realm"]}", qop="auth", algorithm=SHA-256, nonce="{n["nonce"]}"'
    )
    sha = d["responses"][0]
    assert f'response="{sha["response"]}"' in exchange["authorization"]
    info = parse_auth_params(exchange["authentication_info"])
    assert info == {
        "qop": "auth",
        "rspauth": sha["rspauth"],
        "cnonce": sha["cnonce"],
        "nc": "00000001",
    }


def check_rand_hash(v: dict[str, Any]) -> tuple[bytes, bytes]:
    """8.10 written out: SK, hash_PNE and hash_server from K, the context and both rands."""
    key, ctx = x(v["key"]), parts(v["context"])
    rand_pne, rand_server = x(v["rand_pne"]), x(v["rand_server"])
    info = p(v["sk"]["label"], *ctx)
    assert info.hex() == v["sk"]["info"]
    assert (rand_pne + rand_server).hex() == v["sk"]["salt"]
    sk = hkdf(key, rand_pne + rand_server, info)
    assert sk.hex() == v["sk"]["key"]
    hash_pne = m(key, v["hash_pne"]["label"], *ctx, rand_pne, rand_server, sk)
    assert hash_pne.hex() == v["hash_pne"]["tag"]
    hash_server = m(key, v["hash_server"]["label"], *ctx, rand_pne, rand_server, sk, hash_pne)
    assert hash_server.hex() == v["hash_server"]["tag"]
    return hash_pne, hash_server


def test_establishment_002() -> None:
    """8.10 on throwaway inputs (002 §7.5.4): each PNE's SK, hash_PNE and hash_server, the
    LocalEUKey's two sealed copies, and the "7.5.5" exchange with the LocalEUKey, by the
    independent implementation; the messages carry exactly these values, and the library
    (cpns.protocol.pne_auth) agrees."""
    from cpns.protocol import pne_auth

    e = VECTORS["establishment_002"]
    inputs = e["inputs"]
    by_name = {v["name"]: body(v) for v in e["messages"]}
    for i, (pne, v) in enumerate(zip(inputs["pnes"], e["rand_hash"], strict=True), start=1):
        assert parts(v["context"]) == [
            inputs["pn_id"],
            inputs["gateway_id"],
            inputs["server_id"],
            pne["pne_id"],
        ]
        assert v["sk"]["label"] == "cpns/v1/pne-session-key"
        assert v["hash_pne"]["label"] == "cpns/v1/hash-pne"
        assert v["hash_server"]["label"] == "cpns/v1/hash-server"
        assert v["rand_server"] == inputs["rand_server"]
        hash_pne, hash_server = check_rand_hash(v)
        assert by_name[f"pne_authenticate_response_{i}"][3] == hash_pne
        assert by_name["authenticate_response"][2][i - 1][3] == hash_pne
        assert by_name["pn_establish_response"][3][i - 1][4] == hash_server
        ctx = pne_auth.AuthContext(*parts(v["context"]))  # type: ignore[arg-type]
        proof = pne_auth.prove(
            x(pne["eukey"]),
            ctx=ctx,
            rand_pne=x(pne["rand_pne"]),
            rand_server=x(inputs["rand_server"]),
            labels=pne_auth.ESTABLISHMENT,
        )
        assert proof.hash_pne == hash_pne
    assert by_name["pn_setup_response"][3] == x(e["rand_hash"][0]["hash_server"]["tag"])
    assert by_name["pn_establishment_notify"][3] == x(e["rand_hash"][1]["hash_server"]["tag"])
    # The LocalEUKey, sealed once under the PNE's EUKey and once under the PN GW's.
    for copy, holder in (
        (e["local_eukey_copy_pne"], inputs["pnes"][0]["pne_id"]),
        (e["local_eukey_copy_gw"], inputs["gateway_id"]),
    ):
        assert copy["purpose"] == "local-eukey"
        assert parts(copy["context"]) == [
            inputs["server_id"],
            inputs["gateway_id"],
            inputs["pnes"][0]["pne_id"],
            inputs["pn_id"],
            x(inputs["est_id"]),
            holder,
        ]
        assert copy["plaintext"] == inputs["local_eukey"]
        check_seal(copy)
    challenge = by_name["authenticate_request"][4][0]
    assert challenge[4] == x(e["local_eukey_copy_gw"]["blob"])
    assert challenge[5] == x(e["local_eukey_copy_pne"]["blob"])
    assert by_name["pne_authenticate_request_1"][4] == challenge[5]
    # "7.5.5": the same exchange keyed by the LocalEUKey, the PN GW in the server's part.
    local = e["local_auth"]
    v = local["rand_hash"]
    assert v["key"] == inputs["local_eukey"]
    assert parts(v["context"])[2] == "pngw"
    assert (v["sk"]["label"], v["hash_pne"]["label"], v["hash_server"]["label"]) == (
        "cpns/v1/local-session-key",
        "cpns/v1/local-hash-pne",
        "cpns/v1/local-hash-gw",
    )
    hash_pne, hash_server = check_rand_hash(v)
    local_bodies = {w["name"]: body(w) for w in local["messages"]}
    assert local_bodies["pne_authenticate_response_local"][3] == hash_pne
    assert local_bodies["local_auth_response"][2] == hash_server
