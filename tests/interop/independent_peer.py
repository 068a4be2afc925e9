"""An independent PN GW + PNE peer of the CPNS Server, written from the public docs alone.

Sources: docs/wire.md (sections 2, 3, 7, 8), docs/crypto.md,
docs/procedures/pn-establishment.md, docs/procedures/tk-authentication.md and
docs/procedures/eukey-assignment.md. Nothing of ``cpns`` is imported here: only cbor2,
cryptography (HKDF, AES-GCM), hashlib, hmac and the standard library's HTTPS client, so
that this file checks the docs are a complete contract (a device maker's view).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import os
import ssl
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# -- wire.md section 8: derivations ------------------------------------------------------

Part = bytes | str | int


def P(label: str, *parts: Part) -> bytes:
    """wire.md 8.1: the labelled encoding."""
    out = bytearray()
    for value in (label, *parts):
        if isinstance(value, bytes):
            raw = value
        elif isinstance(value, str):
            raw = value.encode("utf-8")
        elif isinstance(value, int) and not isinstance(value, bool):
            raw = value.to_bytes(8, "big")
        else:  # pragma: no cover - booleans are never parts
            raise TypeError(type(value))
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def H(label: str, *parts: Part) -> bytes:
    """wire.md 8.2 Hash."""
    return hashlib.sha256(P(label, *parts)).digest()


def MAC(key: bytes, label: str, *parts: Part) -> bytes:
    """wire.md 8.2 MAC."""
    return hmac.new(key, P(label, *parts), hashlib.sha256).digest()


def HKDF_(secret: bytes, salt: bytes, label: str, *context: Part, length: int = 32) -> bytes:
    """wire.md 8.2 HKDF (empty salt = HashLen zeros, which cryptography does for None)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=salt or None, info=P(label, *context)
    ).derive(secret)


def seal_key(secret: bytes, purpose: str) -> bytes:
    return HKDF_(secret, b"", "cpns/v1/seal-key", purpose)


def seal_ad(purpose: str, *context: Part) -> bytes:
    return b"\x01" + P("cpns/v1/seal/" + purpose, *context)


def seal(
    secret: bytes, plaintext: bytes, purpose: str, *context: Part, nonce: bytes | None = None
) -> bytes:
    """wire.md 8.3 Seal."""
    nonce = os.urandom(12) if nonce is None else nonce
    ct = AESGCM(seal_key(secret, purpose)).encrypt(nonce, plaintext, seal_ad(purpose, *context))
    return b"\x01" + nonce + ct


class OpenFailed(Exception):
    """One opaque failure for every way a sealed value does not open."""


def open_sealed(secret: bytes, blob: bytes, purpose: str, *context: Part) -> bytes:
    """wire.md 8.3 open."""
    if len(blob) < 29 or blob[0] != 1:
        raise OpenFailed
    try:
        return AESGCM(seal_key(secret, purpose)).decrypt(
            blob[1:13], blob[13:], seal_ad(purpose, *context)
        )
    except Exception as exc:  # InvalidTag
        raise OpenFailed from exc


def password_key(password: str, realm: str, user_id: str) -> bytes:
    """wire.md 8.4."""
    salt = H("cpns/v1/password-salt", realm, user_id)
    return hashlib.scrypt(
        unicodedata.normalize("NFKC", password).encode(),
        salt=salt,
        n=16384,
        r=8,
        p=1,
        dklen=32,
        maxmem=64 * 1024 * 1024,
    )


def chain_prev(key: bytes) -> bytes:
    """wire.md 8.5: EUKey_{i-1} = Hash(EUKey_i)."""
    return H("cpns/v1/eukey-chain", key)


def claim_code(tk: bytes, pne: str) -> str:
    """wire.md 8.8: the label's claim code."""
    c = MAC(tk, "cpns/v1/003/claim-code", pne)[:10]
    text = base64.b32encode(c).decode().rstrip("=")
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


def normalise_code(code: str) -> str:
    text = "".join(code.split()).replace("-", "").upper()
    return text.replace("0", "O").replace("1", "I").replace("8", "B")


# wire.md 8.10: PN Establishment, rand/hash, and the LocalEUKey


def rh_ctx(pn_id: str, gw: str, server: str, pne: str) -> tuple[str, str, str, str]:
    return (pn_id, gw, server, pne)


def rh_sk(key: bytes, ctx: tuple[str, ...], rand_pne: bytes, rand_server: bytes) -> bytes:
    return HKDF_(key, rand_pne + rand_server, "cpns/v1/pne-session-key", *ctx)


def rh_hash_pne(
    key: bytes, ctx: tuple[str, ...], rand_pne: bytes, rand_server: bytes, sk: bytes
) -> bytes:
    return MAC(key, "cpns/v1/hash-pne", *ctx, rand_pne, rand_server, sk)


def rh_hash_server(
    key: bytes,
    ctx: tuple[str, ...],
    rand_pne: bytes,
    rand_server: bytes,
    sk: bytes,
    hash_pne: bytes,
) -> bytes:
    return MAC(key, "cpns/v1/hash-server", *ctx, rand_pne, rand_server, sk, hash_pne)


def local_eukey_context(
    server: str, gw: str, pne: str, pn_id: str, est_id: bytes, holder: str
) -> tuple[Part, ...]:
    return (server, gw, pne, pn_id, est_id, holder)


def open_local_eukey(
    holder_key: bytes,
    blob: bytes,
    server: str,
    gw: str,
    pne: str,
    pn_id: str,
    est_id: bytes,
    holder: str,
) -> bytes:
    return open_sealed(
        holder_key,
        blob,
        "local-eukey",
        *local_eukey_context(server, gw, pne, pn_id, est_id, holder),
    )


# wire.md 8.11: PN Establishment, TK flow


def tk_ratchet(tk: bytes) -> bytes:
    return H("cpns/v1/tk-ratchet", tk)


def tk_at(tk: bytes, held: int, step: int, window: int = 8) -> bytes:
    """TK_step computed forward from TK_held, within the window of 8 steps."""
    if step < held or step > held + window:
        raise OpenFailed("stale step")
    for _ in range(step - held):
        tk = tk_ratchet(tk)
    return tk


@dataclass(frozen=True)
class TKRun:
    pn_id: str
    gw: str
    server: str
    pne: str
    est: bytes
    rand_pne: bytes
    rand_server: bytes


def tk_an(tk_t: bytes, run: TKRun, t: int, i: int, nxt: int) -> bytes:
    return MAC(
        tk_t,
        "cpns/v1/an",
        run.server,
        run.gw,
        run.pn_id,
        run.pne,
        run.est,
        run.rand_pne,
        run.rand_server,
        t,
        i,
        nxt,
    )


def tk_seal_next(
    tk_t: bytes, next_key: bytes, run: TKRun, t: int, i: int, nonce: bytes | None = None
) -> bytes:
    """By the PN GW: EUKey_{i+1} under TK_t, context (gw, pne, est, t, i+1)."""
    return seal(tk_t, next_key, "tk-next-eukey", run.gw, run.pne, run.est, t, i + 1, nonce=nonce)


def tk_open_next(tk_t: bytes, blob: bytes, run: TKRun, t: int, i: int) -> bytes:
    return open_sealed(tk_t, blob, "tk-next-eukey", run.gw, run.pne, run.est, t, i + 1)


def tk_seal_current(
    tk_t: bytes, key: bytes, run: TKRun, t: int, k: int, nonce: bytes | None = None
) -> bytes:
    """By the PNE: EUKey_k under TK_t, context (pne, server, est, t, k)."""
    return seal(tk_t, key, "tk-current-eukey", run.pne, run.server, run.est, t, k, nonce=nonce)


def tk_sk(key_k: bytes, tk_t: bytes, run: TKRun, t: int, k: int) -> bytes:
    return HKDF_(
        key_k + tk_t,
        run.rand_pne + run.rand_server,
        "cpns/v1/tk-session-key",
        run.pn_id,
        run.gw,
        run.server,
        run.pne,
        run.est,
        t,
        k,
    )


def tk_confirm(sk: bytes, run: TKRun, t: int, k: int) -> bytes:
    return MAC(
        sk,
        "cpns/v1/tk-confirm",
        run.pn_id,
        run.gw,
        run.server,
        run.pne,
        run.est,
        run.rand_pne,
        run.rand_server,
        t,
        k,
    )


# -- wire.md section 2 and 3: messages ---------------------------------------------------

# message types (3.2)
ERROR = 1
USER_KEY_ASSIGNMENT_REQUEST, USER_KEY_ASSIGNMENT_RESPONSE = 10, 11
EUKEY_ASSIGNMENT_REQUEST, EUKEY_ASSIGNMENT_RESPONSE = 20, 21
PN_ESTABLISH_REQUEST, AUTHENTICATE_REQUEST = 43, 44
PNE_AUTHENTICATE_REQUEST, PNE_AUTHENTICATE_RESPONSE = 45, 46
AUTHENTICATE_RESPONSE, PN_ESTABLISH_RESPONSE = 47, 48
PN_SETUP_RESPONSE, PN_ESTABLISHMENT_NOTIFY = 49, 50

OK = 0
AUTHENTICATION_FAILED = 200
FLOW_RAND_HASH, FLOW_TK, FLOW_LOCAL = 1, 2, 3


def encode(
    mtype: int,
    txid: bytes,
    src: str,
    dst: str,
    body: dict[int, Any],
    *,
    pn_id: str | None = None,
    flow: bytes | None = None,
) -> bytes:
    """wire.md 2 and 2.1: the envelope, deterministic CBOR, optional fields omitted."""
    msg: dict[int, Any] = {0: 1, 1: mtype, 2: txid, 3: src, 4: dst, 6: _strip(body)}
    if pn_id is not None:
        msg[5] = pn_id
    if flow is not None:
        msg[7] = flow
    return cbor2.dumps(_sorted(msg), canonical=True)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


class Malformed(Exception):
    pass


def decode(data: bytes) -> dict[int, Any]:
    """wire.md 2.2, the simple way: decode, re-encode deterministically, compare."""
    if not data or len(data) > 65536:
        raise Malformed("size")
    try:
        msg = cbor2.loads(data)
    except Exception as exc:
        raise Malformed("cbor") from exc
    if not isinstance(msg, dict) or cbor2.dumps(msg, canonical=True) != data:
        raise Malformed("not deterministic")
    _no_foreign(msg)
    if msg.get(0) != 1 or set(msg) - set(range(8)) or not {0, 1, 2, 3, 4, 6} <= set(msg):
        raise Malformed("header")
    if not isinstance(msg[2], bytes) or len(msg[2]) != 16:
        raise Malformed("txid")
    return msg


def _no_foreign(value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, int):
                raise Malformed("key")
            _no_foreign(v)
    elif isinstance(value, list):
        for v in value:
            _no_foreign(v)
    elif not isinstance(value, (bytes, str, int)):  # bool is an int
        raise Malformed(f"type {type(value)}")


# -- wire.md section 7: HTTPS + Digest (RFC 7616) -----------------------------------------


class DigestError(Exception):
    pass


def _parse_challenge(header: str) -> dict[str, str]:
    assert header.startswith("Digest ")
    out: dict[str, str] = {}
    rest = header[len("Digest ") :]
    while rest:
        rest = rest.lstrip(" ,")
        if not rest:
            break
        name, _, rest = rest.partition("=")
        if rest.startswith('"'):
            value, _, rest = rest[1:].partition('"')
        else:
            value, _, rest = rest.partition(",")
        out[name.strip().lower()] = value.strip()
    return out


def digest_response(
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str,
    cnonce: str,
    qop: str,
) -> str:
    """wire.md 7.3 (RFC 7616 3.4.1); method "" gives rspauth (RFC 7616 3.5)."""
    h = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}[algorithm]

    def hx(s: str) -> str:
        return h(s.encode()).hexdigest()

    ha1 = hx(f"{username}:{realm}:{password}")
    ha2 = hx(f"{method}:{uri}")
    return hx(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


@dataclass
class ServerLink:
    """POST /cpns/v1/messages over TLS 1.3, with the PN GW's own Digest client."""

    host: str
    port: int
    cafile: str
    username: str | None = None
    eukey: bytes | None = None
    path: str = "/cpns/v1/messages"
    _conn: http.client.HTTPSConnection | None = None
    _challenge: dict[str, str] = field(default_factory=dict)
    _nc: int = 0
    rspauth_checked: int = 0
    #: every link made, so a test can close them all (class-level, not a field)
    opened: ClassVar[list[ServerLink]] = []

    def __post_init__(self) -> None:
        ServerLink.opened.append(self)

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            ctx = ssl.create_default_context(cafile=self.cafile)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            self._conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=30)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _post(
        self, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, list[str]], bytes]:
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(
                    "POST",
                    self.path,
                    body=body,
                    headers={"Content-Type": "application/cbor", **headers},
                )
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
                continue
            hdrs: dict[str, list[str]] = {}
            for k, v in resp.getheaders():
                hdrs.setdefault(k.lower(), []).append(v)
            return resp.status, hdrs, data
        raise AssertionError("unreachable")

    def open_post(self, body: bytes) -> bytes:
        """An open request (only UserKeyAssignmentRequest, wire.md 7.2 rule 4)."""
        status, _, data = self._post(body, {})
        if status != 200:
            raise DigestError(f"HTTP {status}: {data!r}")
        return data

    def _authorization(self) -> tuple[str, str, str]:
        assert self.username is not None
        assert self.eukey is not None
        ch = self._challenge
        algorithm = ch.get("algorithm", "MD5")
        self._nc += 1
        nc = f"{self._nc:08x}"
        cnonce = os.urandom(16).hex()
        response = digest_response(
            algorithm,
            self.username,
            ch["realm"],
            self.eukey.hex(),
            "POST",
            self.path,
            ch["nonce"],
            nc,
            cnonce,
            "auth",
        )
        parts = [
            f'username="{self.username}"',
            f'realm="{ch["realm"]}"',
            f'uri="{self.path}"',
            f"algorithm={algorithm}",
            f'nonce="{ch["nonce"]}"',
            f"nc={nc}",
            f'cnonce="{cnonce}"',
            "qop=auth",
            f'response="{response}"',
        ]
        if "opaque" in ch:
            parts.append(f'opaque="{ch["opaque"]}"')
        return "Digest " + ", ".join(parts), nc, cnonce

    def _take_challenge(self, hdrs: dict[str, list[str]]) -> None:
        offers = [
            _parse_challenge(h) for h in hdrs.get("www-authenticate", []) if h.startswith("Digest ")
        ]
        sha = [o for o in offers if o.get("algorithm", "MD5").upper() == "SHA-256"]
        if not sha:
            raise DigestError(f"no SHA-256 challenge in {offers}")
        self._challenge = sha[0]
        self._nc = 0

    def post(self, body: bytes) -> bytes:
        """An authenticated request: fetch a challenge if none, answer it, check rspauth."""
        for _ in range(3):
            if not self._challenge:
                status, hdrs, data = self._post(b"", {})
                if status != 401:
                    raise DigestError(f"expected 401 for an empty POST, got {status}")
                self._take_challenge(hdrs)
            auth, nc, cnonce = self._authorization()
            status, hdrs, data = self._post(body, {"Authorization": auth})
            if status == 401:
                self._take_challenge(hdrs)
                continue
            info = hdrs.get("authentication-info", [])
            if len(info) != 1:
                raise DigestError("no Authentication-Info")
            fields = _parse_challenge("Digest " + info[0])
            expected = digest_response(
                self._challenge.get("algorithm", "MD5"),
                self.username or "",
                self._challenge["realm"],
                (self.eukey or b"").hex(),
                "",
                self.path,
                self._challenge["nonce"],
                nc,
                cnonce,
                "auth",
            )
            if not hmac.compare_digest(fields.get("rspauth", ""), expected):
                raise DigestError("wrong rspauth")
            if fields.get("cnonce") != cnonce or fields.get("nc") != nc:
                raise DigestError("Authentication-Info does not echo cnonce/nc")
            self.rspauth_checked += 1
            if status != 200:
                raise DigestError(f"HTTP {status}: {data!r} {hdrs.get('cpns-reason')}")
            return data
        raise DigestError("401 three times")


# -- the parties -------------------------------------------------------------------------


def enrol_004(
    link: ServerLink,
    *,
    server: str,
    realm: str,
    user_id: str,
    password: str,
    entity_id: str,
    kind: int,
) -> bytes:
    """wire.md 3.3 and 8.7: a direct enrolment with UI; returns the EUKey."""
    pk = password_key(password, realm, user_id)
    txid, rand, now = os.urandom(16), os.urandom(32), int(time.time())
    auth_data = MAC(pk, "cpns/v1/004/auth-data", rand, now, user_id, entity_id, kind, server)
    body = {1: user_id, 2: kind, 3: now, 4: rand, 5: auth_data}
    reply = decode(
        link.open_post(encode(USER_KEY_ASSIGNMENT_REQUEST, txid, entity_id, server, body))
    )
    if reply[1] != USER_KEY_ASSIGNMENT_RESPONSE or reply[2] != txid or reply[6][1] != OK:
        raise AssertionError(f"enrolment refused: {reply}")
    reply_key = HKDF_(pk, rand + reply[6][2], "cpns/v1/004/reply-key", entity_id, user_id, txid)
    return open_sealed(reply_key, reply[6][3], "004/eukey", server, entity_id, txid)


@dataclass
class KeyBundle:
    tk: bytes
    eukeys: list[bytes]
    epoch: int
    #: the step of ``tk`` (key 4, absent = 0): the server's TK step at a re-assignment
    tk_step: int = 0


def assign_003(
    link: ServerLink,
    *,
    server: str,
    gw: str,
    gw_eukey: bytes,
    realm: str,
    user_id: str,
    password: str,
    pne: str,
    code: str | None = None,
    proof: bytes | None = None,
) -> KeyBundle:
    """wire.md 3.3 and 8.8: the PN GW's 003 request with the label's claim code."""
    pk = password_key(password, realm, user_id)
    txid, rand_pngw, now = os.urandom(16), os.urandom(32), int(time.time())
    auth_data = MAC(pk, "cpns/v1/003/auth-data", rand_pngw, now, user_id, pne, gw)
    if proof is None:  # the label's claim code (wire.md 8.8)
        assert code is not None
        claim_key = H("cpns/v1/003/claim-key", normalise_code(code))
        proof = MAC(claim_key, "cpns/v1/003/claim-proof", rand_pngw, now, user_id, pne, gw)
    body = {1: pne, 2: user_id, 3: now, 4: rand_pngw, 5: auth_data, 6: proof}
    reply = decode(link.post(encode(EUKEY_ASSIGNMENT_REQUEST, txid, gw, server, body)))
    if reply[1] != EUKEY_ASSIGNMENT_RESPONSE or reply[6][1] != OK:
        raise AssertionError(f"003 refused: {reply}")
    plain = open_sealed(gw_eukey, reply[6][3], "003/response-bundle", server, gw, pne, txid)
    if cbor2.dumps(cbor2.loads(plain), canonical=True) != plain:
        raise Malformed("bundle not deterministic")
    b = cbor2.loads(plain)
    return KeyBundle(tk=b[1], eukeys=list(b[2]), epoch=b[3], tk_step=b.get(4, 0))


@dataclass
class UIPNE:
    """A PNE enrolled with UI (rand/hash flow): its EUKey only."""

    pne_id: str
    eukey: bytes
    rand_pne: bytes = field(default_factory=lambda: os.urandom(32))
    wants_local: bool = False
    sk: bytes | None = None
    hash_pne: bytes | None = None
    local_eukey: bytes | None = None
    joined: bool = False

    def answer(self, req: dict[int, Any], *, gw: str, server: str) -> bytes:
        """PNEAuthenticateRequest (rand-hash) -> PNEAuthenticateResponse."""
        body = req[6]
        pn_id = req[5] if 5 in req else None
        assert pn_id is not None, "PNEAuthenticateRequest without pn_id: the PNE needs it for ctx"
        est, rand_server = body[1], body[3]
        ctx = rh_ctx(pn_id, gw, server, self.pne_id)
        if 4 in body:
            self.local_eukey = open_local_eukey(
                self.eukey, body[4], server, gw, self.pne_id, pn_id, est, self.pne_id
            )
        self.sk = rh_sk(self.eukey, ctx, self.rand_pne, rand_server)
        self.hash_pne = rh_hash_pne(self.eukey, ctx, self.rand_pne, rand_server, self.sk)
        self._pending = (ctx, rand_server)
        return encode(
            PNE_AUTHENTICATE_RESPONSE, req[2], self.pne_id, gw, {1: est, 2: OK, 3: self.hash_pne}
        )

    def result(self, hash_server: bytes) -> None:
        ctx, rand_server = self._pending
        assert self.sk is not None
        assert self.hash_pne is not None
        expected = rh_hash_server(
            self.eukey, ctx, self.rand_pne, rand_server, self.sk, self.hash_pne
        )
        self.joined = hmac.compare_digest(expected, hash_server)


@dataclass
class TKPNE:
    """A PNE without UI: its TK (manufacturer) at step c and EUKey_j from 003."""

    pne_id: str
    tk: bytes
    step: int
    eukey: bytes
    index: int
    rand_pne: bytes = field(default_factory=lambda: os.urandom(32))
    pending: tuple[int, bytes] | None = None
    wants_local: bool = False
    local_eukey: bytes | None = None
    sk: bytes | None = None
    joined: bool = False

    def answer(self, req: dict[int, Any], *, gw: str, server: str) -> bytes:
        """tk-authentication.md 7.5.1 on a PNEAuthenticateRequest (tk)."""
        body = req[6]
        pn_id = req[5]
        est, rand_server, an, t, i = body[1], body[3], body[5], body[6], body[7]
        run = TKRun(pn_id, gw, server, self.pne_id, est, self.rand_pne, rand_server)
        tk_t = tk_at(self.tk, self.step, t)
        nxt = i + 1 if body.get(8) is not None else 0  # a next EUKey came with it
        if not hmac.compare_digest(tk_an(tk_t, run, t, i, nxt), an):
            return encode(
                PNE_AUTHENTICATE_RESPONSE,
                req[2],
                self.pne_id,
                gw,
                {1: est, 2: AUTHENTICATION_FAILED},
            )
        if i != self.index:
            raise AssertionError(f"challenge at index {i}, PNE holds {self.index}")
        next_key = tk_open_next(tk_t, body[8], run, t, i)
        if chain_prev(next_key) != self.eukey:
            raise AssertionError("next key is not the chain's successor")
        if 4 in body:  # the PNE's LocalEUKey copy: sealed under EUKey_i (wire.md 8.10)
            self.local_eukey = open_local_eukey(
                self.eukey, body[4], server, gw, self.pne_id, pn_id, est, self.pne_id
            )
        k = self.index
        proof = tk_seal_current(tk_t, self.eukey, run, t, k)
        self.sk = tk_sk(self.eukey, tk_t, run, t, k)
        self._run = (run, t, k, tk_t)
        self.pending = (t + 1, next_key)
        return encode(
            PNE_AUTHENTICATE_RESPONSE,
            req[2],
            self.pne_id,
            gw,
            {1: est, 2: OK, 4: proof, 5: k, 6: t},
        )

    def result(self, confirm: bytes) -> None:
        run, t, k, tk_t = self._run
        assert self.sk is not None
        assert self.pending is not None
        if hmac.compare_digest(tk_confirm(self.sk, run, t, k), confirm):
            self.joined = True
            self.tk, self.step = tk_ratchet(tk_t), t + 1
            self.index, self.eukey = k + 1, self.pending[1]
            self.pending = None


@dataclass
class GatewayTK:
    """What the PN GW holds for a TK PNE after its 003 assignment: (TK_g, g) and the set."""

    tk: bytes
    step: int
    eukeys: list[bytes]


@dataclass
class IndependentGateway:
    """The PN GW's side of PN Establishment (pn-establishment.md, wire.md 3.4)."""

    gw_id: str
    eukey: bytes
    server_id: str
    link: ServerLink
    tk_pnes: dict[str, GatewayTK] = field(default_factory=dict)
    local_eukeys: dict[str, bytes] = field(default_factory=dict)
    trace: list[tuple[str, bytes]] = field(default_factory=list)

    def establish(self, pn_id: str, pnes: list[UIPNE | TKPNE]) -> dict[int, Any]:
        # 1. PNEstablishRequest: every PNE ID and rand_PNE, the originator first.
        entries = [{1: p.pne_id, 2: p.rand_pne, 3: p.wants_local} for p in pnes]
        txid1 = os.urandom(16)
        req = encode(
            PN_ESTABLISH_REQUEST, txid1, self.gw_id, self.server_id, {1: entries}, pn_id=pn_id
        )
        self.trace.append(("pn_establish_request", req))
        raw = self.link.post(req)
        self.trace.append(("authenticate_request", raw))
        areq = decode(raw)
        assert areq[1] == AUTHENTICATE_REQUEST, areq
        assert areq[2] == txid1
        assert areq[3] == self.server_id
        assert areq.get(5) == pn_id  # wire.md 3.2: the server sets the header pn_id
        assert areq[4] == self.gw_id
        body = areq[6]
        assert body[1] == OK, body
        est, rand_server = body[2], body[3]
        challenges = body[4]
        assert [c[1] for c in challenges] == [p.pne_id for p in pnes]
        by_id = {p.pne_id: p for p in pnes}

        # 2. One PNEAuthenticateRequest per PNE the server accepted.
        proofs = []
        for ch in challenges:
            pne = by_id[ch[1]]
            if ch[2] != OK:
                continue
            pbody: dict[int, Any] = {1: est, 2: ch[3], 3: rand_server, 4: ch.get(5)}
            if 4 in ch:  # our copy of the LocalEUKey
                self.local_eukeys[pne.pne_id] = open_local_eukey(
                    self.eukey,
                    ch[4],
                    self.server_id,
                    self.gw_id,
                    pne.pne_id,
                    pn_id,
                    est,
                    self.gw_id,
                )
            if ch[3] == FLOW_TK:
                state = self.tk_pnes[pne.pne_id]
                t, i = ch[7], ch[8]
                run = TKRun(
                    pn_id, self.gw_id, self.server_id, pne.pne_id, est, pne.rand_pne, rand_server
                )
                tk_t = tk_at(state.tk, state.step, t)
                nxt = i + 1 if 1 <= i < len(state.eukeys) else 0
                if not hmac.compare_digest(tk_an(tk_t, run, t, i, nxt), ch[6]):
                    raise AssertionError("AN does not verify at the PN GW")
                state.tk, state.step = tk_t, t  # store TK_t (TK_{t+1} pending)
                pbody.update({5: ch[6], 6: t, 7: i})
                if i < len(state.eukeys):
                    pbody[8] = tk_seal_next(tk_t, state.eukeys[i], run, t, i)  # EUKey_{i+1}
            ptxid = os.urandom(16)
            preq = encode(
                PNE_AUTHENTICATE_REQUEST, ptxid, self.gw_id, pne.pne_id, pbody, pn_id=pn_id
            )
            self.trace.append((f"pne_authenticate_request:{pne.pne_id}", preq))
            pres_raw = pne.answer(decode(preq), gw=self.gw_id, server=self.server_id)
            self.trace.append((f"pne_authenticate_response:{pne.pne_id}", pres_raw))
            pres = decode(pres_raw)
            assert pres[1] == PNE_AUTHENTICATE_RESPONSE
            assert pres[2] == ptxid
            pb = pres[6]
            proof: dict[int, Any] = {1: pne.pne_id, 2: pb[2]}
            for src_key, dst_key in ((3, 3), (4, 4), (5, 5), (6, 6)):
                if src_key in pb:
                    proof[dst_key] = pb[src_key]
            proofs.append(proof)

        # 3. AuthenticateResponse -> PNEstablishResponse.
        txid2 = os.urandom(16)
        ares = encode(
            AUTHENTICATE_RESPONSE,
            txid2,
            self.gw_id,
            self.server_id,
            {1: est, 2: proofs},
            pn_id=pn_id,
        )
        self.trace.append(("authenticate_response", ares))
        raw = self.link.post(ares)
        self.trace.append(("pn_establish_response", raw))
        eres = decode(raw)
        assert eres[1] == PN_ESTABLISH_RESPONSE, eres
        assert eres[2] == txid2
        assert eres[6][2] == est
        assert eres.get(5) == pn_id
        # 4. Hand each PNE its result (PNSetupResponse / PNEstablishmentNotify) and
        # adopt TK_{t+1} for each TK PNE the server said OK for.
        for r in eres[6][3]:
            pne = by_id[r[1]]
            if r[2] != OK:
                continue
            if r.get(3) == FLOW_TK:
                assert isinstance(pne, TKPNE)
                pne.result(r[5])
                state = self.tk_pnes[pne.pne_id]
                state.tk, state.step = tk_ratchet(state.tk), state.step + 1
            else:
                assert isinstance(pne, UIPNE)
                pne.result(r[4])
        return eres
