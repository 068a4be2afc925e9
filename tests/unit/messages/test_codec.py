"""cpns.messages: golden bytes of every message, the JSON view, and the strict decoder's
failure table (DESIGN §3, STYLE §3 and §8)."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import cbor2
import pytest

from cpns.errors import DecodeError, ErrorCode
from cpns.messages.codec import (
    decode,
    decode_record,
    encode,
    encode_record,
    encode_without_flow,
    record_json,
    to_json,
)
from cpns.messages.constants import MAX_MESSAGE_SIZE, AuthFlow, HeaderKey, MessageType
from cpns.messages.model import (
    MESSAGE_CLASSES,
    NESTED_RECORDS,
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
    FieldSpec,
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
    specs,
)
from cpns.types import EntityKind

TXID = bytes(range(16))
#: Fixed field values of the PN Establishment goldens: a rand, an est_id, a hash, a seal.
R, E, H, S = b"\x11" * 32, b"\x22" * 16, b"\x33" * 32, b"\x44" * 61

# -- golden bytes -------------------------------------------------------------------------
#
# (id, message, encoding, layout): the encoding is recorded from cpns.messages.encode; the
# layout is the same message written by hand as DESIGN §3's map, {0: version, 1: type,
# 2: txid, 3: src, 4: dst, [5: pn_id,] 6: body}, and is compared with what plain cbor2
# reads from the golden bytes (an independent check of the recorded hex).

GOLDEN: list[tuple[str, Message, str, dict[int, Any]]] = [
    (
        "error",
        ErrorMessage(
            txid=TXID, src="cpns-server", dst="gw-alice", status=ErrorCode.MALFORMED_MESSAGE
        ),
        "a6000101010250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c6963"
        "6506a1011864",
        {0: 1, 1: 1, 2: TXID, 3: "cpns-server", 4: "gw-alice", 6: {1: 100}},
    ),
    (
        "user-key-assignment-request",
        UserKeyAssignmentRequest(
            txid=TXID,
            src="gw-alice",
            dst="cpns-server",
            user_id="alice",
            entity_kind=EntityKind.PN_GW,
            time=1_700_000_000,
            rand=b"\x11" * 32,
            auth_data=b"\x22" * 32,
        ),
        "a60001010a0250000102030405060708090a0b0c0d0e0f036867772d616c696365046b63706e732d7365727665"
        "7206a50165616c6963650202031a6553f1000458201111111111111111111111111111111111111111111111"
        "1111111111111111110558202222222222222222222222222222222222222222222222222222222222222222",
        {
            0: 1,
            1: 10,
            2: TXID,
            3: "gw-alice",
            4: "cpns-server",
            6: {1: "alice", 2: 2, 3: 1_700_000_000, 4: b"\x11" * 32, 5: b"\x22" * 32},
        },
    ),
    (
        "user-key-assignment-response-ok",
        UserKeyAssignmentResponse(
            txid=TXID,
            src="cpns-server",
            dst="gw-alice",
            status=ErrorCode.OK,
            rand_server=b"\x33" * 32,
            sealed_eukey=b"\x44" * 61,
        ),
        "a60001010b0250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c6963"
        "6506a301000258203333333333333333333333333333333333333333333333333333333333333333"
        "03583d" + "44" * 61,
        {
            0: 1,
            1: 11,
            2: TXID,
            3: "cpns-server",
            4: "gw-alice",
            6: {1: 0, 2: b"\x33" * 32, 3: b"\x44" * 61},
        },
    ),
    (
        "user-key-assignment-response-refused",
        UserKeyAssignmentResponse(
            txid=TXID, src="cpns-server", dst="gw-alice", status=ErrorCode.AUTHENTICATION_FAILED
        ),
        "a60001010b0250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c6963"
        "6506a10118c8",
        {0: 1, 1: 11, 2: TXID, 3: "cpns-server", 4: "gw-alice", 6: {1: 200}},
    ),
    (
        "eukey-assignment-request-with-pn-id",
        EUKeyAssignmentRequest(
            txid=TXID,
            src="gw-alice",
            dst="cpns-server",
            pn_id="pn.alice",
            pne_id="pne-1",
            user_id="alice",
            time=1_700_000_000,
            rand_pngw=b"\x55" * 32,
            auth_data=b"\x66" * 32,
            claim_proof=b"\x77" * 32,
        ),
        "a7000101140250000102030405060708090a0b0c0d0e0f036867772d616c696365046b63706e732d7365727665"
        "720568706e2e616c69636506a60165706e652d310265616c696365031a6553f1000458205555555555555555"
        "5555555555555555555555555555555555555555555555550558206666666666666666666666666666666666"
        "666666666666666666666666666666065820" + "77" * 32,
        {
            0: 1,
            1: 20,
            2: TXID,
            3: "gw-alice",
            4: "cpns-server",
            5: "pn.alice",
            6: {
                1: "pne-1",
                2: "alice",
                3: 1_700_000_000,
                4: b"\x55" * 32,
                5: b"\x66" * 32,
                6: b"\x77" * 32,
            },
        },
    ),
    (
        "eukey-assignment-response-ok",
        EUKeyAssignmentResponse(
            txid=TXID,
            src="cpns-server",
            dst="gw-alice",
            status=ErrorCode.OK,
            pne_id="pne-1",
            sealed_bundle=b"\x77" * 40,
        ),
        "a6000101150250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c6963"
        "6506a301000265706e652d31035828" + "77" * 40,
        {
            0: 1,
            1: 21,
            2: TXID,
            3: "cpns-server",
            4: "gw-alice",
            6: {1: 0, 2: "pne-1", 3: b"\x77" * 40},
        },
    ),
    (
        "eukey-assignment-response-refused",
        EUKeyAssignmentResponse(
            txid=TXID,
            src="cpns-server",
            dst="gw-alice",
            status=ErrorCode.WRONG_PASSWORD,
            pne_id="pne-1",
        ),
        "a6000101150250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c6963"
        "6506a20118ca0265706e652d31",
        {0: 1, 1: 21, 2: TXID, 3: "cpns-server", 4: "gw-alice", 6: {1: 202, 2: "pne-1"}},
    ),
    (
        "eukey-assignment-notification",
        EUKeyAssignmentNotification(
            txid=TXID,
            src="gw-alice",
            dst="pne-1",
            status=ErrorCode.OK,
            key_index=1,
            sealed_eukey=b"\x88" * 61,
            epoch=1,
        ),
        "a6000101160250000102030405060708090a0b0c0d0e0f036867772d616c6963650465706e652d3106a4010002"
        "010358" + "3d" + "88" * 61 + "0401",
        {
            0: 1,
            1: 22,
            2: TXID,
            3: "gw-alice",
            4: "pne-1",
            6: {1: 0, 2: 1, 3: b"\x88" * 61, 4: 1},
        },
    ),
    (
        "eukey-assignment-ack-ok",
        EUKeyAssignmentAck(
            txid=TXID,
            src="pne-1",
            dst="gw-alice",
            status=ErrorCode.OK,
            key_index=1,
            proof=b"\x99" * 32,
        ),
        "a6000101170250000102030405060708090a0b0c0d0e0f0365706e652d31046867772d616c69636506a3010002"
        "010358209999999999999999999999999999999999999999999999999999999999999999",
        {0: 1, 1: 23, 2: TXID, 3: "pne-1", 4: "gw-alice", 6: {1: 0, 2: 1, 3: b"\x99" * 32}},
    ),
    (
        "eukey-assignment-ack-refused",
        EUKeyAssignmentAck(
            txid=TXID,
            src="pne-1",
            dst="gw-alice",
            status=ErrorCode.AUTHENTICATION_FAILED,
            key_index=1024,
        ),
        "a6000101170250000102030405060708090a0b0c0d0e0f0365706e652d31046867772d616c69636506a20118c8"
        "02190400",
        {0: 1, 1: 23, 2: TXID, 3: "pne-1", 4: "gw-alice", 6: {1: 200, 2: 1024}},
    ),
    (
        "pne-hello",
        PNEHello(txid=TXID, src="pne-1", dst="gw-alice", has_ui=False, key_index=0),
        "a6000101181e0250000102030405060708090a0b0c0d0e0f0365706e652d31046867772d616c69636506a201f4"
        "0200",
        {0: 1, 1: 30, 2: TXID, 3: "pne-1", 4: "gw-alice", 6: {1: False, 2: 0}},
    ),
    (
        "pn-setup-request",
        PNSetupRequest(
            txid=TXID,
            src="pne-1",
            dst="gw-alice",
            pn_id="pn-1",
            rand_pne=R,
            local_eukey=True,
            invite=("pne-2", "pne-3"),
        ),
        "a700010118280250000102030405060708090a0b0c0d0e0f0365706e652d31046867772d616c696365056470"
        "6e2d3106a3015820111111111111111111111111111111111111111111111111111111111111111102f50382"
        "65706e652d3265706e652d33",
        {
            0: 1,
            1: 40,
            2: TXID,
            3: "pne-1",
            4: "gw-alice",
            5: "pn-1",
            6: {1: R, 2: True, 3: ["pne-2", "pne-3"]},
        },
    ),
    (
        "pn-invite",
        PNInvite(txid=TXID, src="gw-alice", dst="pne-2", pn_id="pn-1", originator="pne-1"),
        "a700010118290250000102030405060708090a0b0c0d0e0f036867772d616c6963650465706e652d32056470"
        "6e2d3106a10165706e652d31",
        {0: 1, 1: 41, 2: TXID, 3: "gw-alice", 4: "pne-2", 5: "pn-1", 6: {1: "pne-1"}},
    ),
    (
        "pn-invite-response",
        PNInviteResponse(
            txid=TXID,
            src="pne-2",
            dst="gw-alice",
            status=ErrorCode.OK,
            rand_pne=R,
            local_eukey=False,
        ),
        "a6000101182a0250000102030405060708090a0b0c0d0e0f0365706e652d32046867772d616c69636506a301"
        "00025820111111111111111111111111111111111111111111111111111111111111111103f4",
        {0: 1, 1: 42, 2: TXID, 3: "pne-2", 4: "gw-alice", 6: {1: 0, 2: R, 3: False}},
    ),
    (
        "pn-establish-request",
        PNEstablishRequest(
            txid=TXID,
            src="gw-alice",
            dst="cpns-server",
            pn_id="pn-1",
            entries=(SetupEntry(pne_id="pne-1", rand_pne=R, local_eukey=True),),
        ),
        "a7000101182b0250000102030405060708090a0b0c0d0e0f036867772d616c696365046b63706e732d736572"
        "7665720564706e2d3106a10181a30165706e652d310258201111111111111111111111111111111111111111"
        "11111111111111111111111103f5",
        {
            0: 1,
            1: 43,
            2: TXID,
            3: "gw-alice",
            4: "cpns-server",
            5: "pn-1",
            6: {1: [{1: "pne-1", 2: R, 3: True}]},
        },
    ),
    (
        "authenticate-request",
        AuthenticateRequest(
            txid=TXID,
            src="cpns-server",
            dst="gw-alice",
            status=ErrorCode.OK,
            est_id=E,
            rand_server=R,
            entries=(
                AuthChallenge(
                    pne_id="pne-1",
                    status=ErrorCode.OK,
                    flow=AuthFlow.RAND_HASH,
                    sealed_local_gw=S,
                    sealed_local_pne=S,
                ),
                AuthChallenge(pne_id="pne-2", status=ErrorCode.DUPLICATE_PNE),
            ),
        ),
        "a6000101182c0250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c"
        "69636506a4010002502222222222222222222222222222222203582011111111111111111111111111111111"
        "111111111111111111111111111111110482a50165706e652d310200030104583d4444444444444444444444"
        "4444444444444444444444444444444444444444444444444444444444444444444444444444444444444444"
        "44444444444405583d4444444444444444444444444444444444444444444444444444444444444444444444"
        "4444444444444444444444444444444444444444444444444444a20165706e652d3202190135",
        {
            0: 1,
            1: 44,
            2: TXID,
            3: "cpns-server",
            4: "gw-alice",
            6: {1: 0, 2: E, 3: R, 4: [{1: "pne-1", 2: 0, 3: 1, 4: S, 5: S}, {1: "pne-2", 2: 309}]},
        },
    ),
    (
        "pne-authenticate-request",
        PNEAuthenticateRequest(
            txid=TXID,
            src="gw-alice",
            dst="pne-1",
            est_id=E,
            auth_flow=AuthFlow.TK,
            rand_server=R,
            an=H,
            tk_step=0,
            key_index=1,
            sealed_next_eukey=S,
        ),
        "a6000101182d0250000102030405060708090a0b0c0d0e0f036867772d616c6963650465706e652d3106a701"
        "5022222222222222222222222222222222020203582011111111111111111111111111111111111111111111"
        "1111111111111111111105582033333333333333333333333333333333333333333333333333333333333333"
        "330600070108583d444444444444444444444444444444444444444444444444444444444444444444444444"
        "44444444444444444444444444444444444444444444444444",
        {
            0: 1,
            1: 45,
            2: TXID,
            3: "gw-alice",
            4: "pne-1",
            6: {1: E, 2: 2, 3: R, 5: H, 6: 0, 7: 1, 8: S},
        },
    ),
    (
        "pne-authenticate-response",
        PNEAuthenticateResponse(
            txid=TXID, src="pne-1", dst="gw-alice", est_id=E, status=ErrorCode.OK, hash_pne=H
        ),
        "a6000101182e0250000102030405060708090a0b0c0d0e0f0365706e652d31046867772d616c69636506a301"
        "5022222222222222222222222222222222020003582033333333333333333333333333333333333333333333"
        "33333333333333333333",
        {0: 1, 1: 46, 2: TXID, 3: "pne-1", 4: "gw-alice", 6: {1: E, 2: 0, 3: H}},
    ),
    (
        "authenticate-response",
        AuthenticateResponse(
            txid=TXID,
            src="gw-alice",
            dst="cpns-server",
            est_id=E,
            entries=(
                AuthProof(pne_id="pne-1", status=ErrorCode.OK, hash_pne=H),
                AuthProof(pne_id="pne-2", status=ErrorCode.TIMEOUT),
            ),
        ),
        "a6000101182f0250000102030405060708090a0b0c0d0e0f036867772d616c696365046b63706e732d736572"
        "76657206a20150222222222222222222222222222222220282a30165706e652d310200035820333333333333"
        "3333333333333333333333333333333333333333333333333333a20165706e652d32021901f8",
        {
            0: 1,
            1: 47,
            2: TXID,
            3: "gw-alice",
            4: "cpns-server",
            6: {1: E, 2: [{1: "pne-1", 2: 0, 3: H}, {1: "pne-2", 2: 504}]},
        },
    ),
    (
        "pn-establish-response",
        PNEstablishResponse(
            txid=TXID,
            src="cpns-server",
            dst="gw-alice",
            status=ErrorCode.OK,
            est_id=E,
            entries=(
                AuthResult(
                    pne_id="pne-1",
                    status=ErrorCode.OK,
                    flow=AuthFlow.RAND_HASH,
                    hash_server=H,
                    reassign=False,
                ),
            ),
        ),
        "a600010118300250000102030405060708090a0b0c0d0e0f036b63706e732d736572766572046867772d616c"
        "69636506a301000250222222222222222222222222222222220381a50165706e652d31020003010458203333"
        "33333333333333333333333333333333333333333333333333333333333306f4",
        {
            0: 1,
            1: 48,
            2: TXID,
            3: "cpns-server",
            4: "gw-alice",
            6: {1: 0, 2: E, 3: [{1: "pne-1", 2: 0, 3: 1, 4: H, 6: False}]},
        },
    ),
    (
        "pn-setup-response",
        PNSetupResponse(
            txid=TXID,
            src="gw-alice",
            dst="pne-1",
            status=ErrorCode.OK,
            est_id=E,
            hash_server=H,
            members=(
                MemberStatus(pne_id="pne-1", status=ErrorCode.OK, flow=AuthFlow.RAND_HASH),
                MemberStatus(pne_id="pne-2", status=ErrorCode.POLICY_DENIED),
            ),
        ),
        "a600010118310250000102030405060708090a0b0c0d0e0f036867772d616c6963650465706e652d3106a401"
        "0002502222222222222222222222222222222203582033333333333333333333333333333333333333333333"
        "333333333333333333330482a30165706e652d3102000301a20165706e652d3202190134",
        {
            0: 1,
            1: 49,
            2: TXID,
            3: "gw-alice",
            4: "pne-1",
            6: {1: 0, 2: E, 3: H, 4: [{1: "pne-1", 2: 0, 3: 1}, {1: "pne-2", 2: 308}]},
        },
    ),
    (
        "pn-establishment-notify",
        PNEstablishmentNotify(
            txid=TXID, src="gw-alice", dst="pne-2", status=ErrorCode.OK, est_id=E, confirm=H
        ),
        "a600010118320250000102030405060708090a0b0c0d0e0f036867772d616c6963650465706e652d3206a301"
        "0002502222222222222222222222222222222204582033333333333333333333333333333333333333333333"
        "33333333333333333333",
        {0: 1, 1: 50, 2: TXID, 3: "gw-alice", 4: "pne-2", 6: {1: 0, 2: E, 4: H}},
    ),
    (
        "local-auth-request",
        LocalAuthRequest(txid=TXID, src="pne-1", dst="gw-alice", pn_id="pn-1", rand_pne=R),
        "a700010118330250000102030405060708090a0b0c0d0e0f0365706e652d31046867772d616c696365056470"
        "6e2d3106a10158201111111111111111111111111111111111111111111111111111111111111111",
        {0: 1, 1: 51, 2: TXID, 3: "pne-1", 4: "gw-alice", 5: "pn-1", 6: {1: R}},
    ),
    (
        "local-auth-response",
        LocalAuthResponse(
            txid=TXID, src="gw-alice", dst="pne-1", status=ErrorCode.OK, hash_server=H
        ),
        "a600010118340250000102030405060708090a0b0c0d0e0f036867772d616c6963650465706e652d3106a201"
        "000258203333333333333333333333333333333333333333333333333333333333333333",
        {0: 1, 1: 52, 2: TXID, 3: "gw-alice", 4: "pne-1", 6: {1: 0, 2: H}},
    ),
]

BUNDLE = KeyBundle(tk=bytes(range(16)), eukeys=(b"\xaa" * 32, b"\xbb" * 32), epoch=1)
BUNDLE_HEX = (
    "a30150000102030405060708090a0b0c0d0e0f02825820aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    "aaaaaaaaaaaaaaaaaaaa5820bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
    "0301"
)


def test_golden_table_covers_every_message_type() -> None:
    """STYLE §8: golden bytes exist for every message type of MESSAGE_CLASSES."""
    assert {type(m) for _, m, _, _ in GOLDEN} == set(MESSAGE_CLASSES.values())
    assert {m.TYPE for _, m, _, _ in GOLDEN} == set(MessageType)


@pytest.mark.parametrize(
    ("message", "encoding"), [(m, h) for _, m, h, _ in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_golden_encode(message: Message, encoding: str) -> None:
    """DESIGN §3: deterministic CBOR (RFC 8949 §4.2); the encoding is exactly the recorded bytes."""
    assert encode(message).hex() == encoding


@pytest.mark.parametrize(
    ("message", "encoding"), [(m, h) for _, m, h, _ in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_golden_decode(message: Message, encoding: str) -> None:
    """STYLE §8: the golden bytes decode into the exact dataclass, and re-encode byte for byte."""
    decoded = decode(bytes.fromhex(encoding))
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode(decoded).hex() == encoding


@pytest.mark.parametrize(
    ("encoding", "layout"), [(h, lay) for _, _, h, lay in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_golden_layout(encoding: str, layout: dict[int, Any]) -> None:
    """DESIGN §3: the header map {0: version 1, 1: type, 2: txid, 3: src, 4: dst, [5: pn_id,]
    6: body} with small integer body keys, read back by plain cbor2."""
    assert cbor2.loads(bytes.fromhex(encoding)) == layout


def test_golden_key_bundle() -> None:
    """003 §7.4.2.1.1.2 step 7: the sealed KeyBundle plaintext {1: tk, 2: [EUKey_1..n],
    3: epoch} (the epoch: D-003-11)."""
    assert encode_record(BUNDLE).hex() == BUNDLE_HEX
    assert decode_record(KeyBundle, bytes.fromhex(BUNDLE_HEX)) == BUNDLE
    assert cbor2.loads(bytes.fromhex(BUNDLE_HEX)) == {
        1: bytes(range(16)),
        2: [b"\xaa" * 32, b"\xbb" * 32],
        3: 1,
    }


def test_header_keys_are_the_documented_ones() -> None:
    """DESIGN §3: header keys 0..7 in this order (7: the optional flow ID, docs/wire.md)."""
    assert [int(k) for k in HeaderKey] == list(range(8))
    assert [k.name for k in HeaderKey] == [
        "VERSION",
        "TYPE",
        "TXID",
        "SOURCE",
        "DESTINATION",
        "PN_ID",
        "BODY",
        "FLOW",
    ]


def test_flow_id_round_trips_under_header_key_7_and_shows_as_hex() -> None:
    """docs/wire.md section 2: the flow ID travels as header key 7 (8 bytes, after the
    body in deterministic order), decodes to the same message and shows as 16 hex digits
    in the JSON view; without it the encoding has no key 7."""
    flow = bytes.fromhex("0123456789abcdef")
    message = decode(VALID)
    with_flow = dataclasses.replace(message, flow=flow)
    data = encode(with_flow)
    assert (VALID[0], data[0]) == (0xA6, 0xA7)  # a map of 6 entries, now 7
    assert data.endswith(b"\x07\x48" + flow)
    assert decode(data) == with_flow
    assert to_json(with_flow)["flow"] == "0123456789abcdef"
    assert "flow" not in to_json(message)
    assert 7 not in cbor2.loads(VALID)


# -- JSON view ----------------------------------------------------------------------------------


SECRET_FIELDS = {
    UserKeyAssignmentRequest: {"auth_data"},
    UserKeyAssignmentResponse: {"sealed_eukey"},
    EUKeyAssignmentRequest: {"auth_data", "claim_proof"},
    EUKeyAssignmentResponse: {"sealed_bundle"},
    EUKeyAssignmentNotification: {"sealed_eukey"},
    PNEAuthenticateRequest: {"sealed_local_eukey", "sealed_next_eukey"},
    PNEAuthenticateResponse: {"sealed_eukey"},
    AuthChallenge: {"sealed_local_gw", "sealed_local_pne"},
    AuthProof: {"sealed_eukey"},
}


def test_secret_fields_are_the_expected_ones() -> None:
    """STYLE §3: proofs and sealed values are declared secret (kept out of repr and JSON);
    KeyBundle's TK and EUKeys are secret too."""
    for cls in MESSAGE_CLASSES.values():
        declared = {name for name, spec in specs(cls) if spec.secret}
        assert declared == SECRET_FIELDS.get(cls, set()), cls.__name__
    assert {name for name, spec in specs(KeyBundle) if spec.secret} == {"tk", "eukeys"}
    for record in NESTED_RECORDS:
        declared = {name for name, spec in specs(record) if spec.secret}
        assert declared == SECRET_FIELDS.get(record, set()), record.__name__


def test_sealed_values_nested_in_records_are_redacted_and_hidden_from_repr() -> None:
    """STYLE §3/§4: a sealed LocalEUKey copy inside an AUTHENTICATE Request entry is
    redacted in the JSON view unless asked for, and never in repr."""
    message = next(m for name, m, _, _ in GOLDEN if name == "authenticate-request")
    assert isinstance(message, AuthenticateRequest)
    view = to_json(message)
    entries = view["entries"]
    assert isinstance(entries, list)
    assert entries[0]["sealed_local_gw"] == "<redacted>"
    assert entries[0]["flow"] == "RAND_HASH"
    assert entries[1] == {"pne_id": "pne-2", "status": "DUPLICATE_PNE"}
    shown = to_json(message, reveal_secrets=True)["entries"]
    assert isinstance(shown, list)
    assert shown[0]["sealed_local_pne"] == S.hex()
    assert S.hex() not in repr(message)
    assert repr(S) not in repr(message)


@pytest.mark.parametrize("message", [m for _, m, _, _ in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_to_json_redacts_secrets(message: Message) -> None:
    """DESIGN §3 / STYLE §4: the JSON view shows every field, secrets as '<redacted>' unless
    asked for; bytes as hex, enums by name; secrets never reach repr."""
    view = to_json(message)
    json.dumps(view)  # serialisable as is
    assert view["type"] == message.TYPE.name
    assert view["txid"] == TXID.hex()
    assert (view["src"], view["dst"]) == (message.src, message.dst)
    assert view.get("pn_id") == message.pn_id
    revealed = to_json(message, reveal_secrets=True)
    for name, spec in specs(type(message)):
        value = getattr(message, name)
        if value is None:
            assert name not in view
            continue
        if spec.secret:
            assert view[name] == "<redacted>"
            assert revealed[name] == value.hex()
            assert value.hex() not in json.dumps(view)
            assert repr(value) not in repr(message)
        elif isinstance(value, bytes):
            assert view[name] == value.hex()
        elif spec.kind == "enum":
            assert view[name] == value.name
        elif spec.kind == "id_list":
            assert view[name] == list(value)
        elif spec.kind == "records":
            assert view[name] == [record_json(r) for r in value]
        else:
            assert view[name] == value


def test_key_bundle_repr_hides_keys() -> None:
    """STYLE §4: the TK and EUKeys never reach repr."""
    text = repr(BUNDLE)
    assert "aaaa" not in text
    assert "\\xaa" not in text
    assert "\\x00\\x01" not in text


# -- the failure table ---------------------------------------------------------------------------
#
# A tiny CBOR writer, independent of cbor2, so that each row can say exactly which bytes
# are wrong (non-shortest heads, indefinite lengths, duplicate keys, tags...).


def head(major: int, n: int, width: int | None = None) -> bytes:
    """A CBOR initial byte plus argument; ``width`` forces a longer (non-canonical) form."""
    if width is None:
        width = 0 if n < 24 else 1 if n < 2**8 else 2 if n < 2**16 else 4 if n < 2**32 else 8
    info = {0: n, 1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + (n.to_bytes(width, "big") if width else b"")


def uint(n: int, width: int | None = None) -> bytes:
    return head(0, n, width)


def nint(n: int) -> bytes:
    return head(1, -1 - n)


def bstr(b: bytes) -> bytes:
    return head(2, len(b)) + b


def tstr(s: str) -> bytes:
    raw = s.encode("utf-8")
    return head(3, len(raw)) + raw


def cmap(pairs: list[tuple[bytes, bytes]], *, indefinite: bool = False) -> bytes:
    inner = b"".join(k + v for k, v in pairs)
    return (b"\xbf" + inner + b"\xff") if indefinite else head(5, len(pairs)) + inner


def array(items: list[bytes]) -> bytes:
    return head(4, len(items)) + b"".join(items)


def tag(number: int, item: bytes) -> bytes:
    return head(6, number) + item


TRUE, FALSE, NULL, UNDEFINED = b"\xf5", b"\xf4", b"\xf6", b"\xf7"

# The base of the table: an EUKey Assignment Request (ids, int, bytes fields), field by field.
BASE_HEADER: dict[int, bytes] = {
    0: uint(1),
    1: uint(20),
    2: bstr(TXID),
    3: tstr("gw-alice"),
    4: tstr("cpns-server"),
}
BASE_BODY: dict[int, bytes] = {
    1: tstr("pne-1"),
    2: tstr("alice"),
    3: uint(1_700_000_000),
    4: bstr(b"\x55" * 32),
    5: bstr(b"\x66" * 32),
    6: bstr(b"\x77" * 32),
}
BASE_MESSAGE = EUKeyAssignmentRequest(
    txid=TXID,
    src="gw-alice",
    dst="cpns-server",
    pne_id="pne-1",
    user_id="alice",
    time=1_700_000_000,
    rand_pngw=b"\x55" * 32,
    auth_data=b"\x66" * 32,
    claim_proof=b"\x77" * 32,
)
ACK_BODY: dict[int, bytes] = {1: uint(0), 2: uint(1), 3: bstr(b"\x99" * 32)}


def build(
    *,
    header: dict[int, bytes | None] | None = None,
    body: dict[int, bytes | None] | None = None,
    type_: int | None = None,
    base_body: dict[int, bytes] | None = None,
    body_bytes: bytes | None = None,
) -> bytes:
    """The base message with header/body entries replaced (value None: entry removed)."""
    top: dict[int, bytes | None] = dict(BASE_HEADER)
    if type_ is not None:
        top[1] = uint(type_)
    top.update(header or {})
    fields: dict[int, bytes | None] = dict(BASE_BODY if base_body is None else base_body)
    fields.update(body or {})
    if body_bytes is None:
        body_bytes = cmap([(uint(k), v) for k, v in sorted(fields.items()) if v is not None])
    top.setdefault(6, body_bytes)
    pairs = [(uint(k), v) for k, v in sorted(top.items()) if v is not None]
    return cmap(pairs)


def test_writer_reproduces_the_encoder() -> None:
    """The table's hand-made CBOR writer matches cpns's encoder on the base message, so each
    row differs from a valid message only where it says."""
    assert build() == encode(BASE_MESSAGE)
    assert decode(build()) == BASE_MESSAGE
    ack = build(type_=23, base_body=ACK_BODY, header={3: tstr("pne-1"), 4: tstr("gw-alice")})
    assert decode(ack).TYPE is MessageType.EUKEY_ASSIGNMENT_ACK


MALFORMED = ErrorCode.MALFORMED_MESSAGE
UNSUPPORTED = ErrorCode.UNSUPPORTED_VERSION
VALID = build()


def _indefinite_body() -> bytes:
    return build(
        body_bytes=cmap([(uint(k), v) for k, v in sorted(BASE_BODY.items())], indefinite=True)
    )


def _unsorted_header() -> bytes:
    pairs = [(uint(k), v) for k, v in BASE_HEADER.items()]
    pairs.append((uint(6), cmap([(uint(k), v) for k, v in sorted(BASE_BODY.items())])))
    pairs[0], pairs[1] = pairs[1], pairs[0]
    return cmap(pairs)


def _duplicate_header_key() -> bytes:
    pairs = [(uint(k), v) for k, v in sorted(BASE_HEADER.items())]
    pairs.insert(1, (uint(0), uint(1)))
    pairs.append((uint(6), cmap([(uint(k), v) for k, v in sorted(BASE_BODY.items())])))
    return cmap(pairs)


def _duplicate_body_key() -> bytes:
    pairs = [(uint(k), v) for k, v in sorted(BASE_BODY.items())]
    pairs.insert(3, (uint(3), uint(1_700_000_000)))
    return build(body_bytes=cmap(pairs))


def _nested(depth: int) -> bytes:
    item = uint(0)
    for _ in range(depth):
        item = array([item])
    return item


FAILURES: list[Any] = [
    # Framing and CBOR well-formedness.
    pytest.param(b"", MALFORMED, id="empty-input"),
    pytest.param(VALID + b"\x00", MALFORMED, id="trailing-byte"),
    pytest.param(VALID + VALID, MALFORMED, id="trailing-message"),
    pytest.param(VALID[:-1], MALFORMED, id="truncated"),
    pytest.param(b"\x00" * (MAX_MESSAGE_SIZE + 1), MALFORMED, id="oversize-message"),
    pytest.param(
        build(body={5: bstr(bytes(MAX_MESSAGE_SIZE))}), MALFORMED, id="oversize-valid-looking"
    ),
    pytest.param(b"\xff", MALFORMED, id="break-byte-alone"),
    pytest.param(b"\x1c", MALFORMED, id="reserved-additional-info"),
    pytest.param(_indefinite_body(), MALFORMED, id="indefinite-length-map"),
    pytest.param(
        build(body={4: b"\x5f" + bstr(b"\x55" * 16) + bstr(b"\x55" * 16) + b"\xff"}),
        MALFORMED,
        id="indefinite-length-bytes",
    ),
    pytest.param(
        build(body={1: b"\x7f" + tstr("pne") + tstr("-1") + b"\xff"}),
        MALFORMED,
        id="indefinite-length-text",
    ),
    pytest.param(_duplicate_header_key(), MALFORMED, id="duplicate-header-key"),
    pytest.param(_duplicate_body_key(), MALFORMED, id="duplicate-body-key"),
    pytest.param(_unsorted_header(), MALFORMED, id="unsorted-keys"),
    pytest.param(build(header={0: uint(1, width=1)}), MALFORMED, id="non-canonical-int-version"),
    pytest.param(
        build(body={3: uint(1_700_000_000, width=8)}), MALFORMED, id="non-canonical-int-time"
    ),
    pytest.param(
        build(body={4: b"\x59\x00\x20" + b"\x55" * 32}), MALFORMED, id="non-canonical-bytes-length"
    ),
    pytest.param(build(body={1: b"\x65pne-\xff"}), MALFORMED, id="invalid-utf8"),
    pytest.param(build(body={3: _nested(8)}), MALFORMED, id="too-deep"),
    # Header.
    pytest.param(array([uint(1)]), MALFORMED, id="top-level-array"),
    pytest.param(uint(1), MALFORMED, id="top-level-int"),
    pytest.param(build(header={8: uint(0)}), MALFORMED, id="unknown-header-key"),
    pytest.param(build(header={7: bstr(bytes(7))}), MALFORMED, id="short-flow"),
    pytest.param(build(header={7: bstr(bytes(9))}), MALFORMED, id="long-flow"),
    pytest.param(build(header={7: bstr(bytes(16))}), MALFORMED, id="txid-sized-flow"),
    pytest.param(build(header={7: tstr("0123456789abcdef")}), MALFORMED, id="text-flow"),
    pytest.param(build(header={7: uint(1)}), MALFORMED, id="int-flow"),
    pytest.param(build(header={7: NULL}), MALFORMED, id="null-flow"),
    pytest.param(cmap([(tstr("0"), uint(1))]), MALFORMED, id="text-header-key"),
    pytest.param(cmap([(nint(-1), uint(1))]), MALFORMED, id="negative-header-key"),
    pytest.param(build(header={0: uint(2)}), UNSUPPORTED, id="version-2"),
    pytest.param(build(header={0: uint(0)}), UNSUPPORTED, id="version-0"),
    # Found by Hypothesis: a byte-string version was compared with an int first (a
    # BytesWarning under -bb) before its type was checked.
    pytest.param(build(header={0: bstr(b"")}), UNSUPPORTED, id="version-as-bytes"),
    pytest.param(build(header={0: tstr("1")}), UNSUPPORTED, id="version-as-text"),
    pytest.param(
        build(header={0: uint(2)}, body_bytes=uint(0)), UNSUPPORTED, id="version-2-checked-first"
    ),
    pytest.param(build(header={1: uint(99)}), MALFORMED, id="unknown-type"),
    pytest.param(build(header={1: uint(2)}), MALFORMED, id="unassigned-type"),
    pytest.param(build(header={1: None}), MALFORMED, id="type-missing"),
    pytest.param(build(header={1: tstr("20")}), MALFORMED, id="type-as-text"),
    pytest.param(build(header={6: None}, body_bytes=b""), MALFORMED, id="body-missing"),
    pytest.param(build(body_bytes=array([])), MALFORMED, id="body-not-a-map"),
    pytest.param(build(header={2: None}), MALFORMED, id="txid-missing"),
    pytest.param(build(header={2: bstr(TXID[:15])}), MALFORMED, id="txid-length-15"),
    pytest.param(build(header={2: bstr(TXID + b"\x00")}), MALFORMED, id="txid-length-17"),
    pytest.param(build(header={2: tstr("0" * 16)}), MALFORMED, id="txid-as-text"),
    pytest.param(build(header={3: tstr("gw alice")}), MALFORMED, id="bad-identifier-space"),
    pytest.param(build(header={3: tstr("gw:alice")}), MALFORMED, id="bad-identifier-colon"),
    pytest.param(build(header={3: tstr("")}), MALFORMED, id="bad-identifier-empty"),
    pytest.param(build(header={4: tstr("-server")}), MALFORMED, id="bad-identifier-leading-dash"),
    pytest.param(build(header={4: tstr("s" * 129)}), MALFORMED, id="bad-identifier-too-long"),
    pytest.param(build(header={3: bstr(b"gw-alice")}), MALFORMED, id="identifier-as-bytes"),
    pytest.param(build(header={4: None}), MALFORMED, id="destination-missing"),
    pytest.param(build(header={5: NULL}), MALFORMED, id="null-pn-id"),
    pytest.param(build(header={5: tstr("pn id")}), MALFORMED, id="bad-pn-id"),
    # Body.
    pytest.param(build(body={9: uint(0)}), MALFORMED, id="unknown-body-key"),
    pytest.param(build(body={0: uint(0)}), MALFORMED, id="body-key-0"),
    pytest.param(build(body={3: None}), MALFORMED, id="missing-field"),
    pytest.param(build(body={5: None}), MALFORMED, id="missing-secret-field"),
    pytest.param(build(body={1: NULL}), MALFORMED, id="null-required-field"),
    pytest.param(build(body={4: tstr("U" * 32)}), MALFORMED, id="wrong-type-text-for-bytes"),
    pytest.param(build(body={1: bstr(b"pne-1")}), MALFORMED, id="wrong-type-bytes-for-id"),
    pytest.param(
        build(body={3: bstr(b"\x65\x53\xf1\x00")}), MALFORMED, id="wrong-type-bytes-for-int"
    ),
    pytest.param(build(body={4: bstr(b"\x55" * 33)}), MALFORMED, id="oversize-bytes"),
    pytest.param(build(body={4: bstr(b"\x55" * 31)}), MALFORMED, id="undersize-bytes"),
    pytest.param(build(body={3: b"\xf9\x3c\x00"}), MALFORMED, id="float-where-int-half"),
    pytest.param(
        build(body={3: b"\xfb" + struct.pack(">d", 1_700_000_000.0)}),
        MALFORMED,
        id="float-where-int-double",
    ),
    pytest.param(build(body={3: TRUE}), MALFORMED, id="bool-where-int"),
    pytest.param(build(body={3: UNDEFINED}), MALFORMED, id="undefined-where-int"),
    pytest.param(build(body={3: nint(-1)}), MALFORMED, id="negative-int"),
    pytest.param(build(body={3: uint(2**63)}), MALFORMED, id="int-over-range"),
    pytest.param(build(body={3: tag(99, uint(1_700_000_000))}), MALFORMED, id="cbor-tag-unknown"),
    pytest.param(
        build(body={3: tag(2, bstr(b"\x65\x53\xf1\x00"))}), MALFORMED, id="cbor-tag-bignum"
    ),
    pytest.param(build(body={3: tag(1, uint(1_700_000_000))}), MALFORMED, id="cbor-tag-epoch-time"),
    pytest.param(build(body={1: tag(32, tstr("pne-1"))}), MALFORMED, id="cbor-tag-uri"),
    pytest.param(tag(55799, VALID), MALFORMED, id="cbor-tag-self-describe"),
    pytest.param(tag(24, bstr(VALID)), MALFORMED, id="cbor-tag-embedded"),
    # Enums and lists (on other types).
    pytest.param(
        build(type_=23, base_body=ACK_BODY, body={1: uint(999)}), MALFORMED, id="unknown-status"
    ),
    pytest.param(
        build(type_=23, base_body=ACK_BODY, body={1: TRUE}), MALFORMED, id="bool-where-enum"
    ),
    pytest.param(
        build(type_=23, base_body=ACK_BODY, body={1: tstr("OK")}), MALFORMED, id="text-where-enum"
    ),
    pytest.param(
        build(type_=23, base_body=ACK_BODY, body={2: uint(0)}), MALFORMED, id="key-index-0"
    ),
    pytest.param(
        build(type_=23, base_body=ACK_BODY, body={2: uint(1025)}), MALFORMED, id="key-index-1025"
    ),
    pytest.param(
        build(type_=23, base_body=ACK_BODY, body={3: bstr(b"\x99" * 31)}),
        MALFORMED,
        id="short-proof",
    ),
    pytest.param(build(type_=10, body={2: uint(0)}), MALFORMED, id="field-of-another-type"),
    pytest.param(
        build(type_=30, base_body={1: uint(1), 2: uint(0)}), MALFORMED, id="int-where-bool"
    ),
    pytest.param(
        build(
            type_=21, base_body={1: uint(0), 2: tstr("pne-1"), 3: bstr(b"\x77" * (35 * 1024 + 1))}
        ),
        MALFORMED,
        id="oversize-sealed-bundle",
    ),
    pytest.param(
        build(type_=21, base_body={1: uint(0), 2: tstr("pne-1"), 3: bstr(b"")}),
        MALFORMED,
        id="empty-sealed-bundle",
    ),
    pytest.param(
        build(type_=21, base_body={1: uint(0), 2: tstr("pne-1"), 3: NULL}),
        MALFORMED,
        id="null-optional-field",
    ),
]


@pytest.mark.parametrize(("data", "code"), FAILURES)
def test_decode_failure(data: bytes, code: ErrorCode) -> None:
    """DESIGN §3 strict decoding: each malformed input is one DecodeError with its exact
    code (UNSUPPORTED_VERSION for another version, MALFORMED_MESSAGE for the rest);
    nothing from the CBOR library escapes."""
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert type(info.value) is DecodeError
    assert info.value.code is code
    assert info.value.__cause__ is None


def test_unknown_tag_is_refused_by_our_hook_with_its_reason() -> None:
    """DESIGN §3: a CBOR tag unknown to the library reaches our tag hook, whose reason
    (not the library's wrapper) is what the DecodeError says."""
    with pytest.raises(DecodeError, match="CBOR tags are not allowed"):
        decode(build(body={3: tag(99, uint(1_700_000_000))}))


def test_valid_boundaries_decode() -> None:
    """The edges next to the failure rows are accepted: 35 KiB sealed bundle, key index
    1024, time 0 and 2**63-1, a 128-character identifier, an empty PN ID absent."""
    bundle = build(type_=21, base_body={1: uint(0), 2: tstr("pne-1"), 3: bstr(b"\x77" * 35 * 1024)})
    assert len(decode(bundle).sealed_bundle or b"") == 35 * 1024  # type: ignore[attr-defined]
    for time in (0, 2**63 - 1):
        assert decode(build(body={3: uint(time)})).time == time  # type: ignore[attr-defined]
    assert decode(build(header={4: tstr("s" * 128)})).dst == "s" * 128


@pytest.mark.parametrize("data", [bytearray(VALID), memoryview(VALID), VALID.hex()])
def test_decode_refuses_non_bytes(data: Any) -> None:
    """codec: the input is bytes; anything else is a DecodeError, not a TypeError."""
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.code is MALFORMED


BUNDLE_FAILURES: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(bytes.fromhex(BUNDLE_HEX) + b"\x00", id="trailing-byte"),
    pytest.param(
        cmap([(uint(1), bstr(bytes(15))), (uint(2), array([bstr(bytes(32))]))]), id="tk-15-bytes"
    ),
    pytest.param(
        cmap([(uint(1), bstr(bytes(65))), (uint(2), array([bstr(bytes(32))]))]), id="tk-65-bytes"
    ),
    pytest.param(cmap([(uint(1), bstr(bytes(16))), (uint(2), array([]))]), id="no-eukeys"),
    pytest.param(
        cmap([(uint(1), bstr(bytes(16))), (uint(2), array([bstr(bytes(31))]))]), id="eukey-31-bytes"
    ),
    pytest.param(
        cmap([(uint(1), bstr(bytes(16))), (uint(2), array([tstr("k" * 32)]))]), id="eukey-as-text"
    ),
    pytest.param(
        cmap([(uint(1), bstr(bytes(16))), (uint(2), bstr(bytes(32)))]), id="eukeys-not-array"
    ),
    pytest.param(
        cmap([(uint(1), bstr(bytes(16))), (uint(2), array([bstr(bytes(32))] * 1025))]),
        id="1025-eukeys",
    ),
    pytest.param(cmap([(uint(2), array([bstr(bytes(32))]))]), id="tk-missing"),
    pytest.param(
        cmap([(uint(1), bstr(bytes(16))), (uint(2), array([bstr(bytes(32))])), (uint(3), uint(0))]),
        id="unknown-key",
    ),
    pytest.param(array([bstr(bytes(16))]), id="not-a-map"),
    pytest.param(VALID, id="a-whole-message"),
]


@pytest.mark.parametrize("data", BUNDLE_FAILURES)
def test_decode_key_bundle_failure(data: bytes) -> None:
    """003 §7.4.2.1.1.3 step 1: the PN GW only stores a well-formed KeyBundle; anything else
    is one DecodeError (MALFORMED_MESSAGE)."""
    with pytest.raises(DecodeError) as info:
        decode_record(KeyBundle, data)
    assert info.value.code is MALFORMED


def test_key_bundle_with_1024_keys() -> None:
    """KeyBundle: 1024 EUKeys (the longest chain) fit and round-trip."""
    bundle = KeyBundle(
        tk=bytes(64), eukeys=tuple(i.to_bytes(32, "big") for i in range(1024)), epoch=2**32 - 1
    )
    assert decode_record(KeyBundle, encode_record(bundle)) == bundle


# -- the model's own checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"txid": TXID[:15]},
        {"txid": bytearray(TXID)},
        {"src": "a b"},
        {"dst": 5},
        {"pn_id": ""},
        {"flow": b"\x00" * 7},
        {"flow": "0123456789abcdef"},
        {"flow": bytearray(8)},
        {"time": True},
        {"time": -1},
        {"time": 1.0},
        {"rand_pngw": b"\x00" * 31},
        {"auth_data": None},
        {"user_id": None},
    ],
    ids=lambda change: "-".join(f"{k}={v!r}"[:24] for k, v in change.items()),
)
def test_constructor_refuses_invalid_fields(change: dict[str, Any]) -> None:
    """STYLE §3: the constructor validates, so an invalid message cannot exist (ValueError)."""
    fields = {
        "txid": TXID,
        "src": "gw-alice",
        "dst": "cpns-server",
        "pne_id": "pne-1",
        "user_id": "alice",
        "time": 0,
        "rand_pngw": bytes(32),
        "auth_data": bytes(32),
        "claim_proof": bytes(32),
    }
    fields.update(change)
    with pytest.raises(ValueError, match=r"\w"):
        EUKeyAssignmentRequest(**fields)


def test_enum_fields_need_the_enum() -> None:
    """model: an enum field takes the IntEnum member, not the bare int (the codec converts)."""
    with pytest.raises(ValueError, match="ErrorCode"):
        ErrorMessage(txid=TXID, src="a", dst="b", status=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="EntityKind"):
        UserKeyAssignmentRequest(
            txid=TXID,
            src="a",
            dst="b",
            user_id="u",
            entity_kind=2,  # type: ignore[arg-type]
            time=0,
            rand=bytes(32),
            auth_data=bytes(32),
        )
    with pytest.raises(ValueError, match="boolean"):
        PNEHello(txid=TXID, src="a", dst="b", has_ui=1, key_index=0)  # type: ignore[arg-type]


def test_specs_are_in_key_order_and_body_excludes_header() -> None:
    """model: specs() lists body fields by wire key; body() holds exactly those values."""
    assert [name for name, _ in specs(EUKeyAssignmentRequest)] == [
        "pne_id",
        "user_id",
        "time",
        "rand_pngw",
        "auth_data",
        "claim_proof",
    ]
    assert [spec.key for _, spec in specs(EUKeyAssignmentRequest)] == [1, 2, 3, 4, 5, 6]
    assert dict(BASE_MESSAGE.body()) == {
        "pne_id": "pne-1",
        "user_id": "alice",
        "time": 1_700_000_000,
        "rand_pngw": b"\x55" * 32,
        "auth_data": b"\x66" * 32,
        "claim_proof": b"\x77" * 32,
    }


def test_error_code_from_wire() -> None:
    """errors: a known status maps to its ErrorCode, an unknown one stays a plain int (h2)."""
    assert ErrorCode.from_wire(202) is ErrorCode.WRONG_PASSWORD
    assert ErrorCode.from_wire(999) == 999
    assert type(ErrorCode.from_wire(999)) is int


# -- issue 5 item 10: nothing but a bounded DecodeError, whatever the input ---------------

_HUGE = 10**4400  # more decimal digits than CPython's int-to-str limit (4,300)


def test_a_huge_integer_status_is_a_decode_error() -> None:
    """Issue 5 item 10: an Ack whose status is an integer of ~4,400 digits (a ~1.8 KB CBOR
    bignum) raised ValueError (the error message formatted the value in decimal, past
    CPython's int-to-str limit); it must be one DecodeError with a bounded reason."""
    data = cbor2.dumps(
        {0: 1, 1: int(MessageType.EUKEY_ASSIGNMENT_ACK), 2: TXID, 3: "a", 4: "b", 6: {1: _HUGE}},
        canonical=True,
    )
    with pytest.raises(DecodeError) as caught:
        decode(data)
    assert len(str(caught.value)) <= 160


def test_a_3000_digit_integer_gives_a_bounded_reason() -> None:
    """Issue 5 item 10/12: a 3,000-digit version used to be quoted whole in the reason
    (3 KB of peer input per log line); the reason is now bounded."""
    data = cbor2.dumps({0: 10**2999, 1: 1, 6: {}}, canonical=True)
    with pytest.raises(DecodeError) as caught:
        decode(data)
    assert caught.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert len(caught.value.reason) <= 160


@pytest.mark.parametrize("header_key", [None, 0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("message_type", list(MESSAGE_CLASSES))
def test_huge_integers_anywhere_are_bounded_decode_errors(
    message_type: MessageType, header_key: int | None
) -> None:
    """Issue 5 item 10: a huge integer in any body field or header slot of any message
    type is one DecodeError with a reason of at most 160 characters."""
    cls = MESSAGE_CLASSES[message_type]
    for _, spec in specs(cls):
        top: dict[int, Any] = {0: 1, 1: int(message_type), 2: TXID, 3: "a", 4: "b"}
        top[6] = {spec.key: _HUGE, 99: _HUGE}
        if header_key is not None:
            top[header_key] = _HUGE
        with pytest.raises(DecodeError) as caught:
            decode(cbor2.dumps(top, canonical=True))
        assert len(caught.value.reason) <= 160


def test_decode_record_raises_only_bounded_decode_errors() -> None:
    """Issue 5 item 10: decode_record is as strict and as bounded as decode."""
    for _, spec in specs(KeyBundle):
        with pytest.raises(DecodeError) as caught:
            decode_record(KeyBundle, cbor2.dumps({spec.key: _HUGE, 7000: _HUGE}))
        assert len(caught.value.reason) <= 160


def test_an_unexpected_failure_inside_the_decoder_is_a_decode_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 5 item 10: even a bug of ours (any exception inside the decoder) reaches
    the caller as a DecodeError, never as another class."""
    import cpns.messages.codec as codec

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom " * 1000)

    monkeypatch.setattr(codec, "_fields_from", broken)
    with pytest.raises(DecodeError, match="RuntimeError"):
        decode(VALID)
    with pytest.raises(DecodeError, match="RuntimeError"):
        decode_record(KeyBundle, cbor2.dumps({1: 1}))


# -- nested records and ID lists (PN Establishment) --------------------------------------------


def _golden_layout(name: str) -> dict[int, Any]:
    return next(lay for n, _, _, lay in GOLDEN if n == name)


def _with_body(layout: dict[int, Any], **changes: Any) -> bytes:
    body = dict(layout[6])
    for key, value in changes.items():
        k = int(key.lstrip("k"))
        if value is None:
            body.pop(k, None)
        else:
            body[k] = value
    return cbor2.dumps({**layout, 6: body}, canonical=True)


_CHALLENGE = {1: "pne-1", 2: 0, 3: 1}
_SETUP_ENTRY = {1: "pne-1", 2: R, 3: True}


@pytest.mark.parametrize(
    "data",
    [
        # an entry that is not a map, an entry with an unknown key, a missing key
        _with_body(_golden_layout("authenticate-request"), k4=[1]),
        _with_body(_golden_layout("authenticate-request"), k4=[{**_CHALLENGE, 9: 1}]),
        _with_body(_golden_layout("authenticate-request"), k4=[{1: "pne-1"}]),
        # an unknown flow, a status not in the table, a bad ID inside an entry
        _with_body(_golden_layout("authenticate-request"), k4=[{**_CHALLENGE, 3: 9}]),
        _with_body(_golden_layout("authenticate-request"), k4=[{**_CHALLENGE, 2: 307}]),
        _with_body(_golden_layout("authenticate-request"), k4=[{**_CHALLENGE, 1: "a b"}]),
        # a nested array inside an entry: deeper than the codec reads
        _with_body(_golden_layout("authenticate-request"), k4=[{**_CHALLENGE, 4: [b"x"]}]),
        # entries: not an array; empty where 1..64 are required; 65 entries
        _with_body(_golden_layout("pn-establish-request"), k1={1: _SETUP_ENTRY}),
        _with_body(_golden_layout("pn-establish-request"), k1=[]),
        _with_body(_golden_layout("pn-establish-request"), k1=[_SETUP_ENTRY] * 65),
        # the invite list: a non-ID, 64 IDs (at most 63), not an array
        _with_body(_golden_layout("pn-setup-request"), k3=["ok", "not an id"]),
        _with_body(_golden_layout("pn-setup-request"), k3=["pne-2"] * 64),
        _with_body(_golden_layout("pn-setup-request"), k3="pne-2"),
        # a message whose PN ID is mandatory, without it
        cbor2.dumps({k: v for k, v in _golden_layout("pn-setup-request").items() if k != 5}),
        cbor2.dumps({k: v for k, v in _golden_layout("local-auth-request").items() if k != 5}),
    ],
    ids=[
        "entry-not-map",
        "entry-unknown-key",
        "entry-missing-key",
        "entry-unknown-flow",
        "entry-unknown-status",
        "entry-bad-id",
        "entry-too-deep",
        "entries-not-array",
        "entries-empty",
        "entries-65",
        "invite-bad-id",
        "invite-64",
        "invite-not-array",
        "pn-id-missing",
        "local-pn-id-missing",
    ],
)
def test_establishment_decode_failures(data: bytes) -> None:
    """docs/wire.md section 2.2 applies inside nested records: every fault in an entry or
    an ID list refuses the whole message with MALFORMED_MESSAGE (002 §7.5.4 messages)."""
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.code is ErrorCode.MALFORMED_MESSAGE


def test_establishment_boundaries_decode() -> None:
    """64 entries and 63 invited PNEs are the largest legal lists (pn-design: at most 64
    PNEs per establishment); an AUTHENTICATE Request may carry no entry (a refusal)."""
    full = _with_body(_golden_layout("pn-establish-request"), k1=[_SETUP_ENTRY] * 64)
    message = decode(full)
    assert isinstance(message, PNEstablishRequest)
    assert len(message.entries) == 64
    assert encode(message) == full
    invite = decode(_with_body(_golden_layout("pn-setup-request"), k3=["pne-2"] * 63))
    assert isinstance(invite, PNSetupRequest)
    assert len(invite.invite) == 63
    refusal = decode(
        _with_body(
            _golden_layout("authenticate-request"),
            k1=int(ErrorCode.UNKNOWN_ENTITY),
            k2=None,
            k3=None,
            k4=[],
        )
    )
    assert isinstance(refusal, AuthenticateRequest)
    assert refusal.entries == ()


def test_nested_records_are_typed() -> None:
    """The constructor refuses an entry of another record class (an invalid message cannot
    exist), and a nested record class with a list field cannot be declared."""
    with pytest.raises(ValueError, match="SetupEntry"):
        PNEstablishRequest(
            txid=TXID,
            src="gw-alice",
            dst="cpns-server",
            pn_id="pn-1",
            entries=(AuthProof(pne_id="pne-1", status=ErrorCode.OK),),  # type: ignore[arg-type]
        )
    from cpns.messages.model import f_records

    with pytest.raises(TypeError, match="scalar"):
        f_records(1, KeyBundle)


@pytest.mark.parametrize("message", [m for _, m, _, _ in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_the_encoding_is_what_canonical_cbor_writes(message: Message) -> None:
    """RFC 8949 §4.2 core deterministic encoding (docs/wire.md): the codec writes its maps
    in ascending key order with cbor2's ordinary encoder; for every message type, with and
    without a flow ID, the bytes are exactly those of cbor2's canonical mode."""
    for variant in (message, dataclasses.replace(message, flow=b"\x01" * 8)):
        data = encode(variant)
        assert data == cbor2.dumps(cbor2.loads(data), canonical=True)
        assert decode(data) == variant


def test_field_keys_are_non_negative_integers() -> None:
    """Our rule behind the ordered maps of the codec (docs/wire.md, deterministic CBOR):
    a field declared with a negative or non-integer key is refused at declaration."""
    for bad in (-1, "1", True):
        with pytest.raises(TypeError, match="non-negative"):
            FieldSpec(bad, "int")  # type: ignore[arg-type]


@pytest.mark.parametrize("message", [m for _, m, _, _ in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_encoding_without_flow_cuts_the_flow_entry(message: Message) -> None:
    """docs/wire.md 2.3 (the flow ID is no security input): the encoding without the flow
    ID, cut from the received bytes, is exactly the encoding of the message without it;
    without the received bytes, or with bytes of another flow, it is encoded again."""
    bare = encode(dataclasses.replace(message, flow=None))
    flowed = dataclasses.replace(message, flow=b"\x02" * 8)
    assert encode_without_flow(flowed, encode(flowed)) == bare
    assert encode_without_flow(flowed) == bare
    other = dataclasses.replace(message, flow=b"\x03" * 8)
    assert encode_without_flow(flowed, encode(other)) == bare
    plain = dataclasses.replace(message, flow=None)
    assert encode_without_flow(plain, bare) == bare
    assert encode_without_flow(plain) == bare
