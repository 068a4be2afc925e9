"""EUKey assignment for an entity with UI, after User ID / password authentication.

004 §5.x.1: "CPNS Server assigns EUKey to PNE and PN GW after authenticating PNE and PN GW
based on User ID and password of CPNS User who owns PNE and PN GW. Assigned EUKey is
stored in CPNS Server together with Entity ID and User ID."

Theory of operation
-------------------
The entity (a PN GW, or a PNE with UI) asks its user for the User ID and password and
turns the password into the password key (scrypt, :func:`cpns.crypto.password_key`),
the same value the server stored when the user was registered. It sends a request with
a fresh ``rand``, its wall-clock ``time`` and ``auth_data``, an HMAC under the password
key over the whole request context. The server checks time, user and proof, refuses a
reused ``rand``, refuses an Entity ID registered to another user, assigns a fresh random
EUKey and answers with it sealed under a key derived from the password key and both
rands. Opening that seal authenticates the server to the entity: only a holder of the
password key could have made it.

The link is HTTPS with the server's certificate (004 §5.x.4); the seal keeps the EUKey
confidential even where TLS ends before the service (a proxy).

Relayed by a PN GW
------------------
A PNE with UI has no WAN access: its request travels over the PAN to a PN GW, which relays
it unchanged over its own HTTPS + Digest link (docs/procedures/pne-enrolment.md). The
server machine is then built with ``relay``, the Digest-authenticated PN GW, and adds the
rules of a relayed request, checked before the password proof as in the 003 flow
(D-003-9, D-004-5): only a PN GW relays, only a PNE's request, and only for the PN GW's
own CPNS User (any other User ID, existing or not, is ``NOT_AUTHORIZED``). Since the
relaying PN GW is authenticated and of that user, the precise codes are given
(``UNKNOWN_USER``, ``WRONG_PASSWORD``) instead of the opaque one (D-004-2). The PN GW
sees the request and the sealed reply but never the password key, so it cannot open the
EUKey; what it could guess offline is bounded by the password hashing (scrypt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from types import MappingProxyType
from typing import ClassVar, Final

from cpns.crypto.hashing import KEY_LEN, Part, mac, verify_mac
from cpns.crypto.kdf import derive_key
from cpns.crypto.keywrap import NONCE_LEN, open_sealed, seal
from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError, RemoteProtocolError
from cpns.messages.constants import TXID_LEN, entity_id_problem
from cpns.messages.model import Message, UserKeyAssignmentRequest, UserKeyAssignmentResponse
from cpns.protocol._checks import check_addressed, check_fresh, check_reply_to
from cpns.protocol._machine import Event, Machine, NonceConsumed
from cpns.protocol.key_assignment import AssignmentPolicy, ServerLookups, check_attempts
from cpns.records import UserRecord
from cpns.types import EntityKind, Random

__all__ = [
    "ClientState",
    "EUKeyAssigned",
    "EUKeyReceived",
    "ServerState",
    "UserKeyAssignmentClient",
    "UserKeyAssignmentServer",
]

AUTH_DATA_LABEL: Final = "cpns/v1/004/auth-data"
REPLY_KEY_LABEL: Final = "cpns/v1/004/reply-key"
EUKEY_PURPOSE: Final = "004/eukey"
#: Key used to compute a MAC for an unknown user, so both refusals cost the same.
_NO_USER_KEY: Final = bytes(32)


def _auth_parts(request: UserKeyAssignmentRequest) -> tuple[Part, ...]:
    """The values ``auth_data`` covers, after its label (docs/wire.md 8.7)."""
    return (
        request.rand,
        request.time,
        request.user_id,
        request.src,
        int(request.entity_kind),
        request.dst,
    )


def _auth_data(password_key: bytes, request: UserKeyAssignmentRequest) -> bytes:
    return mac(password_key, AUTH_DATA_LABEL, *_auth_parts(request))


def _reply_key(password_key: bytes, request: UserKeyAssignmentRequest, rand_server: bytes) -> bytes:
    return derive_key(
        password_key,
        salt=request.rand + rand_server,
        label=REPLY_KEY_LABEL,
        context=(request.src, request.user_id, request.txid),
    )


def _context(request: UserKeyAssignmentRequest) -> tuple[Part, ...]:
    return (request.dst, request.src, request.txid)


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyAssigned(Event):
    """Server: store this EUKey with the Entity ID and User ID (004 §5.x.1)."""

    #: Entity ID.
    entity_id: str
    #: Entity kind.
    kind: EntityKind
    #: Owner.
    user_id: str
    #: The new EUKey.
    eukey: bytes = field(repr=False)
    #: Epoch of the record the checks saw (0: none); the store writes only if the entity is
    #: still at it, so racing first enrolments of one Entity ID have one winner.
    expected_epoch: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EUKeyReceived(Event):
    """Entity: store this EUKey (it authenticated the server by opening it)."""

    #: The EUKey.
    eukey: bytes = field(repr=False)


class ServerState(Enum):
    """States of :class:`UserKeyAssignmentServer`."""

    EXPECT_REQUEST = auto()
    DONE = auto()
    FAILED = auto()


class UserKeyAssignmentServer(Machine[ServerState]):
    """CPNS Server role: authenticate the user, assign and store an EUKey."""

    HOP: ClassVar[str] = "server"

    def __init__(
        self,
        *,
        policy: AssignmentPolicy,
        lookups: ServerLookups,
        rng: Random,
        now: int,
        relay: str | None = None,
    ) -> None:
        super().__init__(
            ServerState.EXPECT_REQUEST, done=ServerState.DONE, failed=ServerState.FAILED
        )
        self._policy = policy
        self._lookups = lookups
        self._rng = rng
        self._now = now
        #: The Digest-authenticated PN GW that relayed the request (None: sent directly).
        self._relay = relay

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if not isinstance(incoming, UserKeyAssignmentRequest):
            return None
        return UserKeyAssignmentResponse(
            txid=incoming.txid, src=self._policy.server_id, dst=incoming.src, status=code
        )

    def _on_request(self, message: Message) -> list[Event]:
        assert isinstance(message, UserKeyAssignmentRequest)
        look = self._lookups
        check_addressed(message, to=self._policy.server_id)
        if message.entity_kind is EntityKind.SERVER:
            raise RemoteProtocolError("a server cannot enrol", code=ErrorCode.WRONG_ENTITY_KIND)
        # Only a canonical, unreserved Entity ID can be registered ("Entity ID syntax").
        problem = entity_id_problem(message.src, server_id=self._policy.server_id)
        if problem is not None:
            raise RemoteProtocolError(
                f"Entity ID {message.src!r}: {problem}", code=ErrorCode.INVALID_ENTITY_ID
            )
        check_fresh(message.time, now=self._now, window=self._policy.time_window)
        check_attempts(look, self._policy, message.user_id)
        if self._relay is not None:
            return self._on_relayed(message)
        # The sender is not authenticated yet, so an unknown user and a wrong password get
        # the same opaque AUTHENTICATION_FAILED (no user enumeration); the precise reason
        # goes to the audit trail only (docs/deviations.md D-004-2).
        user = look.get_user(message.user_id)
        try:
            verify_mac(
                user.password_key if user else _NO_USER_KEY,
                message.auth_data,
                AUTH_DATA_LABEL,
                *_auth_parts(message),
            )
            if user is None:
                raise AuthenticationFailed
        except AuthenticationFailed:
            reason = "auth_data does not verify" if user else f"no user {message.user_id!r}"
            raise AuthenticationFailed(reason) from None
        return self._assign(message, user)

    def _on_relayed(self, message: UserKeyAssignmentRequest) -> list[Event]:
        """A request relayed by the authenticated PN GW ``relay`` (D-004-5)."""
        look = self._lookups
        relay = look.get_entity(self._relay) if self._relay is not None else None
        if relay is None or relay.kind is not EntityKind.PN_GW or relay.revoked:
            raise RemoteProtocolError(
                f"{self._relay!r} is not a PN GW that may relay", code=ErrorCode.NOT_AUTHORIZED
            )
        if message.entity_kind is not EntityKind.PNE:
            raise RemoteProtocolError(
                "a PN GW relays only a PNE's enrolment", code=ErrorCode.WRONG_ENTITY_KIND
            )
        # D-003-9 applied to the relay: only the PN GW's own user, existing or not.
        if message.user_id != relay.owner:
            raise RemoteProtocolError(
                f"user {message.user_id!r} does not own relaying PN GW {relay.entity_id!r}",
                code=ErrorCode.NOT_AUTHORIZED,
            )
        user = look.get_user(message.user_id)
        if user is None:
            raise RemoteProtocolError(f"no user {message.user_id!r}", code=ErrorCode.UNKNOWN_USER)
        try:
            verify_mac(user.password_key, message.auth_data, AUTH_DATA_LABEL, *_auth_parts(message))
        except AuthenticationFailed:
            raise RemoteProtocolError(
                "auth_data does not verify", code=ErrorCode.WRONG_PASSWORD
            ) from None
        return self._assign(message, user)

    def _assign(self, message: UserKeyAssignmentRequest, user: UserRecord) -> list[Event]:
        """The password proof verified: the remaining checks, then a fresh EUKey."""
        look = self._lookups
        if user.disabled:
            raise RemoteProtocolError("user is disabled", code=ErrorCode.NOT_AUTHORIZED)
        if look.nonce_used(message.rand):
            raise RemoteProtocolError("rand already used", code=ErrorCode.REPLAY)
        existing = look.get_entity(message.src)
        if existing is not None:
            if existing.owner != user.user_id:
                raise RemoteProtocolError(
                    f"entity owned by {existing.owner!r}", code=ErrorCode.OWNED_BY_OTHER_USER
                )
            if existing.kind is not message.entity_kind:
                raise RemoteProtocolError(
                    "entity registered with another kind", code=ErrorCode.WRONG_ENTITY_KIND
                )
            if existing.revoked:
                raise RemoteProtocolError("entity is revoked", code=ErrorCode.ENTITY_REVOKED)
        eukey = self._rng.token_bytes(KEY_LEN)
        rand_server = self._rng.token_bytes(32)
        sealed = seal(
            _reply_key(user.password_key, message, rand_server),
            eukey,
            purpose=EUKEY_PURPOSE,
            context=_context(message),
            nonce=self._rng.token_bytes(NONCE_LEN),
        )
        self._send(
            UserKeyAssignmentResponse(
                txid=message.txid,
                src=self._policy.server_id,
                dst=message.src,
                status=ErrorCode.OK,
                rand_server=rand_server,
                sealed_eukey=sealed,
            )
        )
        return [
            NonceConsumed(nonce=message.rand, expires_at=message.time + self._policy.time_window),
            EUKeyAssigned(
                entity_id=message.src,
                kind=message.entity_kind,
                user_id=user.user_id,
                eukey=eukey,
                expected_epoch=existing.epoch if existing is not None else 0,
            ),
        ]

    TRANSITIONS = MappingProxyType(
        {
            (ServerState.EXPECT_REQUEST, UserKeyAssignmentRequest): (_on_request, ServerState.DONE),
        }
    )


class ClientState(Enum):
    """States of :class:`UserKeyAssignmentClient`."""

    START = auto()
    EXPECT_RESPONSE = auto()
    DONE = auto()
    FAILED = auto()


class UserKeyAssignmentClient(Machine[ClientState]):
    """Entity role: prove the user's password, receive and check the EUKey."""

    HOP: ClassVar[str] = "entity"

    def __init__(
        self, *, entity_id: str, entity_kind: EntityKind, server_id: str, rng: Random
    ) -> None:
        super().__init__(ClientState.START, done=ClientState.DONE, failed=ClientState.FAILED)
        self._entity_id = entity_id
        self._kind = entity_kind
        self._server_id = server_id
        self._rng = rng
        self._password_key = b""
        self._request: UserKeyAssignmentRequest | None = None

    def start(self, *, user_id: str, password_key: bytes, now: int) -> None:
        """Queue the request. ``password_key`` is :func:`cpns.crypto.password_key`'s output."""
        if self.state is not ClientState.START:
            raise LocalProtocolError("start() only once")
        self._password_key = password_key
        draft = UserKeyAssignmentRequest(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._entity_id,
            dst=self._server_id,
            user_id=user_id,
            entity_kind=self._kind,
            time=now,
            rand=self._rng.token_bytes(32),
            auth_data=bytes(32),
        )
        self._request = UserKeyAssignmentRequest(
            txid=draft.txid,
            src=draft.src,
            dst=draft.dst,
            user_id=user_id,
            entity_kind=self._kind,
            time=now,
            rand=draft.rand,
            auth_data=_auth_data(password_key, draft),
        )
        self._state = ClientState.EXPECT_RESPONSE
        self._send(self._request)

    def _on_response(self, message: Message) -> list[Event]:
        assert isinstance(message, UserKeyAssignmentResponse)
        assert self._request is not None
        check_reply_to(message, self._request)
        if message.status is not ErrorCode.OK:
            raise RemoteProtocolError(f"server refused: {message.status.name}", code=message.status)
        if message.rand_server is None or message.sealed_eukey is None:
            raise RemoteProtocolError("OK response without the key")
        eukey = open_sealed(
            _reply_key(self._password_key, self._request, message.rand_server),
            message.sealed_eukey,
            purpose=EUKEY_PURPOSE,
            context=_context(self._request),
        )
        if len(eukey) != KEY_LEN:
            raise AuthenticationFailed("EUKey of the wrong length")
        return [EUKeyReceived(eukey=eukey)]

    TRANSITIONS = MappingProxyType(
        {
            (ClientState.EXPECT_RESPONSE, UserKeyAssignmentResponse): (
                _on_response,
                ClientState.DONE,
            ),
        }
    )
