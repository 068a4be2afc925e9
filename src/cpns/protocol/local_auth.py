"""LocalEUKey authentication of a PNE and its PN GW (the "7.5.5" 002 §7.5.4 refers to).

Theory of operation
-------------------
002 §7.5.4 gives a PNE that asked for one a LocalEUKey shared with its PN GW, and says
that where the PAN is not a Secure PAN, "PNE SHALL perform mutual authentication and
session key sharing by using LocalEUKey in the same way as described in 7.5.5", the PN GW
"perform[ing] the same signalling procedure of CPNS Server". The seeds do not include
7.5.5; we define it as the rand/hash exchange of 002 §7.5.4 itself, keyed by the
LocalEUKey, with the PN GW in the server's part (docs/wire.md section 3.4):

1. PNE -> PN GW: LocalAuthRequest (rand_PNE).
2. PN GW -> PNE: PNEAuthenticateRequest, flow LOCAL, the PN GW's random value in
   ``rand_server``.
3. PNE -> PN GW: PNEAuthenticateResponse with hash_PNE.
4. PN GW -> PNE: LocalAuthResponse with the PN GW's hash (hash_server).

Nothing is written twice: the PNE answers with the same
:class:`~cpns.protocol.pne_auth.RandHashResponder` the PN Establishment PNE uses, and the
PN GW checks with the same :func:`~cpns.protocol.pne_auth.verify_proof` the CPNS Server
uses for each PNE; only the key (the LocalEUKey), the labels
(:data:`~cpns.protocol.pne_auth.LOCAL`) and the context's server slot (``"pngw"``)
differ. Both ends come out with the same session key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from types import MappingProxyType
from typing import ClassVar

from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError, RemoteProtocolError
from cpns.messages.constants import EST_ID_LEN, TXID_LEN, AuthFlow
from cpns.messages.model import (
    LocalAuthRequest,
    LocalAuthResponse,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
)
from cpns.protocol._checks import check_addressed
from cpns.protocol._machine import Event, Machine
from cpns.protocol.pne_auth import LOCAL, AuthContext, RandHashResponder, verify_proof
from cpns.types import Random

__all__ = [
    "LocalAuthGateway",
    "LocalAuthGatewayState",
    "LocalAuthPNE",
    "LocalAuthPNEState",
    "LocalSessionEstablished",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalSessionEstablished(Event):
    """Both ends: the peer is authenticated with the LocalEUKey; SK is shared."""

    #: The PNE.
    pne_id: str
    #: The PN GW.
    gw_id: str
    #: PN ID.
    pn_id: str
    #: The session key.
    sk: bytes = field(repr=False)


# -- PNE ----------------------------------------------------------------------------------------


class LocalAuthPNEState(Enum):
    """States of :class:`LocalAuthPNE`."""

    START = auto()
    EXPECT_CHALLENGE = auto()
    EXPECT_RESPONSE = auto()
    DONE = auto()
    FAILED = auto()


class LocalAuthPNE(Machine[LocalAuthPNEState]):
    """The PNE's part: :meth:`start`, answer the PN GW's challenge, check its hash."""

    HOP: ClassVar[str] = "device"

    def __init__(
        self, *, pne_id: str, gw_id: str, pn_id: str, local_eukey: bytes, rng: Random
    ) -> None:
        super().__init__(
            LocalAuthPNEState.START, done=LocalAuthPNEState.DONE, failed=LocalAuthPNEState.FAILED
        )
        self._pne_id, self._gw_id, self._pn_id = pne_id, gw_id, pn_id
        self._key = local_eukey
        self._rng = rng
        self._request: LocalAuthRequest | None = None
        self._challenge: PNEAuthenticateRequest | None = None
        self._answer: PNEAuthenticateResponse | None = None
        self._responder: RandHashResponder | None = None

    def start(self, *, flow: bytes | None = None) -> None:
        """Queue the LocalAuthRequest with a fresh rand_PNE."""
        if self._state is not LocalAuthPNEState.START:
            raise LocalProtocolError("start() only once, on a new machine")
        rand_pne = self._rng.token_bytes(32)
        self._responder = RandHashResponder(
            key=self._key,
            ctx=AuthContext.local(pn_id=self._pn_id, gw_id=self._gw_id, pne_id=self._pne_id),
            rand_pne=rand_pne,
            labels=LOCAL,
        )
        self._request = LocalAuthRequest(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._pne_id,
            dst=self._gw_id,
            pn_id=self._pn_id,
            flow=flow,
            rand_pne=rand_pne,
        )
        self._send(self._request)
        self._state = LocalAuthPNEState.EXPECT_CHALLENGE

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if isinstance(incoming, PNEAuthenticateRequest):
            return PNEAuthenticateResponse(
                txid=incoming.txid,
                src=self._pne_id,
                dst=incoming.src,
                flow=incoming.flow,
                est_id=incoming.est_id,
                status=code,
            )
        return None

    def _same_exchange(self, message: Message) -> None:
        request = self._request
        assert request is not None
        if message.txid != request.txid:
            raise RemoteProtocolError("another transaction", code=ErrorCode.UNEXPECTED_MESSAGE)
        check_addressed(message, to=self._pne_id, sender=self._gw_id)

    def _on_challenge(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEAuthenticateRequest)
        assert self._responder is not None
        self._same_exchange(message)
        if message.auth_flow is not AuthFlow.LOCAL:
            raise AuthenticationFailed("not a LocalEUKey challenge")
        self._challenge = message
        self._answer = PNEAuthenticateResponse(
            txid=message.txid,
            src=self._pne_id,
            dst=message.src,
            flow=message.flow,
            est_id=message.est_id,
            status=ErrorCode.OK,
            hash_pne=self._responder.answer(message.rand_server),
        )
        self._send(self._answer)
        return []

    def _on_retry(self, message: Message) -> list[Event]:
        if message != self._challenge or self._answer is None:
            raise RemoteProtocolError("a second challenge", code=ErrorCode.UNEXPECTED_MESSAGE)
        self._send(self._answer)
        return []

    def _on_response(self, message: Message) -> list[Event]:
        assert isinstance(message, LocalAuthResponse)
        assert self._responder is not None
        self._same_exchange(message)
        if message.status is not ErrorCode.OK:
            raise RemoteProtocolError(f"refused: {message.status.name}", code=message.status)
        if message.hash_server is None or not self._responder.answered:
            raise AuthenticationFailed("no hash from the PN GW")
        sk = self._responder.accept(message.hash_server)
        return [
            LocalSessionEstablished(
                pne_id=self._pne_id, gw_id=self._gw_id, pn_id=self._pn_id, sk=sk
            )
        ]

    TRANSITIONS = MappingProxyType(
        {
            (LocalAuthPNEState.EXPECT_CHALLENGE, PNEAuthenticateRequest): (
                _on_challenge,
                LocalAuthPNEState.EXPECT_RESPONSE,
            ),
            (LocalAuthPNEState.EXPECT_CHALLENGE, LocalAuthResponse): (
                _on_response,
                LocalAuthPNEState.FAILED,
            ),
            (LocalAuthPNEState.EXPECT_RESPONSE, PNEAuthenticateRequest): (
                _on_retry,
                LocalAuthPNEState.EXPECT_RESPONSE,
            ),
            (LocalAuthPNEState.EXPECT_RESPONSE, LocalAuthResponse): (
                _on_response,
                LocalAuthPNEState.DONE,
            ),
        }
    )


# -- PN GW (in the CPNS Server's part) -------------------------------------------------------


class LocalAuthGatewayState(Enum):
    """States of :class:`LocalAuthGateway`."""

    EXPECT_REQUEST = auto()
    EXPECT_PROOF = auto()
    DONE = auto()
    FAILED = auto()


class LocalAuthGateway(Machine[LocalAuthGatewayState]):
    """The PN GW's part, the CPNS Server's of 002 §7.5.4.3 with the LocalEUKey.

    ``local_eukey`` gives the LocalEUKey the PN GW stored for (PNE ID, PN ID), or None.
    The I/O layer calls :meth:`fail` with ``TIMEOUT`` if the PNE does not answer.
    """

    HOP: ClassVar[str] = "gateway"

    def __init__(
        self, *, gw_id: str, local_eukey: Callable[[str, str], bytes | None], rng: Random
    ) -> None:
        super().__init__(
            LocalAuthGatewayState.EXPECT_REQUEST,
            done=LocalAuthGatewayState.DONE,
            failed=LocalAuthGatewayState.FAILED,
        )
        self._gw_id = gw_id
        self._lookup = local_eukey
        self._rng = rng
        self._request: LocalAuthRequest | None = None
        self._challenge: PNEAuthenticateRequest | None = None
        self._key: bytes | None = None

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        request = self._request if self._request is not None else incoming
        if not isinstance(request, LocalAuthRequest):
            return None
        return LocalAuthResponse(
            txid=request.txid, src=self._gw_id, dst=request.src, flow=request.flow, status=code
        )

    def _on_request(self, message: Message) -> list[Event]:
        assert isinstance(message, LocalAuthRequest)
        assert message.pn_id is not None
        check_addressed(message, to=self._gw_id)
        key = self._lookup(message.src, message.pn_id)
        if key is None:
            raise RemoteProtocolError(
                "no LocalEUKey for this PNE and PN", code=ErrorCode.UNKNOWN_ENTITY
            )
        self._request, self._key = message, key
        self._challenge = PNEAuthenticateRequest(
            txid=message.txid,
            src=self._gw_id,
            dst=message.src,
            pn_id=message.pn_id,
            flow=message.flow,
            est_id=self._rng.token_bytes(EST_ID_LEN),
            auth_flow=AuthFlow.LOCAL,
            rand_server=self._rng.token_bytes(32),
        )
        self._send(self._challenge)
        return []

    def _on_request_retry(self, message: Message) -> list[Event]:
        if message != self._request or self._challenge is None:
            raise RemoteProtocolError("a second request", code=ErrorCode.UNEXPECTED_MESSAGE)
        self._send(self._challenge)
        return []

    def _on_proof(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEAuthenticateResponse)
        request, challenge, key = self._request, self._challenge, self._key
        assert request is not None
        assert challenge is not None
        assert key is not None
        assert request.pn_id is not None
        if message.txid != challenge.txid or message.est_id != challenge.est_id:
            raise RemoteProtocolError("another transaction", code=ErrorCode.UNEXPECTED_MESSAGE)
        check_addressed(message, to=self._gw_id, sender=request.src)
        if message.status is not ErrorCode.OK:
            raise RemoteProtocolError(f"PNE refused: {message.status.name}", code=message.status)
        if message.hash_pne is None:
            raise AuthenticationFailed("no hash_PNE")
        # The CPNS Server's check of 002 §7.5.4.3, with the LocalEUKey (one opaque failure).
        verdict = verify_proof(
            key,
            ctx=AuthContext.local(pn_id=request.pn_id, gw_id=self._gw_id, pne_id=request.src),
            rand_pne=request.rand_pne,
            rand_server=challenge.rand_server,
            hash_pne_value=message.hash_pne,
            labels=LOCAL,
        )
        self._send(
            LocalAuthResponse(
                txid=request.txid,
                src=self._gw_id,
                dst=request.src,
                flow=request.flow,
                status=ErrorCode.OK,
                hash_server=verdict.hash_server,
            )
        )
        return [
            LocalSessionEstablished(
                pne_id=request.src, gw_id=self._gw_id, pn_id=request.pn_id, sk=verdict.sk
            )
        ]

    TRANSITIONS = MappingProxyType(
        {
            (LocalAuthGatewayState.EXPECT_REQUEST, LocalAuthRequest): (
                _on_request,
                LocalAuthGatewayState.EXPECT_PROOF,
            ),
            (LocalAuthGatewayState.EXPECT_PROOF, LocalAuthRequest): (
                _on_request_retry,
                LocalAuthGatewayState.EXPECT_PROOF,
            ),
            (LocalAuthGatewayState.EXPECT_PROOF, PNEAuthenticateResponse): (
                _on_proof,
                LocalAuthGatewayState.DONE,
            ),
        }
    )
