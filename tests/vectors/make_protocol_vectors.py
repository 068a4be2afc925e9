"""Generate tests/vectors/protocol_v1.json and the generated blocks of docs/wire.md.

One command regenerates both, from the repository root::

    PYTHONPATH=src python tests/vectors/make_protocol_vectors.py          # write
    PYTHONPATH=src python tests/vectors/make_protocol_vectors.py --check  # compare only

What it writes (issue 5 item 16): protocol-level known-answer vectors a third party can
load, made with throwaway inputs written below and the outputs ``cpns`` computes from
them: every message type as CBOR bytes with its decoded JSON view, every derivation of
docs/wire.md section 8 with its inputs and intermediate values, HTTP Digest headers, and a
worked example of a whole EUKey assignment (004 enrolment of the PN GW, then the 003
assignment of a PNE). Nothing is copied by hand: messages come from
:mod:`cpns.messages`, derivations from :mod:`cpns.crypto` and :mod:`cpns.protocol`.

docs/wire.md holds blocks between ``<!-- generated: NAME -->`` and ``<!-- end generated
-->``: the CDDL (:func:`cpns.messages.cddl.render_cddl`), the status table
(:func:`cpns.messages.cddl.render_status_table`) and the worked example (from the
vectors). ``tests/unit/test_wire_doc.py`` and ``tests/unit/test_protocol_vectors.py``
fail when either file differs from what this script would write.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cpns.crypto.hashchain import CHAIN_LABEL, build_chain
from cpns.crypto.hashing import encode_parts, hash_values, mac
from cpns.crypto.kdf import SCRYPT_N, SCRYPT_P, SCRYPT_R, derive_key, password_key, password_salt
from cpns.crypto.keywrap import seal
from cpns.errors import ErrorCode
from cpns.messages import constants
from cpns.messages.cddl import render_cddl, render_status_table
from cpns.messages.codec import encode, encode_record, to_json
from cpns.messages.constants import ID_PATTERN, MAX_ID_LEN, AuthFlow
from cpns.messages.model import (
    AuthChallenge,
    AuthenticateRequest,
    AuthenticateResponse,
    AuthProof,
    AuthResult,
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    KeyBundle,
    LocalAuthRequest,
    LocalAuthResponse,
    MemberStatus,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNEHello,
    PNEstablishmentNotify,
    PNEstablishRequest,
    PNEstablishResponse,
    PNInvite,
    PNInviteResponse,
    PNSetupRequest,
    PNSetupResponse,
    SetupEntry,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol import key_assignment as ka
from cpns.protocol import pne_auth, tk_auth
from cpns.protocol import user_key_assignment as uka
from cpns.protocol.digest import (
    NONCE_LABEL,
    DigestAlgorithm,
    DigestClient,
    DigestServer,
    compute_response,
)
from cpns.types import EntityKind

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("protocol_v1.json")
WIRE = ROOT / "docs" / "wire.md"

type Part = bytes | str | int

# -- throwaway inputs (never use them for anything real) ------------------------------------

REALM = "cpns"
SERVER_ID = "cpns-server"
USER_ID = "alice"
PASSWORD = "correct horse battery"
GATEWAY_ID = "gw-alice"
PNE_ID = "pne-0001"
PN_ID = "pn-alice-home"
NOW = 1_700_000_000
TK = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
#: A short chain keeps the file readable; the server's default is 16.
CHAIN_LEN = 4
EPOCH = 1


def _fill(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


# The random values each party draws, fixed here (a real party draws them from a CSPRNG).
TXID_004 = _fill(0x10, 16)
RAND_004 = _fill(0x11, 32)
RAND_SERVER_004 = _fill(0x12, 32)
GATEWAY_EUKEY = _fill(0x13, 32)
NONCE_004 = _fill(0x14, 12)
TXID_003 = _fill(0x20, 16)
RAND_PNGW = _fill(0x21, 32)
RAND_SVR = _fill(0x22, 32)
NONCE_BUNDLE = _fill(0x23, 12)
NONCE_NOTIFICATION = _fill(0x24, 12)
DIGEST_NONCE_KEY = _fill(0x30, 32)
DIGEST_NONCE_RAND = _fill(0x31, 8)
DIGEST_CNONCE = _fill(0x32, 16)
HELLO_TXID = _fill(0x40, 16)
ERROR_TXID = _fill(0x41, 16)
# PN Establishment (002 §7.5.4) and the LocalEUKey authentication ("7.5.5").
PNE_ID_2 = "pne-0002"
PNE_EUKEY_1 = _fill(0x60, 32)
PNE_EUKEY_2 = _fill(0x61, 32)
SETUP_TXID = _fill(0x62, 16)
INVITE_TXID = _fill(0x63, 16)
RAND_PNE_1 = _fill(0x64, 32)
RAND_PNE_2 = _fill(0x65, 32)
UP_TXID_1 = _fill(0x66, 16)
UP_TXID_2 = _fill(0x67, 16)
EST_ID = _fill(0x68, 16)
RAND_SERVER_EST = _fill(0x69, 32)
LOCAL_EUKEY = _fill(0x6A, 32)
NONCE_LOCAL_PNE = _fill(0x6B, 12)
NONCE_LOCAL_GW = _fill(0x6C, 12)
AUTH_TXID_1 = _fill(0x6D, 16)
AUTH_TXID_2 = _fill(0x6E, 16)
LOCAL_TXID = _fill(0x70, 16)
LOCAL_EST_ID = _fill(0x71, 16)
RAND_PNE_LOCAL = _fill(0x72, 32)
RAND_GW_LOCAL = _fill(0x73, 32)
#: A flow (correlation) ID, header key 7 (docs/wire.md section 2.3).
FLOW_ID = bytes.fromhex("f10ef10ef10ef10e")


class _Script:
    """A :class:`cpns.types.Random` handing out fixed values in order."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def token_bytes(self, n: int) -> bytes:
        value = self._values.pop(0)
        assert len(value) == n, (len(value), n)
        return value


def part_json(value: Part) -> dict[str, Any]:
    """A part with its type made explicit (JSON cannot tell bytes from str)."""
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, str):
        return {"str": value}
    return {"int": value}


def parts_json(values: Iterable[Part]) -> list[dict[str, Any]]:
    """Several parts."""
    return [part_json(v) for v in values]


def message_json(name: str, message: Message, note: str) -> dict[str, Any]:
    """One message vector: bytes and the decoded view (secrets shown: they are throwaway)."""
    return {
        "name": name,
        "note": note,
        "type": int(message.TYPE),
        "cbor": encode(message).hex(),
        "decoded": to_json(message, reveal_secrets=True),
    }


def seal_json(
    secret: bytes, plaintext: bytes, *, purpose: str, context: tuple[Part, ...], nonce: bytes
) -> dict[str, Any]:
    """A sealed value with every intermediate: the AES key and the associated data."""
    return {
        "secret": secret.hex(),
        "purpose": purpose,
        "context": parts_json(context),
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "aead_key": derive_key(
            secret, salt=b"", label="cpns/v1/seal-key", context=(purpose,)
        ).hex(),
        "associated_data": (b"\x01" + encode_parts("cpns/v1/seal/" + purpose, context)).hex(),
        "blob": seal(secret, plaintext, purpose=purpose, context=context, nonce=nonce).hex(),
    }


# -- the worked example: 004 enrolment of the PN GW, then 003 for one PNE -------------------


def _enrolment() -> dict[str, Any]:
    pk = password_key(PASSWORD, realm=REALM, user_id=USER_ID)
    client = uka.UserKeyAssignmentClient(
        entity_id=GATEWAY_ID,
        entity_kind=EntityKind.PN_GW,
        server_id=SERVER_ID,
        rng=_Script(TXID_004, RAND_004),
    )
    client.start(user_id=USER_ID, password_key=pk, now=NOW)
    (request,) = client.messages_to_send()
    assert isinstance(request, UserKeyAssignmentRequest)
    reply_key = uka._reply_key(pk, request, RAND_SERVER_004)
    context = uka._context(request)
    sealed = seal_json(
        reply_key, GATEWAY_EUKEY, purpose=uka.EUKEY_PURPOSE, context=context, nonce=NONCE_004
    )
    response = UserKeyAssignmentResponse(
        txid=request.txid,
        src=SERVER_ID,
        dst=GATEWAY_ID,
        status=ErrorCode.OK,
        rand_server=RAND_SERVER_004,
        sealed_eukey=bytes.fromhex(sealed["blob"]),
    )
    events = client.receive(response)
    assert [type(e).__name__ for e in events] == ["EUKeyReceived"], events
    return {
        "inputs": {
            "realm": REALM,
            "user_id": USER_ID,
            "password": PASSWORD,
            "entity_id": GATEWAY_ID,
            "entity_kind": int(EntityKind.PN_GW),
            "server_id": SERVER_ID,
            "time": NOW,
            "txid": TXID_004.hex(),
            "rand": RAND_004.hex(),
            "rand_server": RAND_SERVER_004.hex(),
            "eukey": GATEWAY_EUKEY.hex(),
        },
        "password_salt": password_salt(REALM, USER_ID).hex(),
        "password_key": pk.hex(),
        "auth_data": request.auth_data.hex(),
        "reply_key": {
            "salt": (RAND_004 + RAND_SERVER_004).hex(),
            "info": encode_parts(
                uka.REPLY_KEY_LABEL, (request.src, request.user_id, request.txid)
            ).hex(),
            "key": reply_key.hex(),
        },
        "sealed_eukey": sealed,
        "request": message_json("user_key_assignment_request", request, "PN GW -> server"),
        "response": message_json("user_key_assignment_response", response, "server -> PN GW"),
    }


def _typed(code: str) -> str:
    """The label's code as a user might type it (normalisation must undo all of this)."""
    plain = code.replace("-", "").lower().translate(str.maketrans("oib", "018"))
    return plain[:8] + " " + plain[8:]


def _assignment(tk_step: int = 0, epoch: int = EPOCH) -> dict[str, Any]:
    """003 with the server's TK at ``tk_step`` (0: first assignment; > 0: a re-assignment
    after TK-based authentications ratcheted it, 000). The PNE holds the manufacturer TK
    and computes TK_t forward."""
    tk_t = tk_auth.ratchet(TK, tk_step)
    pk = password_key(PASSWORD, realm=REALM, user_id=USER_ID)
    code = ka.claim_code(TK, PNE_ID)
    ckey = ka.claim_key(code)
    gateway = ka.EUKeyAssignmentGateway(
        gateway_id=GATEWAY_ID,
        gateway_eukey=GATEWAY_EUKEY,
        server_id=SERVER_ID,
        rng=_Script(RAND_PNGW, TXID_003, NONCE_NOTIFICATION),
    )
    gateway.start(pne_id=PNE_ID, user_id=USER_ID, password_key=pk, claim_key=ckey, now=NOW)
    (request,) = gateway.messages_to_send()
    assert isinstance(request, EUKeyAssignmentRequest)
    seed = ka.seed_pne(RAND_SVR, RAND_PNGW)
    chain = build_chain(seed, CHAIN_LEN)
    bundle = KeyBundle(tk=tk_t, eukeys=tuple(chain), epoch=epoch, tk_step=tk_step)
    bundle_cbor = encode_record(bundle)
    bundle_seal = seal_json(
        GATEWAY_EUKEY,
        bundle_cbor,
        purpose=ka.RESPONSE_PURPOSE,
        context=ka._bundle_context(SERVER_ID, GATEWAY_ID, PNE_ID, TXID_003),
        nonce=NONCE_BUNDLE,
    )
    response = EUKeyAssignmentResponse(
        txid=TXID_003,
        src=SERVER_ID,
        dst=GATEWAY_ID,
        status=ErrorCode.OK,
        pne_id=PNE_ID,
        sealed_bundle=bytes.fromhex(bundle_seal["blob"]),
    )
    gateway.receive(response)
    (notification,) = gateway.messages_to_send()
    assert isinstance(notification, EUKeyAssignmentNotification)
    notification_context = ka._notification_context(GATEWAY_ID, PNE_ID, TXID_003, 1, epoch, tk_step)
    notification_seal = seal_json(
        tk_t,
        chain[0],
        purpose=ka.NOTIFICATION_PURPOSE,
        context=notification_context,
        nonce=NONCE_NOTIFICATION,
    )
    assert notification.sealed_eukey == bytes.fromhex(notification_seal["blob"])
    device = ka.EUKeyAssignmentDevice(entity_id=PNE_ID, tk=TK, rng=_Script())
    device.receive(notification)
    (ack,) = device.messages_to_send()
    assert isinstance(ack, EUKeyAssignmentAck)
    assert ack.proof is not None
    events = gateway.receive(ack)
    assert [type(e).__name__ for e in events] == ["EUKeyDelivered"], events
    ack_parts: tuple[Part, ...] = (GATEWAY_ID, PNE_ID, TXID_003, 1, epoch)
    return {
        "inputs": {
            "realm": REALM,
            "user_id": USER_ID,
            "password_key": pk.hex(),
            "gateway_id": GATEWAY_ID,
            "gateway_eukey": GATEWAY_EUKEY.hex(),
            "server_id": SERVER_ID,
            "pne_id": PNE_ID,
            "tk": TK.hex(),
            "time": NOW,
            "txid": TXID_003.hex(),
            "rand_pngw": RAND_PNGW.hex(),
            "rand_svr": RAND_SVR.hex(),
            "chain_length": CHAIN_LEN,
            "epoch": epoch,
            "tk_step": tk_step,
        },
        "tk_t": tk_t.hex(),
        "claim_code": code,
        # How a user may type it: lower case, no dashes, spaces, O/I/B read as 0/1/8.
        "claim_code_typed": _typed(code),
        "claim_code_normalised": ka.normalize_claim_code(_typed(code)),
        "claim_key": ckey.hex(),
        "auth_data": request.auth_data.hex(),
        "claim_proof": request.claim_proof.hex(),
        "seed_pne": seed.hex(),
        "eukeys": [k.hex() for k in chain],
        "key_bundle": {"cbor": bundle_cbor.hex(), "epoch": epoch, "tk_step": tk_step},
        "bundle_seal": bundle_seal,
        "notification_seal": notification_seal,
        "ack_proof": {
            "key": chain[0].hex(),
            "label": ka.ACK_LABEL,
            "parts": parts_json(ack_parts),
            "tag": ack.proof.hex(),
        },
        "request": message_json("eukey_assignment_request", request, "PN GW -> server"),
        "response": message_json("eukey_assignment_response", response, "server -> PN GW"),
        "notification": message_json(
            "eukey_assignment_notification", notification, "PN GW -> PNE (PAN frame)"
        ),
        "ack": message_json("eukey_assignment_ack", ack, "PNE -> PN GW (PAN frame)"),
    }


# -- PN Establishment (002 §7.5.4) with two PNEs, then "7.5.5" with the LocalEUKey ------------


def _rand_hash_json(
    key: bytes,
    ctx: pne_auth.AuthContext,
    rand_pne: bytes,
    rand_server: bytes,
    labels: pne_auth.AuthLabels,
) -> dict[str, Any]:
    """SK, hash_PNE and hash_server with their inputs (docs/wire.md section 8.10)."""
    proof = pne_auth.prove(key, ctx=ctx, rand_pne=rand_pne, rand_server=rand_server, labels=labels)
    verdict = pne_auth.verify_proof(
        key,
        ctx=ctx,
        rand_pne=rand_pne,
        rand_server=rand_server,
        hash_pne_value=proof.hash_pne,
        labels=labels,
    )
    return {
        "key": key.hex(),
        "context": parts_json(ctx.parts()),
        "rand_pne": rand_pne.hex(),
        "rand_server": rand_server.hex(),
        "sk": {
            "label": labels.session_key,
            "salt": (rand_pne + rand_server).hex(),
            "info": encode_parts(labels.session_key, ctx.parts()).hex(),
            "key": proof.sk.hex(),
        },
        "hash_pne": {"label": labels.hash_pne, "tag": proof.hash_pne.hex()},
        "hash_server": {"label": labels.hash_server, "tag": verdict.hash_server.hex()},
    }


def _establishment() -> dict[str, Any]:
    ctx1 = pne_auth.AuthContext(pn_id=PN_ID, gw_id=GATEWAY_ID, server_id=SERVER_ID, pne_id=PNE_ID)
    ctx2 = pne_auth.AuthContext(pn_id=PN_ID, gw_id=GATEWAY_ID, server_id=SERVER_ID, pne_id=PNE_ID_2)
    lab = pne_auth.ESTABLISHMENT
    one = _rand_hash_json(PNE_EUKEY_1, ctx1, RAND_PNE_1, RAND_SERVER_EST, lab)
    two = _rand_hash_json(PNE_EUKEY_2, ctx2, RAND_PNE_2, RAND_SERVER_EST, lab)
    local_ctx = dict(
        server_id=SERVER_ID, gw_id=GATEWAY_ID, pne_id=PNE_ID, pn_id=PN_ID, est_id=EST_ID
    )
    copy_pne = seal_json(
        PNE_EUKEY_1,
        LOCAL_EUKEY,
        purpose=pne_auth.LOCAL_EUKEY_PURPOSE,
        context=(SERVER_ID, GATEWAY_ID, PNE_ID, PN_ID, EST_ID, PNE_ID),
        nonce=NONCE_LOCAL_PNE,
    )
    copy_gw = seal_json(
        GATEWAY_EUKEY,
        LOCAL_EUKEY,
        purpose=pne_auth.LOCAL_EUKEY_PURPOSE,
        context=(SERVER_ID, GATEWAY_ID, PNE_ID, PN_ID, EST_ID, GATEWAY_ID),
        nonce=NONCE_LOCAL_GW,
    )
    assert (
        copy_pne["blob"]
        == pne_auth.seal_local_eukey(
            PNE_EUKEY_1, LOCAL_EUKEY, holder_id=PNE_ID, nonce=NONCE_LOCAL_PNE, **local_ctx
        ).hex()
    )
    sealed_pne, sealed_gw = bytes.fromhex(copy_pne["blob"]), bytes.fromhex(copy_gw["blob"])
    h1, h2 = bytes.fromhex(one["hash_pne"]["tag"]), bytes.fromhex(two["hash_pne"]["tag"])
    s1, s2 = bytes.fromhex(one["hash_server"]["tag"]), bytes.fromhex(two["hash_server"]["tag"])
    ok, rh = ErrorCode.OK, AuthFlow.RAND_HASH
    msgs = [
        PNSetupRequest(
            txid=SETUP_TXID,
            src=PNE_ID,
            dst=GATEWAY_ID,
            pn_id=PN_ID,
            rand_pne=RAND_PNE_1,
            local_eukey=True,
            invite=(PNE_ID_2,),
        ),
        PNInvite(txid=INVITE_TXID, src=GATEWAY_ID, dst=PNE_ID_2, pn_id=PN_ID, originator=PNE_ID),
        PNInviteResponse(
            txid=INVITE_TXID,
            src=PNE_ID_2,
            dst=GATEWAY_ID,
            pn_id=PN_ID,
            status=ok,
            rand_pne=RAND_PNE_2,
            local_eukey=False,
        ),
        PNEstablishRequest(
            txid=UP_TXID_1,
            src=GATEWAY_ID,
            dst=SERVER_ID,
            pn_id=PN_ID,
            entries=(
                SetupEntry(pne_id=PNE_ID, rand_pne=RAND_PNE_1, local_eukey=True),
                SetupEntry(pne_id=PNE_ID_2, rand_pne=RAND_PNE_2, local_eukey=False),
            ),
        ),
        AuthenticateRequest(
            txid=UP_TXID_1,
            src=SERVER_ID,
            dst=GATEWAY_ID,
            pn_id=PN_ID,
            status=ok,
            est_id=EST_ID,
            rand_server=RAND_SERVER_EST,
            entries=(
                AuthChallenge(
                    pne_id=PNE_ID,
                    status=ok,
                    flow=rh,
                    sealed_local_gw=sealed_gw,
                    sealed_local_pne=sealed_pne,
                ),
                AuthChallenge(pne_id=PNE_ID_2, status=ok, flow=rh),
            ),
        ),
        PNEAuthenticateRequest(
            txid=AUTH_TXID_1,
            src=GATEWAY_ID,
            dst=PNE_ID,
            pn_id=PN_ID,
            est_id=EST_ID,
            auth_flow=rh,
            rand_server=RAND_SERVER_EST,
            sealed_local_eukey=sealed_pne,
        ),
        PNEAuthenticateResponse(
            txid=AUTH_TXID_1, src=PNE_ID, dst=GATEWAY_ID, est_id=EST_ID, status=ok, hash_pne=h1
        ),
        PNEAuthenticateRequest(
            txid=AUTH_TXID_2,
            src=GATEWAY_ID,
            dst=PNE_ID_2,
            pn_id=PN_ID,
            est_id=EST_ID,
            auth_flow=rh,
            rand_server=RAND_SERVER_EST,
        ),
        PNEAuthenticateResponse(
            txid=AUTH_TXID_2,
            src=PNE_ID_2,
            dst=GATEWAY_ID,
            est_id=EST_ID,
            status=ok,
            hash_pne=h2,
        ),
        AuthenticateResponse(
            txid=UP_TXID_2,
            src=GATEWAY_ID,
            dst=SERVER_ID,
            pn_id=PN_ID,
            est_id=EST_ID,
            entries=(
                AuthProof(pne_id=PNE_ID, status=ok, hash_pne=h1),
                AuthProof(pne_id=PNE_ID_2, status=ok, hash_pne=h2),
            ),
        ),
        PNEstablishResponse(
            txid=UP_TXID_2,
            src=SERVER_ID,
            dst=GATEWAY_ID,
            pn_id=PN_ID,
            status=ok,
            est_id=EST_ID,
            entries=(
                AuthResult(pne_id=PNE_ID, status=ok, flow=rh, hash_server=s1, reassign=False),
                AuthResult(pne_id=PNE_ID_2, status=ok, flow=rh, hash_server=s2, reassign=False),
            ),
        ),
        PNSetupResponse(
            txid=SETUP_TXID,
            src=GATEWAY_ID,
            dst=PNE_ID,
            pn_id=PN_ID,
            status=ok,
            est_id=EST_ID,
            hash_server=s1,
            members=(
                MemberStatus(pne_id=PNE_ID, status=ok, flow=rh),
                MemberStatus(pne_id=PNE_ID_2, status=ok, flow=rh),
            ),
        ),
        PNEstablishmentNotify(
            txid=INVITE_TXID,
            src=GATEWAY_ID,
            dst=PNE_ID_2,
            pn_id=PN_ID,
            status=ok,
            est_id=EST_ID,
            hash_server=s2,
        ),
    ]
    names = [
        ("pn_setup_request", "originating PNE -> PN GW (PAN)"),
        ("pn_invite", "PN GW -> invited PNE (PAN)"),
        ("pn_invite_response", "invited PNE -> PN GW (PAN)"),
        ("pn_establish_request", "PN GW -> server"),
        ("authenticate_request", "server -> PN GW"),
        ("pne_authenticate_request_1", "PN GW -> originating PNE (PAN)"),
        ("pne_authenticate_response_1", "originating PNE -> PN GW (PAN)"),
        ("pne_authenticate_request_2", "PN GW -> invited PNE (PAN)"),
        ("pne_authenticate_response_2", "invited PNE -> PN GW (PAN)"),
        ("authenticate_response", "PN GW -> server"),
        ("pn_establish_response", "server -> PN GW"),
        ("pn_setup_response", "PN GW -> originating PNE (PAN)"),
        ("pn_establishment_notify", "PN GW -> invited PNE (PAN)"),
    ]
    # "7.5.5": the originating PNE and the PN GW, K = the LocalEUKey.
    lctx = pne_auth.AuthContext.local(pn_id=PN_ID, gw_id=GATEWAY_ID, pne_id=PNE_ID)
    local = _rand_hash_json(LOCAL_EUKEY, lctx, RAND_PNE_LOCAL, RAND_GW_LOCAL, pne_auth.LOCAL)
    local_msgs = [
        LocalAuthRequest(
            txid=LOCAL_TXID, src=PNE_ID, dst=GATEWAY_ID, pn_id=PN_ID, rand_pne=RAND_PNE_LOCAL
        ),
        PNEAuthenticateRequest(
            txid=LOCAL_TXID,
            src=GATEWAY_ID,
            dst=PNE_ID,
            pn_id=PN_ID,
            est_id=LOCAL_EST_ID,
            auth_flow=AuthFlow.LOCAL,
            rand_server=RAND_GW_LOCAL,
        ),
        PNEAuthenticateResponse(
            txid=LOCAL_TXID,
            src=PNE_ID,
            dst=GATEWAY_ID,
            est_id=LOCAL_EST_ID,
            status=ok,
            hash_pne=bytes.fromhex(local["hash_pne"]["tag"]),
        ),
        LocalAuthResponse(
            txid=LOCAL_TXID,
            src=GATEWAY_ID,
            dst=PNE_ID,
            status=ok,
            hash_server=bytes.fromhex(local["hash_server"]["tag"]),
        ),
    ]
    local_names = [
        ("local_auth_request", "PNE -> PN GW (PAN), LocalEUKey authentication"),
        ("pne_authenticate_request_local", "PN GW -> PNE (PAN), flow LOCAL"),
        ("pne_authenticate_response_local", "PNE -> PN GW (PAN), flow LOCAL"),
        ("local_auth_response", "PN GW -> PNE (PAN)"),
    ]
    # The role machines, fed the same random values, send exactly these messages in this
    # order (PNE, PN GW, server and the LocalEUKey authentication that follows).
    machines, local_machines = _by_the_machines()
    order = {m: i for i, m in enumerate(machines)}
    assert sorted(msgs, key=lambda m: order[m]) == machines, "the machines disagree"
    assert local_machines == local_msgs, "the local machines disagree"
    return {
        "inputs": {
            "server_id": SERVER_ID,
            "gateway_id": GATEWAY_ID,
            "gateway_eukey": GATEWAY_EUKEY.hex(),
            "pn_id": PN_ID,
            "pnes": [
                {"pne_id": PNE_ID, "eukey": PNE_EUKEY_1.hex(), "rand_pne": RAND_PNE_1.hex()},
                {"pne_id": PNE_ID_2, "eukey": PNE_EUKEY_2.hex(), "rand_pne": RAND_PNE_2.hex()},
            ],
            "est_id": EST_ID.hex(),
            "rand_server": RAND_SERVER_EST.hex(),
            "local_eukey": LOCAL_EUKEY.hex(),
        },
        "rand_hash": [one, two],
        "local_eukey_copy_pne": copy_pne,
        "local_eukey_copy_gw": copy_gw,
        "messages": [message_json(n, m, note) for (n, note), m in zip(names, msgs, strict=True)],
        "local_auth": {
            "inputs": {
                "est_id": LOCAL_EST_ID.hex(),
                "rand_pne": RAND_PNE_LOCAL.hex(),
                "rand_gw": RAND_GW_LOCAL.hex(),
            },
            "rand_hash": local,
            "messages": [
                message_json(n, m, note)
                for (n, note), m in zip(local_names, local_msgs, strict=True)
            ],
        },
    }


def _by_the_machines() -> tuple[list[Message], list[Message]]:
    """The same establishment and LocalEUKey authentication driven through the role
    machines with the fixed random values above: what the code sends, in order."""
    from cpns.protocol import local_auth as la
    from cpns.protocol import pn_establishment as pe
    from cpns.records import EntityRecord

    entities = {
        GATEWAY_ID: EntityRecord(
            entity_id=GATEWAY_ID,
            kind=EntityKind.PN_GW,
            owner=USER_ID,
            eukeys=(GATEWAY_EUKEY,),
            key_index=1,
        ),
        PNE_ID: EntityRecord(
            entity_id=PNE_ID, kind=EntityKind.PNE, owner=USER_ID, eukeys=(PNE_EUKEY_1,), key_index=1
        ),
        PNE_ID_2: EntityRecord(
            entity_id=PNE_ID_2,
            kind=EntityKind.PNE,
            owner=USER_ID,
            eukeys=(PNE_EUKEY_2,),
            key_index=1,
        ),
    }
    lookups = pe.EstablishmentLookups(get_entity=entities.get, get_tk_state=lambda _: None)
    origin = pe.OriginatingPNE(
        pne_id=PNE_ID,
        gw_id=GATEWAY_ID,
        server_id=SERVER_ID,
        eukey=PNE_EUKEY_1,
        tk_state=None,
        rng=_Script(RAND_PNE_1, SETUP_TXID),
    )
    invited = pe.InvitedPNE(
        pne_id=PNE_ID_2,
        gw_id=GATEWAY_ID,
        server_id=SERVER_ID,
        eukey=PNE_EUKEY_2,
        tk_state=None,
        rng=_Script(RAND_PNE_2),
    )
    gateway = pe.GatewayEstablishment(
        gw_id=GATEWAY_ID,
        gw_eukey=GATEWAY_EUKEY,
        server_id=SERVER_ID,
        rng=_Script(INVITE_TXID, UP_TXID_1, AUTH_TXID_1, AUTH_TXID_2, UP_TXID_2),
        tk_lookup=lambda _: None,
    )
    server_rng = _Script(EST_ID, RAND_SERVER_EST, LOCAL_EUKEY, NONCE_LOCAL_PNE, NONCE_LOCAL_GW)
    pending: list[pe.EstablishmentPending] = []
    sent: list[Message] = []

    def serve(message: Message) -> list[Message]:
        machine: pe.ServerSetup | pe.ServerCompletion
        if isinstance(message, PNEstablishRequest):
            machine = pe.ServerSetup(
                server_id=SERVER_ID, requester=GATEWAY_ID, lookups=lookups, rng=server_rng, now=NOW
            )
        else:
            machine = pe.ServerCompletion(
                server_id=SERVER_ID,
                requester=GATEWAY_ID,
                pending=pending[0],
                lookups=lookups,
                now=NOW,
            )
        events = machine.receive(message)
        pending.extend(e for e in events if isinstance(e, pe.EstablishmentPending))
        return machine.messages_to_send()

    parties: dict[str, Any] = {PNE_ID: origin, PNE_ID_2: invited, GATEWAY_ID: gateway}
    origin.start(pn_id=PN_ID, invite=(PNE_ID_2,), local_eukey=True)
    queue = origin.messages_to_send()
    local_key = b""
    while queue:
        message = queue.pop(0)
        sent.append(message)
        if message.dst == SERVER_ID:
            queue += serve(message)
            continue
        events = parties[message.dst].receive(message)
        local_key = next(
            (e.local_eukey for e in events if isinstance(e, pe.LocalEUKeyStored)), local_key
        )
        queue += parties[message.dst].messages_to_send()
    assert local_key == LOCAL_EUKEY
    pne = la.LocalAuthPNE(
        pne_id=PNE_ID,
        gw_id=GATEWAY_ID,
        pn_id=PN_ID,
        local_eukey=local_key,
        rng=_Script(RAND_PNE_LOCAL, LOCAL_TXID),
    )
    gw = la.LocalAuthGateway(
        gw_id=GATEWAY_ID,
        local_eukey=lambda _p, _n: LOCAL_EUKEY,
        rng=_Script(LOCAL_EST_ID, RAND_GW_LOCAL),
    )
    pne.start()
    local_sent: list[Message] = []
    queue = pne.messages_to_send()
    while queue:
        message = queue.pop(0)
        local_sent.append(message)
        party: Any = gw if message.dst == GATEWAY_ID else pne
        party.receive(message)
        queue += party.messages_to_send()
    return sent, local_sent


def _tk_and_refusal_messages() -> list[dict[str, Any]]:
    """Message shapes of the TK flow and of refusals (TK values illustrative here; their
    derivations are those of docs/wire.md section 8.11)."""
    tk = AuthFlow.TK
    return [
        message_json(
            "authenticate_request_tk_and_refused",
            AuthenticateRequest(
                txid=UP_TXID_1,
                src=SERVER_ID,
                dst=GATEWAY_ID,
                pn_id=PN_ID,
                status=ErrorCode.OK,
                est_id=EST_ID,
                rand_server=RAND_SERVER_EST,
                entries=(
                    AuthChallenge(
                        pne_id=PNE_ID,
                        status=ErrorCode.OK,
                        flow=tk,
                        an=_fill(0x74, 32),
                        tk_step=3,
                        key_index=2,
                    ),
                    AuthChallenge(pne_id=PNE_ID_2, status=ErrorCode.POLICY_DENIED),
                ),
            ),
            "a TK challenge and a PNE refused alone (TK values illustrative)",
        ),
        message_json(
            "pne_authenticate_request_tk",
            PNEAuthenticateRequest(
                txid=AUTH_TXID_1,
                src=GATEWAY_ID,
                dst=PNE_ID,
                pn_id=PN_ID,
                est_id=EST_ID,
                auth_flow=tk,
                rand_server=RAND_SERVER_EST,
                an=_fill(0x74, 32),
                tk_step=3,
                key_index=2,
                sealed_next_eukey=_fill(0x75, 61),
            ),
            "TK flow, PN GW -> PNE (values illustrative)",
        ),
        message_json(
            "pne_authenticate_response_tk",
            PNEAuthenticateResponse(
                txid=AUTH_TXID_1,
                src=PNE_ID,
                dst=GATEWAY_ID,
                est_id=EST_ID,
                status=ErrorCode.OK,
                sealed_eukey=_fill(0x76, 61),
                key_index=2,
                tk_step=3,
            ),
            "TK flow, PNE -> PN GW (values illustrative)",
        ),
        message_json(
            "authenticate_response_with_timeout",
            AuthenticateResponse(
                txid=UP_TXID_2,
                src=GATEWAY_ID,
                dst=SERVER_ID,
                est_id=EST_ID,
                entries=(
                    AuthProof(
                        pne_id=PNE_ID,
                        status=ErrorCode.OK,
                        sealed_eukey=_fill(0x76, 61),
                        key_index=2,
                        tk_step=3,
                    ),
                    AuthProof(pne_id=PNE_ID_2, status=ErrorCode.TIMEOUT),
                ),
            ),
            "a TK proof and a PNE that did not answer in time (values illustrative)",
        ),
        message_json(
            "pn_establish_response_tk",
            PNEstablishResponse(
                txid=UP_TXID_2,
                src=SERVER_ID,
                dst=GATEWAY_ID,
                status=ErrorCode.OK,
                est_id=EST_ID,
                entries=(
                    AuthResult(
                        pne_id=PNE_ID,
                        status=ErrorCode.OK,
                        flow=tk,
                        confirm=_fill(0x77, 32),
                        reassign=True,
                    ),
                    AuthResult(
                        pne_id=PNE_ID_2,
                        status=ErrorCode.TIMEOUT,
                        flow=AuthFlow.RAND_HASH,
                        reassign=False,
                    ),
                ),
            ),
            "TK confirmation with re-assignment due; a PNE failed alone (values illustrative)",
        ),
        message_json(
            "pn_establish_response_unknown",
            PNEstablishResponse(
                txid=UP_TXID_2,
                src=SERVER_ID,
                dst=GATEWAY_ID,
                status=ErrorCode.UNKNOWN_ESTABLISHMENT,
                est_id=EST_ID,
                entries=(),
            ),
            "no pending establishment with this ID: no entries",
        ),
        message_json(
            "pn_setup_response_refused",
            PNSetupResponse(
                txid=SETUP_TXID,
                src=GATEWAY_ID,
                dst=PNE_ID,
                pn_id=PN_ID,
                status=ErrorCode.UPSTREAM_UNAVAILABLE,
                members=(),
            ),
            "the PN GW could not reach the server: status only",
        ),
        message_json(
            "pn_establishment_notify_tk",
            PNEstablishmentNotify(
                txid=INVITE_TXID,
                src=GATEWAY_ID,
                dst=PNE_ID_2,
                pn_id=PN_ID,
                status=ErrorCode.OK,
                est_id=EST_ID,
                confirm=_fill(0x77, 32),
            ),
            "TK flow: key confirmation instead of hash_server (values illustrative)",
        ),
    ]


def _digest() -> dict[str, Any]:
    server = DigestServer(realm=REALM, nonce_key=DIGEST_NONCE_KEY)
    (challenge,) = server.challenge(now=NOW, rng=_Script(DIGEST_NONCE_RAND))
    client = DigestClient(GATEWAY_ID, GATEWAY_EUKEY.hex())
    uri = "/cpns/v1/messages"
    authorization = client.authorization(
        challenges=[challenge], method="POST", uri=uri, rng=_Script(DIGEST_CNONCE)
    )
    ok = server.verify(
        method="POST",
        uri=uri,
        authorization=authorization,
        lookup={GATEWAY_ID: GATEWAY_EUKEY.hex()}.get,
        now=NOW + 1,
    )
    client.verify_response(ok.authentication_info)
    tag = mac(DIGEST_NONCE_KEY, NONCE_LABEL, REALM, NOW, DIGEST_NONCE_RAND)
    nonce = base64.urlsafe_b64encode(NOW.to_bytes(8, "big") + DIGEST_NONCE_RAND + tag).decode()
    common = {
        "username": GATEWAY_ID,
        "realm": REALM,
        "password": GATEWAY_EUKEY.hex(),
        "uri": uri,
        "nonce": nonce,
        "nc": "00000001",
        "cnonce": DIGEST_CNONCE.hex(),
        "qop": "auth",
    }
    responses = []
    for algorithm in (DigestAlgorithm.SHA_256, DigestAlgorithm.MD5):
        args = {k: v for k, v in common.items()}
        responses.append(
            {
                "algorithm": algorithm.value,
                **args,
                "method": "POST",
                "response": compute_response(algorithm=algorithm, method="POST", **args),
                "rspauth": compute_response(algorithm=algorithm, method="", **args),
            }
        )
    return {
        "nonce": {
            "nonce_key": DIGEST_NONCE_KEY.hex(),
            "realm": REALM,
            "issued": NOW,
            "random": DIGEST_NONCE_RAND.hex(),
            "label": NONCE_LABEL,
            "tag": tag.hex(),
            "nonce": nonce,
        },
        "responses": responses,
        "exchange": {
            "www_authenticate": challenge,
            "authorization": authorization,
            "authentication_info": ok.authentication_info,
        },
    }


def _primitives() -> dict[str, Any]:
    label = "cpns/v1/test-vector"
    parts: list[Part] = [b"\x00\x01\x02", "h\u00e9llo", 0, 2**64 - 1, b""]
    key = _fill(0x0B, 32)
    secret = bytes(range(1, 33))
    salt = _fill(0x11, 32) + _fill(0x22, 32)
    context: tuple[Part, ...] = ("gw-alice", "alice", _fill(0x33, 16))
    return {
        "encode_parts": {
            "label": label,
            "parts": parts_json(parts),
            "encoding": encode_parts(label, parts).hex(),
        },
        "hash": {
            "label": label,
            "parts": parts_json(parts),
            "digest": hash_values(label, *parts).hex(),
        },
        "mac": {
            "key": key.hex(),
            "label": label,
            "parts": parts_json(parts),
            "tag": mac(key, label, *parts).hex(),
        },
        "hkdf": {
            "secret": secret.hex(),
            "salt": salt.hex(),
            "label": "cpns/v1/test-kdf",
            "context": parts_json(context),
            "info": encode_parts("cpns/v1/test-kdf", context).hex(),
            "length": 42,
            "okm": derive_key(
                secret, salt=salt, label="cpns/v1/test-kdf", context=context, length=42
            ).hex(),
        },
        "password_key": {
            "password": PASSWORD,
            "realm": REALM,
            "user_id": USER_ID,
            "scrypt": {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "dklen": 32},
            "salt": password_salt(REALM, USER_ID).hex(),
            "key": password_key(PASSWORD, realm=REALM, user_id=USER_ID).hex(),
        },
        "chain": {
            "label": CHAIN_LABEL,
            "seed": bytes(range(32)).hex(),
            "n": 4,
            "eukeys": [k.hex() for k in build_chain(bytes(range(32)), 4)],
        },
        "seal": seal_json(
            _fill(0x5E, 32),
            bytes(range(32, 64)),
            purpose="test/purpose",
            context=("cpns-server", "gw-alice", 7),
            nonce=bytes(range(12)),
        ),
    }


def _other_messages() -> list[dict[str, Any]]:
    return [
        message_json(
            "pne_hello",
            PNEHello(txid=HELLO_TXID, src=PNE_ID, dst=GATEWAY_ID, has_ui=False, key_index=0),
            "PNE -> PN GW, first frame on a new PAN connection",
        ),
        message_json(
            "pne_hello_with_pn_id",
            PNEHello(
                txid=HELLO_TXID,
                src=PNE_ID,
                dst=GATEWAY_ID,
                pn_id=PN_ID,
                has_ui=False,
                key_index=1,
            ),
            "the optional PN ID header field present",
        ),
        message_json(
            "pne_hello_with_flow",
            PNEHello(
                txid=HELLO_TXID,
                src=PNE_ID,
                dst=GATEWAY_ID,
                flow=FLOW_ID,
                has_ui=False,
                key_index=0,
            ),
            "the optional flow ID header field present (not a security input)",
        ),
        message_json(
            "error_with_flow",
            ErrorMessage(
                txid=ERROR_TXID,
                src=GATEWAY_ID,
                dst=PNE_ID,
                flow=FLOW_ID,
                status=ErrorCode.UNEXPECTED_MESSAGE,
            ),
            "an error reply echoing the flow ID of the message it answers",
        ),
        message_json(
            "error",
            ErrorMessage(
                txid=ERROR_TXID, src=SERVER_ID, dst=GATEWAY_ID, status=ErrorCode.MALFORMED_MESSAGE
            ),
            "generic error reply to an undecodable or unacceptable message",
        ),
        message_json(
            "eukey_assignment_response_refused",
            EUKeyAssignmentResponse(
                txid=TXID_003,
                src=SERVER_ID,
                dst=GATEWAY_ID,
                status=ErrorCode.CLAIM_NOT_PROVEN,
                pne_id=PNE_ID,
            ),
            "a refusal: status only, no sealed bundle",
        ),
        message_json(
            "eukey_assignment_ack_refused",
            EUKeyAssignmentAck(
                txid=TXID_003,
                src=PNE_ID,
                dst=GATEWAY_ID,
                status=ErrorCode.AUTHENTICATION_FAILED,
                key_index=1,
            ),
            "the PNE could not open the Notification: no proof",
        ),
        message_json(
            "user_key_assignment_response_refused",
            UserKeyAssignmentResponse(
                txid=TXID_004, src=SERVER_ID, dst=GATEWAY_ID, status=ErrorCode.WRONG_PASSWORD
            ),
            "a refusal: status only",
        ),
    ]


def build() -> dict[str, Any]:
    """Every vector, as the committed JSON holds it."""
    enrolment = _enrolment()
    assignment = _assignment()
    establishment = _establishment()
    messages = [
        enrolment["request"],
        enrolment["response"],
        assignment["request"],
        assignment["response"],
        assignment["notification"],
        assignment["ack"],
        *establishment["messages"],
        *establishment["local_auth"]["messages"],
        *_tk_and_refusal_messages(),
        *_other_messages(),
    ]
    return {
        "version": 1,
        "generator": "tests/vectors/make_protocol_vectors.py",
        "note": "Throwaway inputs; every value is explained in docs/wire.md.",
        "messages": messages,
        "primitives": _primitives(),
        "enrolment_004": enrolment,
        "assignment_003": assignment,
        # A re-assignment after three TK-based authentications (000 ratchet, TK_3).
        "reassignment_003": _assignment(tk_step=3, epoch=2),
        "establishment_002": establishment,
        "digest": _digest(),
    }


def render() -> str:
    """The JSON file's exact text."""
    return json.dumps(build(), indent=2, ensure_ascii=True) + "\n"


# -- docs/wire.md generated blocks ----------------------------------------------------------

_BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _wrap(text: str, width: int = 88) -> Iterator[str]:
    for start in range(0, len(text), width):
        yield text[start : start + width]


def _hex_block(title: str, hexstr: str) -> list[str]:
    return [f"{title} ({len(hexstr) // 2} bytes):", *("    " + line for line in _wrap(hexstr))]


def render_example(vectors: dict[str, Any]) -> str:
    """The worked example of docs/wire.md, from the vectors."""
    e, a, d = vectors["enrolment_004"], vectors["assignment_003"], vectors["digest"]
    out = ["```text"]
    out += [
        "== 004 enrolment of the PN GW (with UI) ==",
        f"inputs: user {e['inputs']['user_id']!r}, password {e['inputs']['password']!r}, "
        f"realm {e['inputs']['realm']!r}, entity {e['inputs']['entity_id']!r} (kind 2), "
        f"time {e['inputs']['time']}",
        f"password_salt = {e['password_salt']}",
        f"password_key  = {e['password_key']}",
        f"auth_data     = {e['auth_data']}",
        *_hex_block("UserKeyAssignmentRequest, POST body", e["request"]["cbor"]),
        f"reply_key     = {e['reply_key']['key']}",
        f"  salt = rand || rand_server = {e['reply_key']['salt']}",
        f"aead_key      = {e['sealed_eukey']['aead_key']}",
        *_hex_block("associated data", e["sealed_eukey"]["associated_data"]),
        *_hex_block("sealed_eukey", e["sealed_eukey"]["blob"]),
        *_hex_block("UserKeyAssignmentResponse, 200 body", e["response"]["cbor"]),
        f"the PN GW's EUKey = {e['inputs']['eukey']}",
        "",
        "== the 003 request over HTTPS, with Digest (RFC 7616, SHA-256) ==",
        "> POST /cpns/v1/messages HTTP/1.1",
        "> Content-Type: application/cbor",
        ">   (body: the EUKeyAssignmentRequest below, no Authorization yet)",
        "< HTTP/1.1 401 Unauthorized",
        "< WWW-Authenticate: " + d["exchange"]["www_authenticate"],
        "> POST /cpns/v1/messages HTTP/1.1  (the same body again, now with)",
        "> Authorization: " + d["exchange"]["authorization"],
        "< HTTP/1.1 200 OK",
        "< Content-Type: application/cbor",
        "< Authentication-Info: " + d["exchange"]["authentication_info"],
        "<   (body: the EUKeyAssignmentResponse below)",
        f"(Digest password = the PN GW's EUKey in hex, nonce issued at {d['nonce']['issued']})",
        "",
        "== 003 assignment of a PNE without UI ==",
        f"inputs: PNE {a['inputs']['pne_id']!r}, TK {a['inputs']['tk']}, "
        f"chain length {a['inputs']['chain_length']}, epoch {a['inputs']['epoch']}",
        f"claim code on the label = {a['claim_code']}",
        f"claim_key     = {a['claim_key']}",
        f"auth_data     = {a['auth_data']}",
        f"claim_proof   = {a['claim_proof']}",
        *_hex_block("EUKeyAssignmentRequest, POST body", a["request"]["cbor"]),
        f"SeedPNE       = {a['seed_pne']}",
        *(f"EUKey_{i + 1}       = {k}" for i, k in enumerate(a["eukeys"])),
        *_hex_block("KeyBundle (plaintext)", a["key_bundle"]["cbor"]),
        f"aead_key      = {a['bundle_seal']['aead_key']}",
        *_hex_block("associated data", a["bundle_seal"]["associated_data"]),
        *_hex_block("EUKeyAssignmentResponse, 200 body", a["response"]["cbor"]),
        f"notification aead_key = {a['notification_seal']['aead_key']}",
        *_hex_block("associated data", a["notification_seal"]["associated_data"]),
        f"PAN frame header: {len(a['notification']['cbor']) // 2:08x}",
        *_hex_block("EUKeyAssignmentNotification, PAN payload", a["notification"]["cbor"]),
        f"ack proof     = {a['ack_proof']['tag']}",
        f"PAN frame header: {len(a['ack']['cbor']) // 2:08x}",
        *_hex_block("EUKeyAssignmentAck, PAN payload", a["ack"]["cbor"]),
        "",
        *_establishment_example(vectors["establishment_002"]),
        "```",
    ]
    return "\n".join(out) + "\n"


def _establishment_example(e: dict[str, Any]) -> list[str]:
    """The PN Establishment part of the worked example (section 8.10 values, two messages)."""
    by_name = {m["name"]: m for m in e["messages"]}
    out = [
        "== 002 PN Establishment: two PNEs (rand/hash), the originator with a LocalEUKey ==",
        f"inputs: PN {e['inputs']['pn_id']!r}, est_id {e['inputs']['est_id']}, "
        f"rand_server {e['inputs']['rand_server']}",
    ]
    for pne, v in zip(e["inputs"]["pnes"], e["rand_hash"], strict=True):
        out += [
            f"{pne['pne_id']}: EUKey {pne['eukey']}, rand_PNE {pne['rand_pne']}",
            f"  SK          = {v['sk']['key']}",
            f"  hash_PNE    = {v['hash_pne']['tag']}",
            f"  hash_server = {v['hash_server']['tag']}",
        ]
    out += [
        f"LocalEUKey    = {e['inputs']['local_eukey']}",
        *_hex_block("its copy for the PNE", e["local_eukey_copy_pne"]["blob"]),
        *_hex_block("its copy for the PN GW", e["local_eukey_copy_gw"]["blob"]),
        *_hex_block("PNEstablishRequest, POST body", by_name["pn_establish_request"]["cbor"]),
        *_hex_block("AuthenticateResponse, POST body", by_name["authenticate_response"]["cbor"]),
        *_hex_block("PNEstablishResponse, 200 body", by_name["pn_establish_response"]["cbor"]),
        "LocalEUKey authentication that follows (K = LocalEUKey):",
        f"  SK          = {e['local_auth']['rand_hash']['sk']['key']}",
        f"  hash_PNE    = {e['local_auth']['rand_hash']['hash_pne']['tag']}",
        f"  hash_GW     = {e['local_auth']['rand_hash']['hash_server']['tag']}",
    ]
    return out


_ENTITY_IDS = """\
Entity IDs (of PNEs, PN GWs and the server), User IDs and PN IDs share one syntax,
the `cpns-id` rule of section 3:

```text
{pattern}
```

that is 1 to {max_len} characters of `A-Z a-z 0-9 . _ @ + -`, the first a letter
or a digit: ASCII only, no space, no `:` (Digest joins username and realm with
`:`), so no IPv6 literal and no `host:port` is an ID. On the wire IDs are compared
byte for byte (case-sensitive).

An ID that an entity may *register* (by enrolment, section 3.3, or by a TK import
at the server) must moreover be:

* in canonical form: lowercase (so no two registered IDs differ only by case; a
  peer SHOULD lowercase an ID before first use);
* not the server's own Entity ID (in any case);
* not a reserved name: {reserved}, nor any name ending in `.localhost`;
* not written like a network address: digits and dots only (`10.0.0.1`, `127.1`).

The server refuses any other ID at enrolment with `INVALID_ENTITY_ID` (section 5).
`pan` is the destination of a PNEHello (section 6); `unknown` the destination of
an ErrorMessage answering a message whose source could not be read (section 2.2).
"""


def render_entity_ids() -> str:
    """Section 4 of docs/wire.md: the ID syntax and the reserved names, from the constants."""
    reserved = sorted(getattr(constants, "RESERVED_IDS", ()))
    return _ENTITY_IDS.format(
        pattern=ID_PATTERN.pattern,
        max_len=MAX_ID_LEN,
        reserved=", ".join(f"`{r}`" for r in reserved) if reserved else "(none)",
    )


def _generators(vectors: dict[str, Any]) -> dict[str, Callable[[], str]]:
    return {
        "cddl": lambda: "```cddl\n" + render_cddl() + "```\n",
        "entity-ids": render_entity_ids,
        "status-codes": render_status_table,
        "example": lambda: render_example(vectors),
    }


def render_wire(text: str, vectors: dict[str, Any] | None = None) -> str:
    """``text`` with every generated block of docs/wire.md replaced by its regeneration."""
    gens = _generators(vectors if vectors is not None else build())

    def fill(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in gens:
            raise KeyError(f"docs/wire.md: unknown generated block {name!r}")
        return match.group(1) + gens[name]() + match.group(4)

    return _BLOCK.sub(fill, text)


def main() -> int:
    """Write both files; with ``--check``, only compare and exit 1 on a difference."""
    vectors = build()
    text = json.dumps(vectors, indent=2, ensure_ascii=True) + "\n"
    wire = WIRE.read_text(encoding="utf-8")
    new_wire = render_wire(wire, vectors)
    if "--check" in sys.argv[1:]:
        same = OUT.exists() and OUT.read_text(encoding="ascii") == text and new_wire == wire
        return 0 if same else 1
    OUT.write_text(text, encoding="ascii")
    WIRE.write_text(new_wire, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
