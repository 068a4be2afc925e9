"""EUKey assignment for a PNE without UI (003 §6.3.2.2 and §7.4.2.2).

Theory of operation
-------------------
Parties: the PNE (holds a manufacturer Temporary Key, TK), the PN GW (owned by the same
CPNS User, already holding its own EUKey, see :mod:`cpns.protocol.user_key_assignment`)
and the CPNS Server (holds the user's password key and the imported TK records).

0. The PN GW and the server authenticate each other before any assignment: TLS 1.3 with
   the server's certificate plus HTTP Digest keyed by the PN GW's EUKey, with rspauth
   (004 §5.x.2). That is the I/O layer's job (:mod:`cpns.protocol.digest`); the server
   machine is told which gateway was authenticated.
1. PN GW: RANDPNGW, Time, AuthData = HMAC(Hash(Password), RANDPNGW, Time, ...) and the
   EUKey Assignment Request (PNE Entity ID, CPNS User ID, Time, AuthData).
2. Server: checks Time, the user, AuthData, replay of RANDPNGW, the TK record and the
   ownership; RANDSVR, SeedPNE = Hash(RANDSVR, RANDPNGW), the chain EUKey_n..EUKey_1;
   stores it with the Entity ID and User ID; the Response carries the status and, sealed
   under the PN GW's EUKey, the TK and the EUKey set.
3. PN GW: stores TK and the set, selects EUKey_1 and sends the Notification with the
   EUKey sealed under the TK.
4. PNE: opens it with its TK, stores the EUKey and acknowledges with a MAC under it (the
   acknowledgement is ours, docs/deviations.md, so the PN GW knows when to stop).

Invariants: every secret travels sealed (AES-GCM) with the message context as associated
data; every check that involves a secret fails opaquely; each role emits the facts to
persist as events, and the I/O layer stores them before sending what depends on them.

Not done here: sockets, HTTP, Digest, storage, clocks, randomness (all injected).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from types import MappingProxyType
from typing import ClassVar, Final

from cpns.crypto.hashchain import build_chain
from cpns.crypto.hashing import KEY_LEN, Part, hash_values, mac, verify_mac
from cpns.crypto.keywrap import NONCE_LEN, open_sealed, seal
from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError, RemoteProtocolError
from cpns.messages.codec import decode_record, encode, encode_record
from cpns.messages.constants import TXID_LEN
from cpns.messages.model import (
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    KeyBundle,
    Message,
)
from cpns.protocol import tk_auth
from cpns.protocol._checks import check_addressed, check_fresh, check_reply_to
from cpns.protocol._machine import Event, Machine, NonceConsumed
from cpns.records import EntityRecord, TKRecord, UserRecord
from cpns.types import EntityKind, Random

__all__ = [
    "AssignmentPolicy",
    "DeviceState",
    "EUKeyAssignmentDevice",
    "EUKeyAssignmentGateway",
    "EUKeyAssignmentServer",
    "EUKeyChainAssigned",
    "EUKeyDelivered",
    "EUKeyInstalled",
    "EUKeySetReceived",
    "GatewayState",
    "HeldKey",
    "ServerLookups",
    "ServerState",
    "auth_data",
    "check_attempts",
    "claim_code",
    "claim_key",
    "claim_proof",
    "normalize_claim_code",
    "request_digest",
    "seed_pne",
]

#: Labels of every derivation in this procedure (docs/crypto.md lists them all).
AUTH_DATA_LABEL: Final = "cpns/v1/003/auth-data"
SEED_LABEL: Final = "cpns/v1/003/seed-pne"
ACK_LABEL: Final = "cpns/v1/003/ack"
CLAIM_CODE_LABEL: Final = "cpns/v1/003/claim-code"
CLAIM_KEY_LABEL: Final = "cpns/v1/003/claim-key"
CLAIM_PROOF_LABEL: Final = "cpns/v1/003/claim-proof"
#: Characters of a claim code (RFC 4648 base32: 16 characters carry 80 bits).
CLAIM_CODE_CHARS: Final = 16
RESPONSE_PURPOSE: Final = "003/response-bundle"
NOTIFICATION_PURPOSE: Final = "003/notification"


# -- derivations, shared by the roles -------------------------------------------------------


def auth_data(
    password_key: bytes, *, rand_pngw: bytes, time: int, user_id: str, pne_id: str, gateway_id: str
) -> bytes:
    """Hash(AuthData), AuthData = Hash(Password) | RANDPNGW | Time (003 §7.4.2.1.1.1 step 3).

    Instantiated as an HMAC keyed by Hash(Password) (DESIGN §4), over RANDPNGW and Time
    as the seed says, plus the User ID, PNE Entity ID and PN GW Entity ID so the proof
    cannot be moved to another request (docs/deviations.md D-003-1).
    """
    return mac(password_key, AUTH_DATA_LABEL, rand_pngw, time, user_id, pne_id, gateway_id)


def claim_code(tk: bytes, pne_id: str) -> str:
    """The claim code printed on a PNE's label: 80 bits of HMAC(TK, label, PNE Entity ID).

    RFC 4648 base32 (``A-Z``, ``2-7``), 16 characters shown as four groups of four
    (``ABCD-EFGH-IJKL-MNOP``). The manufacturer computes it from the TK it ships in the
    device and prints it on the label; the server recomputes it from the imported TK
    record. Holding the label (or the device) is what a claim proves (deviations
    D-003-10); the Entity ID alone is not enough.
    """
    raw = mac(tk, CLAIM_CODE_LABEL, pne_id)[:10]
    text = base64.b32encode(raw).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, CLAIM_CODE_CHARS, 4))


def normalize_claim_code(text: str) -> str:
    """The canonical form of a typed claim code: 16 base32 characters, upper case.

    Dashes and white space are ignored, lower case is accepted, and the digits a reader
    may take for letters are read as those letters (0 -> O, 1 -> I, 8 -> B).

    Raises: ValueError: not 16 base32 characters.
    """
    cleaned = "".join(text.split()).replace("-", "").upper()
    cleaned = cleaned.translate(str.maketrans("018", "OIB"))
    if len(cleaned) != CLAIM_CODE_CHARS or any(c not in _BASE32 for c in cleaned):
        raise ValueError("a claim code is 16 characters of A-Z and 2-7 (dashes optional)")
    return cleaned


_BASE32: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def claim_key(code: str) -> bytes:
    """The 32-byte key a claim code stands for: Hash(label, canonical code).

    Raises: ValueError: ``code`` is not a claim code (see :func:`normalize_claim_code`).
    """
    return hash_values(CLAIM_KEY_LABEL, normalize_claim_code(code))


def claim_proof(
    key: bytes, *, rand_pngw: bytes, time: int, user_id: str, pne_id: str, gateway_id: str
) -> bytes:
    """HMAC(claim key, label, RANDPNGW, Time, User ID, PNE ID, PN GW ID) (D-003-10).

    Bound to the request's random value and identities, so a proof seen once cannot be
    used for another request (the server refuses a RANDPNGW twice).
    """
    return mac(key, CLAIM_PROOF_LABEL, rand_pngw, time, user_id, pne_id, gateway_id)


#: Stands in for the TK of an Entity ID with no TK record, so that an unknown PNE costs the
#: same check as a known one and both are refused alike (CLAIM_NOT_PROVEN).
_NO_TK: Final = bytes(32)


def seed_pne(rand_svr: bytes, rand_pngw: bytes) -> bytes:
    """SeedPNE = Hash(RANDSVR, RANDPNGW) (003 §7.4.2.1.1.2 step 4)."""
    return hash_values(SEED_LABEL, rand_svr, rand_pngw)


def request_digest(request: Message) -> bytes:
    """SHA-256 of a request's encoding: tells an idempotent retry from a reused txid."""
    return hashlib.sha256(encode(request)).digest()


def _bundle_context(server_id: str, gateway_id: str, pne_id: str, txid: bytes) -> tuple[Part, ...]:
    return (server_id, gateway_id, pne_id, txid)


def _notification_context(
    gateway_id: str, pne_id: str, txid: bytes, index: int, epoch: int, tk_step: int
) -> tuple[Part, ...]:
    return (gateway_id, pne_id, txid, index, epoch, tk_step)


def _ack_proof(
    eukey: bytes, *, gateway_id: str, pne_id: str, txid: bytes, index: int, epoch: int
) -> bytes:
    return mac(eukey, ACK_LABEL, gateway_id, pne_id, txid, index, epoch)


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyChainAssigned(Event):
    """Server: store this chain with the PNE's Entity ID and User ID (003 §7.4.2.1.1.2 step 5)."""

    #: PNE Entity ID.
    pne_id: str
    #: Owner.
    user_id: str
    #: The PN GW that asked (and will hold the set).
    gateway_id: str
    #: [EUKey_1..EUKey_n].
    eukeys: tuple[bytes, ...] = field(repr=False)
    #: The assignment epoch sealed into the response (D-003-11).
    epoch: int
    #: The epoch of the record the check was made against (0: no record): the store
    #: writes the chain only if the entity is still there (compare and set, so racing
    #: claims have one winner).
    expected_epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeySetReceived(Event):
    """PN GW: store TK and [EUKeyPNE] (003 §7.4.2.1.1.3 step 1) before notifying the PNE."""

    #: PNE Entity ID.
    pne_id: str
    #: Owner.
    user_id: str
    #: The PNE's Temporary Key, TK_t: the server's TK at its ratchet step ``tk_step``.
    tk: bytes = field(repr=False)
    #: [EUKey_1..EUKey_n].
    eukeys: tuple[bytes, ...] = field(repr=False)
    #: The selected EUKey's position (003 §7.4.2.1.1.3 step 2).
    key_index: int
    #: The assignment epoch the server sealed into the bundle (D-003-11).
    epoch: int
    #: t, the TK ratchet step of ``tk`` (0 before any TK-based authentication); the PN GW
    #: restarts its TK-flow state at ``GatewayTKState(tk, tk_step)``.
    tk_step: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyDelivered(Event):
    """PN GW: the PNE proved it stored EUKey_{key_index}."""

    #: PNE Entity ID.
    pne_id: str
    #: Position of the delivered key.
    key_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyInstalled(Event):
    """PNE: store this EUKey (003 §7.4.2.1.1.3, PNE step 1) before acknowledging."""

    #: The PN GW that delivered it.
    gateway_id: str
    #: Position in the chain.
    key_index: int
    #: The EUKey.
    eukey: bytes = field(repr=False)
    #: The transaction that delivered it (an Ack lost on the way is answered again).
    txid: bytes
    #: The assignment epoch: a Notification of a lower one is refused (D-003-11).
    epoch: int
    #: The PNE's TK-flow state from now on (:func:`cpns.protocol.tk_auth.pne_reassigned`):
    #: the TK at the Notification's step, the new EUKey at its index, nothing pending.
    #: None when the TK cannot serve the TK flow (a manufacturer TK not of 32 bytes).
    tk_state: tk_auth.PNETKState | None = None


# -- server -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignmentPolicy:
    """Server-side rules of EUKey assignment."""

    #: Entity ID of this CPNS Server (source of its messages).
    server_id: str = "cpns-server"
    #: Accepted |server time - request Time|, seconds.
    time_window: int = 300
    #: n, the number of EUKeys in a PNE chain (003 §7.4.2.1.1.2 step 4).
    chain_length: int = 16
    #: Failed password proofs for one User ID after which proofs are refused unchecked
    #: with TOO_MANY_ATTEMPTS (online guessing guard, deviations D-SRV-1).
    max_auth_failures: int = 10
    #: Seconds a failed proof keeps counting after the last one (the I/O layer applies it).
    auth_failure_window: int = 900

    def __post_init__(self) -> None:
        if not 1 <= self.chain_length <= 1024:
            raise ValueError("chain_length must be 1..1024")
        if not 1 <= self.time_window <= 86400:
            raise ValueError("time_window must be 1..86400 seconds")
        if not 1 <= self.max_auth_failures <= 1_000_000:
            raise ValueError("max_auth_failures must be 1..1000000")
        if not 1 <= self.auth_failure_window <= 7 * 86400:
            raise ValueError("auth_failure_window must be 1..604800 seconds")


def _no_failures(user_id: str) -> int:
    return 0


def check_attempts(lookups: ServerLookups, policy: AssignmentPolicy, user_id: str) -> None:
    """Refuse a password proof for ``user_id`` unchecked once it failed too often lately.

    Keyed by the User ID as sent, existing or not, so the refusal reveals no user.

    Raises: RemoteProtocolError: TOO_MANY_ATTEMPTS.
    """
    if lookups.auth_failures(user_id) >= policy.max_auth_failures:
        raise RemoteProtocolError(
            f"too many failed proofs for {user_id!r}", code=ErrorCode.TOO_MANY_ATTEMPTS
        )


@dataclass(frozen=True, slots=True)
class ServerLookups:
    """Synchronous reads the server roles need (injected; the store provides them)."""

    #: User by User ID.
    get_user: Callable[[str], UserRecord | None]
    #: Entity by Entity ID.
    get_entity: Callable[[str], EntityRecord | None]
    #: TK record by PNE Entity ID.
    get_tk: Callable[[str], TKRecord | None]
    #: Whether a random value was already used.
    nonce_used: Callable[[bytes], bool]
    #: Failed password proofs still counted for a User ID (D-SRV-1); none by default.
    auth_failures: Callable[[str], int] = _no_failures


class ServerState(Enum):
    """States of :class:`EUKeyAssignmentServer`."""

    EXPECT_REQUEST = auto()
    DONE = auto()
    FAILED = auto()


class EUKeyAssignmentServer(Machine[ServerState]):
    """CPNS Server role of 003 §7.4.2.1.1.2: one request in, one response out.

    ``requester`` is the PN GW Entity ID that Digest authenticated (step 0); the request
    must come from it.
    """

    HOP: ClassVar[str] = "server"

    def __init__(
        self,
        *,
        policy: AssignmentPolicy,
        lookups: ServerLookups,
        requester: str,
        rng: Random,
        now: int,
    ) -> None:
        super().__init__(
            ServerState.EXPECT_REQUEST, done=ServerState.DONE, failed=ServerState.FAILED
        )
        self._policy = policy
        self._lookups = lookups
        self._requester = requester
        self._rng = rng
        self._now = now

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if not isinstance(incoming, EUKeyAssignmentRequest):
            return None
        # 003 §7.4.2.1.1.2 step 2: "send the EUKey Assignment Response ... with fail status".
        return EUKeyAssignmentResponse(
            txid=incoming.txid,
            src=self._policy.server_id,
            dst=incoming.src,
            status=code,
            pne_id=incoming.pne_id,
        )

    def _on_request(self, message: Message) -> list[Event]:
        assert isinstance(message, EUKeyAssignmentRequest)
        policy, look = self._policy, self._lookups
        check_addressed(message, to=policy.server_id, sender=self._requester)
        gateway = look.get_entity(self._requester)
        if gateway is None or gateway.kind is not EntityKind.PN_GW or gateway.eukey is None:
            raise RemoteProtocolError(
                "requester is not a PN GW with an EUKey", code=ErrorCode.NOT_AUTHORIZED
            )
        if gateway.revoked:
            raise RemoteProtocolError("requesting PN GW is revoked", code=ErrorCode.ENTITY_REVOKED)
        # 003 §6.3.2.2: "PNGW and PNE are owned by the same CPNS User" (004 §5.x.3). Checked
        # before the user is looked up or the password tried, so that a PN GW of one user can
        # neither enumerate users nor test another user's password online (D-003-9).
        if gateway.owner != message.user_id:
            raise RemoteProtocolError(
                "PN GW belongs to another user", code=ErrorCode.NOT_AUTHORIZED
            )
        check_fresh(message.time, now=self._now, window=policy.time_window)
        check_attempts(look, policy, message.user_id)
        user = look.get_user(message.user_id)
        if user is None:
            raise RemoteProtocolError(f"no user {message.user_id!r}", code=ErrorCode.UNKNOWN_USER)
        # Steps 1-2: recompute Hash(AuthData) and compare in constant time.
        try:
            verify_mac(
                user.password_key,
                message.auth_data,
                AUTH_DATA_LABEL,
                message.rand_pngw,
                message.time,
                message.user_id,
                message.pne_id,
                message.src,
            )
        except AuthenticationFailed:
            raise RemoteProtocolError(
                "AuthData does not verify", code=ErrorCode.WRONG_PASSWORD
            ) from None
        if user.disabled:
            raise RemoteProtocolError("user is disabled", code=ErrorCode.NOT_AUTHORIZED)
        if look.nonce_used(message.rand_pngw):
            raise RemoteProtocolError("RANDPNGW already used", code=ErrorCode.REPLAY)
        # Step 6: find TKPNE for the Entity ID. The claim must prove the label's code,
        # derived from that TK (D-003-10): an Entity ID alone releases nothing. An unknown
        # PNE is checked against a stand-in TK, so both cost the same and read alike.
        tk = look.get_tk(message.pne_id)
        # The label's code derives from the manufacturer's TK (step 0). Once TK-based
        # authentications ratcheted the record (tk_step > 0) that TK is gone: the claim
        # cannot be checked, and only a re-assignment of a PNE this user already holds is
        # accepted (deviations D-003-13). Same work either way.
        ratcheted = tk is not None and tk.tk_step > 0
        code = claim_code(tk.tk if tk is not None and not ratcheted else _NO_TK, message.pne_id)
        try:
            verify_mac(
                claim_key(code),
                message.claim_proof,
                CLAIM_PROOF_LABEL,
                message.rand_pngw,
                message.time,
                message.user_id,
                message.pne_id,
                message.src,
            )
            proven = True
        except AuthenticationFailed:
            proven = False
        if not proven and not ratcheted:
            raise RemoteProtocolError("claim code not proven", code=ErrorCode.CLAIM_NOT_PROVEN)
        if tk is None:
            raise RemoteProtocolError(
                "claim code not proven (no TK record)", code=ErrorCode.CLAIM_NOT_PROVEN
            )
        existing = look.get_entity(message.pne_id)
        if ratcheted and (
            existing is None
            or existing.owner != user.user_id
            or existing.kind is not EntityKind.PNE
            or existing.assigned_via is None
        ):
            # Opaque like a wrong code: the answer tells nothing about the owner.
            raise RemoteProtocolError(
                "claim not checkable (TK ratcheted) and the PNE is not this user's",
                code=ErrorCode.CLAIM_NOT_PROVEN,
            )
        if existing is not None:
            if existing.kind is not EntityKind.PNE:
                raise RemoteProtocolError("entity is not a PNE", code=ErrorCode.WRONG_ENTITY_KIND)
            if existing.owner != user.user_id:
                raise RemoteProtocolError(
                    f"entity owned by {existing.owner!r}", code=ErrorCode.OWNED_BY_OTHER_USER
                )
            if existing.revoked:
                raise RemoteProtocolError("entity is revoked", code=ErrorCode.ENTITY_REVOKED)
        # Steps 3-4: RANDSVR, SeedPNE and the chain.
        rand_svr = self._rng.token_bytes(32)
        eukeys = tuple(build_chain(seed_pne(rand_svr, message.rand_pngw), policy.chain_length))
        expected_epoch = existing.epoch if existing is not None else 0
        epoch = expected_epoch + 1
        # The TK as held now, TK_s at step s (000 ratchets it): the server's step does not
        # change by a re-assignment; the new chain starts at index 1 (docs/procedures).
        bundle = encode_record(KeyBundle(tk=tk.tk, eukeys=eukeys, epoch=epoch, tk_step=tk.tk_step))
        sealed = seal(
            gateway.eukey,
            bundle,
            purpose=RESPONSE_PURPOSE,
            context=_bundle_context(policy.server_id, message.src, message.pne_id, message.txid),
            nonce=self._rng.token_bytes(NONCE_LEN),
        )
        # Step 7: the Response with Status, [EUKeyPNE] and the TK.
        self._send(
            EUKeyAssignmentResponse(
                txid=message.txid,
                src=policy.server_id,
                dst=message.src,
                status=ErrorCode.OK,
                pne_id=message.pne_id,
                sealed_bundle=sealed,
            )
        )
        return [
            NonceConsumed(nonce=message.rand_pngw, expires_at=message.time + policy.time_window),
            EUKeyChainAssigned(
                pne_id=message.pne_id,
                user_id=user.user_id,
                gateway_id=message.src,
                eukeys=eukeys,
                epoch=epoch,
                expected_epoch=expected_epoch,
            ),
        ]

    def receive(self, message: Message) -> list[Event]:
        """Handle the EUKey Assignment Request; the Response is then in the outbox."""
        return super().receive(message)

    TRANSITIONS = MappingProxyType(
        {
            (ServerState.EXPECT_REQUEST, EUKeyAssignmentRequest): (_on_request, ServerState.DONE),
        }
    )


# -- PN GW ------------------------------------------------------------------------------------


class GatewayState(Enum):
    """States of :class:`EUKeyAssignmentGateway`."""

    START = auto()
    EXPECT_RESPONSE = auto()
    EXPECT_ACK = auto()
    DONE = auto()
    FAILED = auto()


class EUKeyAssignmentGateway(Machine[GatewayState]):
    """PN GW role of 003 §7.4.2.1.1.1 and §7.4.2.1.1.3.

    Build it with :meth:`start` (a new assignment) or :meth:`resume` (the set is stored
    and the PNE has not acknowledged yet, e.g. after a restart).
    """

    HOP: ClassVar[str] = "gateway"

    def __init__(
        self, *, gateway_id: str, gateway_eukey: bytes, server_id: str, rng: Random
    ) -> None:
        super().__init__(GatewayState.START, done=GatewayState.DONE, failed=GatewayState.FAILED)
        self._gateway_id = gateway_id
        self._gateway_eukey = gateway_eukey
        self._server_id = server_id
        self._rng = rng
        self._request: EUKeyAssignmentRequest | None = None
        self._pending: EUKeySetReceived | None = None
        self._txid = b""

    @property
    def request(self) -> EUKeyAssignmentRequest | None:
        """The request sent (kept so the I/O layer can persist and resend it unchanged)."""
        return self._request

    def start(
        self, *, pne_id: str, user_id: str, password_key: bytes, claim_key: bytes, now: int
    ) -> None:
        """Steps 1-4 of 003 §7.4.2.1.1.1: queue the EUKey Assignment Request.

        ``claim_key`` is :func:`claim_key` of the code the user typed from the PNE's label.
        """
        if self.state is not GatewayState.START:
            raise LocalProtocolError("start() only once, on a new machine")
        rand_pngw = self._rng.token_bytes(32)  # step 2 (stored by the I/O layer with the request)
        request = EUKeyAssignmentRequest(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._gateway_id,
            dst=self._server_id,
            pne_id=pne_id,
            user_id=user_id,
            time=now,
            rand_pngw=rand_pngw,
            auth_data=auth_data(
                password_key,
                rand_pngw=rand_pngw,
                time=now,
                user_id=user_id,
                pne_id=pne_id,
                gateway_id=self._gateway_id,
            ),
            claim_proof=claim_proof(
                claim_key,
                rand_pngw=rand_pngw,
                time=now,
                user_id=user_id,
                pne_id=pne_id,
                gateway_id=self._gateway_id,
            ),
        )
        self.resend(request)

    def resend(self, request: EUKeyAssignmentRequest) -> None:
        """Queue a stored request again, unchanged (idempotent retry, DESIGN §5)."""
        if self.state not in (GatewayState.START, GatewayState.EXPECT_RESPONSE):
            raise LocalProtocolError("no request is outstanding")
        self._request, self._txid = request, request.txid
        self._state = GatewayState.EXPECT_RESPONSE
        self._send(request)

    def resume(self, stored: EUKeySetReceived, *, txid: bytes) -> None:
        """Rebuild the machine from a stored set: queue the Notification again."""
        if self.state is not GatewayState.START:
            raise LocalProtocolError("resume() only on a new machine")
        self._pending, self._txid = stored, txid
        self._state = GatewayState.EXPECT_ACK
        self._notify()

    def _notify(self) -> None:
        """Steps 2-3 of 003 §7.4.2.1.1.3: the selected EUKey sealed under the TK."""
        pending = self._pending
        assert pending is not None
        eukey = pending.eukeys[pending.key_index - 1]
        self._send(
            EUKeyAssignmentNotification(
                txid=self._txid,
                src=self._gateway_id,
                dst=pending.pne_id,
                status=ErrorCode.OK,
                key_index=pending.key_index,
                epoch=pending.epoch,
                tk_step=pending.tk_step,
                sealed_eukey=seal(
                    pending.tk,
                    eukey,
                    purpose=NOTIFICATION_PURPOSE,
                    context=_notification_context(
                        self._gateway_id,
                        pending.pne_id,
                        self._txid,
                        pending.key_index,
                        pending.epoch,
                        pending.tk_step,
                    ),
                    nonce=self._rng.token_bytes(NONCE_LEN),
                ),
            )
        )

    def renotify(self) -> None:
        """Queue the Notification again (the PNE reconnected without acknowledging)."""
        if self.state is not GatewayState.EXPECT_ACK:
            raise LocalProtocolError("no notification is outstanding")
        self._notify()

    def _on_response(self, message: Message) -> list[Event]:
        assert isinstance(message, EUKeyAssignmentResponse)
        assert self._request is not None
        check_reply_to(message, self._request)
        if message.pne_id != self._request.pne_id:
            raise RemoteProtocolError(
                "response names another PNE", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        if message.status is not ErrorCode.OK:
            # DESIGN §5: the PN GW relays the server's verdict unchanged.
            raise RemoteProtocolError(f"server refused: {message.status.name}", code=message.status)
        if message.sealed_bundle is None:
            raise RemoteProtocolError("OK response without the key set")
        plain = open_sealed(
            self._gateway_eukey,
            message.sealed_bundle,
            purpose=RESPONSE_PURPOSE,
            context=_bundle_context(
                self._server_id, self._gateway_id, message.pne_id, message.txid
            ),
        )
        bundle = decode_record(KeyBundle, plain)
        # Step 2: select the EUKey: keys are used in order 1..n, so EUKey_1 (DESIGN §4).
        self._pending = EUKeySetReceived(
            pne_id=message.pne_id,
            user_id=self._request.user_id,
            tk=bundle.tk,
            eukeys=bundle.eukeys,
            key_index=1,
            epoch=bundle.epoch,
            tk_step=bundle.tk_step or 0,
        )
        self._notify()
        return [self._pending]

    def _on_ack(self, message: Message) -> list[Event]:
        assert isinstance(message, EUKeyAssignmentAck)
        assert self._pending is not None
        pending = self._pending
        check_addressed(message, to=self._gateway_id, sender=pending.pne_id)
        if message.txid != self._txid or message.key_index != pending.key_index:
            raise RemoteProtocolError(
                "acknowledgement of another delivery", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        if message.status is not ErrorCode.OK or message.proof is None:
            raise RemoteProtocolError(
                f"PNE refused the key: {message.status.name}",
                code=message.status
                if message.status is not ErrorCode.OK
                else ErrorCode.MALFORMED_MESSAGE,
            )
        verify_mac(
            pending.eukeys[pending.key_index - 1],
            message.proof,
            ACK_LABEL,
            self._gateway_id,
            pending.pne_id,
            self._txid,
            pending.key_index,
            pending.epoch,
        )
        return [EUKeyDelivered(pne_id=pending.pne_id, key_index=pending.key_index)]

    TRANSITIONS = MappingProxyType(
        {
            (GatewayState.EXPECT_RESPONSE, EUKeyAssignmentResponse): (
                _on_response,
                GatewayState.EXPECT_ACK,
            ),
            (GatewayState.EXPECT_ACK, EUKeyAssignmentAck): (_on_ack, GatewayState.DONE),
        }
    )


# -- PNE --------------------------------------------------------------------------------------


class DeviceState(Enum):
    """States of :class:`EUKeyAssignmentDevice`."""

    EXPECT_NOTIFICATION = auto()
    DONE = auto()
    FAILED = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldKey:
    """What a PNE holds from its last 003 assignment (rebuilt from its key store)."""

    #: The transaction that delivered it.
    txid: bytes
    #: Its position in the chain.
    key_index: int
    #: The EUKey.
    eukey: bytes = field(repr=False)
    #: The assignment epoch it came with (0 for a key stored before epochs existed).
    epoch: int


class EUKeyAssignmentDevice(Machine[DeviceState]):
    """PNE role of 003 §7.4.2.1.1.3: open the Notification with the TK, store, acknowledge.

    ``current`` is the key the PNE holds, if any. The server numbers a PNE's assignments
    (the epoch, sealed into the Notification with the key, D-003-11), so the rule is:

    * a higher epoch than the one held: install the key and acknowledge;
    * the same epoch, transaction and key: acknowledge again (the Ack was lost);
    * anything else (a lower epoch, or the same epoch with other content): refuse, so a
      recorded Notification of a superseded assignment cannot roll the PNE back.

    The Notification names the TK step t of the TK that seals it (the server's, after
    TK-based authentications ratcheted it, 000). ``tk_state`` is the PNE's TK-flow state
    (:class:`~cpns.protocol.tk_auth.PNETKState`), None before its first assignment, when
    ``tk`` (the manufacturer TK, step 0) is used. TK_t is computed forward with
    :func:`~cpns.protocol.tk_auth.pne_tk_at` (window ``REASSIGN_WINDOW``); a step behind
    the PNE's or beyond the window is refused with STALE_CREDENTIAL, except the delivery
    the PNE holds (same epoch, txid and index) whose Ack was lost before TK-based
    authentications moved past its step: acknowledged again with the key held. The
    installed key comes with the new state (:func:`~cpns.protocol.tk_auth.pne_reassigned`).
    """

    HOP: ClassVar[str] = "device"

    def __init__(
        self,
        *,
        entity_id: str,
        tk: bytes,
        rng: Random,
        current: HeldKey | None = None,
        tk_state: tk_auth.PNETKState | None = None,
    ) -> None:
        super().__init__(
            DeviceState.EXPECT_NOTIFICATION, done=DeviceState.DONE, failed=DeviceState.FAILED
        )
        self._entity_id = entity_id
        self._tk = tk
        self._rng = rng
        self._current = current
        self._tk_state = tk_state

    def _tk_at(self, step: int) -> bytes:
        """TK_step, computed forward from what the PNE holds (STALE_CREDENTIAL outside)."""
        if self._tk_state is not None:
            return tk_auth.pne_tk_at(self._tk_state, step)
        return tk_auth.tk_forward(self._tk, 0, step, window=tk_auth.REASSIGN_WINDOW)

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if not isinstance(incoming, EUKeyAssignmentNotification):
            return None
        # Tell the PN GW why (opaquely), so it stops re-sending.
        return EUKeyAssignmentAck(
            txid=incoming.txid,
            src=self._entity_id,
            dst=incoming.src,
            status=code,
            key_index=incoming.key_index,
        )

    def _on_notification(self, message: Message) -> list[Event]:
        assert isinstance(message, EUKeyAssignmentNotification)
        check_addressed(message, to=self._entity_id)
        if message.status is not ErrorCode.OK:
            raise RemoteProtocolError(
                f"notification status {message.status.name}", code=message.status
            )
        if message.sealed_eukey is None or message.epoch is None:
            raise RemoteProtocolError("OK notification without a key or an epoch")
        tk_step = message.tk_step or 0
        held = self._current
        if (
            held is not None
            and self._tk_state is not None
            and tk_step < self._tk_state.tk_step
            and (message.epoch, message.txid, message.key_index)
            == (held.epoch, held.txid, held.key_index)
        ):
            # This delivery is installed, its Ack was lost, and TK-based authentications
            # have since ratcheted past its step: the TK that seals it is gone. Acknowledge
            # again with the key held (the same Ack as before); nothing is installed.
            self._send(self._ack(message, held.eukey))
            return []
        tk = self._tk_at(tk_step)
        eukey = open_sealed(
            tk,
            message.sealed_eukey,
            purpose=NOTIFICATION_PURPOSE,
            context=_notification_context(
                message.src,
                self._entity_id,
                message.txid,
                message.key_index,
                message.epoch,
                tk_step,
            ),
        )
        events: list[Event] = []
        if held is not None and message.epoch <= held.epoch:
            same = (
                message.epoch == held.epoch
                and message.txid == held.txid
                and message.key_index == held.key_index
                and eukey == held.eukey
            )
            if not same:
                raise AuthenticationFailed(
                    "notification of a superseded assignment", code=ErrorCode.REPLAY
                )
        else:
            events.append(
                EUKeyInstalled(
                    gateway_id=message.src,
                    key_index=message.key_index,
                    eukey=eukey,
                    txid=message.txid,
                    epoch=message.epoch,
                    tk_state=tk_auth.pne_reassigned(
                        self._tk_state,
                        tk=tk,
                        tk_step=tk_step,
                        eukey=eukey,
                        key_index=message.key_index,
                    )
                    if len(tk) == KEY_LEN
                    else None,
                )
            )
        self._send(self._ack(message, eukey))
        return events

    def _ack(self, message: EUKeyAssignmentNotification, eukey: bytes) -> EUKeyAssignmentAck:
        """The OK Ack proving ``eukey`` for this delivery (D-003-4)."""
        assert message.epoch is not None
        return EUKeyAssignmentAck(
            txid=message.txid,
            src=self._entity_id,
            dst=message.src,
            status=ErrorCode.OK,
            key_index=message.key_index,
            proof=_ack_proof(
                eukey,
                gateway_id=message.src,
                pne_id=self._entity_id,
                txid=message.txid,
                index=message.key_index,
                epoch=message.epoch,
            ),
        )

    TRANSITIONS = MappingProxyType(
        {
            (DeviceState.EXPECT_NOTIFICATION, EUKeyAssignmentNotification): (
                _on_notification,
                DeviceState.DONE,
            ),
        }
    )
