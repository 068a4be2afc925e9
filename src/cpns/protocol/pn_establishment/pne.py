"""PN Establishment, PNE roles: originating and invited (002 §7.5.4.1, 000 §7.5.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum, auto
from types import MappingProxyType
from typing import Any, ClassVar

from cpns.crypto.keywrap import NONCE_LEN
from cpns.errors import (
    AuthenticationFailed,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    UnexpectedMessage,
)
from cpns.messages.constants import TXID_LEN, AuthFlow
from cpns.messages.model import (
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNEstablishmentNotify,
    PNInvite,
    PNInviteResponse,
    PNSetupRequest,
    PNSetupResponse,
)
from cpns.protocol import tk_auth
from cpns.protocol._checks import check_addressed, check_reply_to
from cpns.protocol._machine import Event, Machine
from cpns.protocol.pn_establishment.events import (
    _AF,
    _OK,
    LocalEUKeyStored,
    PNEJoined,
    PNETKUpdated,
    _ctx,
    _tk_run,
)
from cpns.protocol.pne_auth import (
    ESTABLISHMENT,
    RandHashResponder,
    open_local_eukey,
)
from cpns.types import Random

__all__ = ["InvitedPNE", "OriginatingPNE", "PNEState"]


# -- PNE: originating and invited ------------------------------------------------------------


class PNEState(Enum):
    """States of :class:`OriginatingPNE` and :class:`InvitedPNE`."""

    START = auto()
    EXPECT_INVITE = auto()
    EXPECT_AUTHENTICATE_REQUEST = auto()
    EXPECT_RESULT = auto()
    DONE = auto()
    FAILED = auto()


class _PNEBase(Machine[PNEState]):
    """What both PNE roles do on the AUTHENTICATE Request and on the final message."""

    HOP: ClassVar[str] = "device"

    def __init__(
        self,
        initial: PNEState,
        *,
        pne_id: str,
        gw_id: str,
        server_id: str,
        eukey: bytes | None,
        tk_state: tk_auth.PNETKState | None,
        rng: Random,
        tk_lookup: Callable[[], tk_auth.PNETKState | None] | None = None,
    ) -> None:
        super().__init__(initial, done=PNEState.DONE, failed=PNEState.FAILED)
        self._pne_id = pne_id
        self._gw_id = gw_id
        self._server_id = server_id
        self._eukey = eukey
        self._tk_state = tk_state
        self._tk_lookup = tk_lookup
        self._rng = rng
        self._pn_id: str | None = None
        self._rand_pne: bytes | None = None
        self._local_wanted = False
        self._request: PNEAuthenticateRequest | None = None
        self._response: PNEAuthenticateResponse | None = None
        self._responder: RandHashResponder | None = None
        self._tk_answer: tk_auth.PNEAnswer | None = None
        self._tk_run: tk_auth.TKRun | None = None

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

    def _current_tk(self) -> tk_auth.PNETKState | None:
        """The TK state to move from: as stored now when the machine reads it through
        ``tk_lookup`` (another establishment of this PNE may have moved it since this
        machine was built; answering or confirming from an older copy would take the
        stored state back, losing a pending EUKey), else the machine's own copy."""
        return self._tk_lookup() if self._tk_lookup is not None else self._tk_state

    def _on_authenticate(self, message: Message) -> list[Event]:
        """002 §7.5.4.1 (rand/hash) or 000 §7.5.1 (TK): answer, open the LocalEUKey copy."""
        assert isinstance(message, PNEAuthenticateRequest)
        check_addressed(message, to=self._pne_id, sender=self._gw_id)
        pn_id, rand_pne = self._pn_id, self._rand_pne
        assert pn_id is not None
        assert rand_pne is not None
        events: list[Event] = []
        if message.auth_flow is AuthFlow.RAND_HASH and self._eukey is not None:
            self._responder = RandHashResponder(
                key=self._eukey,
                ctx=_ctx(pn_id, self._gw_id, self._server_id, self._pne_id),
                rand_pne=rand_pne,
                labels=ESTABLISHMENT,
            )
            proof: dict[str, Any] = {"hash_pne": self._responder.answer(message.rand_server)}
            key = self._eukey
        elif message.auth_flow is AuthFlow.TK and (tk_state := self._current_tk()) is not None:
            if message.an is None or message.tk_step is None or message.key_index is None:
                raise AuthenticationFailed("TK challenge without AN, step or index")
            run = _tk_run(
                pn_id,
                self._gw_id,
                self._server_id,
                self._pne_id,
                message.est_id,
                rand_pne,
                message.rand_server,
            )
            answer = tk_auth.pne_answer(
                tk_state,
                run=run,
                challenge=tk_auth.TKChallenge(
                    tk_step=message.tk_step, key_index=message.key_index, an=message.an
                ),
                sealed_next=message.sealed_next_eukey,
                nonce=self._rng.token_bytes(NONCE_LEN),
            )
            self._tk_run, self._tk_answer, self._tk_state = run, answer, answer.state
            events.append(PNETKUpdated(state=answer.state))
            proof = {
                "sealed_eukey": answer.sealed_eukey,
                "key_index": answer.key_index,
                "tk_step": answer.tk_step,
            }
            key = answer.state.eukey
        else:
            raise AuthenticationFailed(f"no credential for flow {message.auth_flow.name}")
        if message.sealed_local_eukey is not None:
            local = open_local_eukey(
                key,
                message.sealed_local_eukey,
                server_id=self._server_id,
                gw_id=self._gw_id,
                pne_id=self._pne_id,
                pn_id=pn_id,
                est_id=message.est_id,
                holder_id=self._pne_id,
            )
            events.append(
                LocalEUKeyStored(
                    pne_id=self._pne_id,
                    gw_id=self._gw_id,
                    pn_id=pn_id,
                    est_id=message.est_id,
                    local_eukey=local,
                )
            )
        self._request = message
        self._response = PNEAuthenticateResponse(
            txid=message.txid,
            src=self._pne_id,
            dst=message.src,
            flow=message.flow,
            est_id=message.est_id,
            status=_OK,
            **proof,
        )
        self._send(self._response)
        return events

    def _on_retry(self, message: Message) -> list[Event]:
        """The same AUTHENTICATE Request again (our answer was lost): the same answer."""
        if message != self._request or self._response is None:
            raise UnexpectedMessage("a second AUTHENTICATE Request in one establishment")
        self._send(self._response)
        return []

    def _on_early_result(self, message: Message) -> list[Event]:
        """The establishment ended before this PNE was challenged (a refusal)."""
        status = getattr(message, "status", _AF)
        raise RemoteProtocolError(
            f"refused before authentication: {ErrorCode(status).name}",
            code=status if status is not _OK else ErrorCode.UNEXPECTED_MESSAGE,
        )

    def _check_result(self, message: Message) -> list[Event]:
        """002 §7.5.4.1 last paragraph: verify hash_server (TK: the key confirmation)."""
        assert isinstance(message, PNSetupResponse | PNEstablishmentNotify)
        request = self._request
        assert request is not None
        assert self._pn_id is not None
        if message.status is not _OK:
            raise RemoteProtocolError(f"not a member: {message.status.name}", code=message.status)
        if message.est_id != request.est_id:
            raise UnexpectedMessage("result of another establishment")
        events: list[Event] = []
        if self._responder is not None:
            if message.hash_server is None:
                raise AuthenticationFailed("no hash_server")
            sk = self._responder.accept(message.hash_server)
        else:
            answer, run, state = self._tk_answer, self._tk_run, self._current_tk()
            assert answer is not None
            assert run is not None
            assert state is not None
            if message.confirm is None:
                raise AuthenticationFailed("no key confirmation")
            self._tk_state = tk_auth.pne_confirmed(
                state, run=run, answer=answer, confirm=message.confirm
            )
            events.append(PNETKUpdated(state=self._tk_state))
            sk = answer.sk
        members = message.members if isinstance(message, PNSetupResponse) else ()
        events.append(
            PNEJoined(
                pn_id=self._pn_id,
                gw_id=self._gw_id,
                est_id=request.est_id,
                flow=request.auth_flow,
                sk=sk,
                members=members,
            )
        )
        return events


class OriginatingPNE(_PNEBase):
    """The originating PNE (002 §7.5.4.1): :meth:`start` sends the SETUP Request.

    ``eukey`` is its EUKey (rand/hash flow, enrolled with UI), ``tk_state`` its TK-flow
    state (003 chain); either may be None. ``server_id`` is the CPNS Server it trusts.
    ``tk_lookup``, if given, reads the PNE's stored TK state when the machine answers or
    confirms (instead of ``tk_state``): a device that runs more than one establishment at
    a time must give it, so that no machine moves the stored state back.
    """

    def __init__(
        self,
        *,
        pne_id: str,
        gw_id: str,
        server_id: str,
        eukey: bytes | None,
        tk_state: tk_auth.PNETKState | None,
        rng: Random,
        tk_lookup: Callable[[], tk_auth.PNETKState | None] | None = None,
    ) -> None:
        super().__init__(
            PNEState.START,
            pne_id=pne_id,
            gw_id=gw_id,
            server_id=server_id,
            eukey=eukey,
            tk_state=tk_state,
            rng=rng,
            tk_lookup=tk_lookup,
        )
        self._setup: PNSetupRequest | None = None

    @property
    def request(self) -> PNSetupRequest | None:
        """The SETUP Request sent (to resend unchanged)."""
        return self._setup

    def start(
        self,
        *,
        pn_id: str,
        invite: Sequence[str] = (),
        local_eukey: bool = False,
        flow: bytes | None = None,
    ) -> None:
        """Queue the SETUP Request: rand_PNE, the LocalEUKey need, the invited PNEs."""
        if self._state is not PNEState.START:
            raise LocalProtocolError("start() only once, on a new machine")
        self._pn_id, self._local_wanted = pn_id, local_eukey
        self._rand_pne = self._rng.token_bytes(32)
        self._setup = PNSetupRequest(
            txid=self._rng.token_bytes(TXID_LEN),
            src=self._pne_id,
            dst=self._gw_id,
            pn_id=pn_id,
            flow=flow,
            rand_pne=self._rand_pne,
            local_eukey=local_eukey,
            invite=tuple(invite),
        )
        self._send(self._setup)
        self._state = PNEState.EXPECT_AUTHENTICATE_REQUEST

    def _on_setup_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNSetupResponse)
        assert self._setup is not None
        check_reply_to(message, self._setup)
        return self._check_result(message)

    def _on_early_setup_response(self, message: Message) -> list[Event]:
        assert isinstance(message, PNSetupResponse)
        assert self._setup is not None
        check_reply_to(message, self._setup)
        return self._on_early_result(message)

    TRANSITIONS = MappingProxyType(
        {
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNEAuthenticateRequest): (
                _PNEBase._on_authenticate,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNSetupResponse): (
                _on_early_setup_response,
                PNEState.FAILED,
            ),
            (PNEState.EXPECT_RESULT, PNEAuthenticateRequest): (
                _PNEBase._on_retry,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_RESULT, PNSetupResponse): (_on_setup_response, PNEState.DONE),
        }
    )


class InvitedPNE(_PNEBase):
    """An invited PNE (002 §7.5.4.1): answers the PN GW's invitation with its SETUP
    Response, then the AUTHENTICATE Request, then checks its PNEstablishmentNotify."""

    def __init__(
        self,
        *,
        pne_id: str,
        gw_id: str,
        server_id: str,
        eukey: bytes | None,
        tk_state: tk_auth.PNETKState | None,
        rng: Random,
        local_eukey: bool = False,
        tk_lookup: Callable[[], tk_auth.PNETKState | None] | None = None,
    ) -> None:
        super().__init__(
            PNEState.EXPECT_INVITE,
            pne_id=pne_id,
            gw_id=gw_id,
            server_id=server_id,
            eukey=eukey,
            tk_state=tk_state,
            rng=rng,
            tk_lookup=tk_lookup,
        )
        self._local_wanted = local_eukey
        self._invite: PNInvite | None = None
        self._invite_response: PNInviteResponse | None = None

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        if isinstance(incoming, PNInvite):
            return PNInviteResponse(
                txid=incoming.txid,
                src=self._pne_id,
                dst=incoming.src,
                flow=incoming.flow,
                status=code,
                local_eukey=False,
            )
        return super()._failure_reply(incoming, code)

    def _on_invite(self, message: Message) -> list[Event]:
        assert isinstance(message, PNInvite)
        assert message.pn_id is not None
        check_addressed(message, to=self._pne_id, sender=self._gw_id)
        if self._eukey is None and self._current_tk() is None:
            raise RemoteProtocolError("no credential to join with", code=ErrorCode.UNKNOWN_ENTITY)
        self._invite, self._pn_id = message, message.pn_id
        self._rand_pne = self._rng.token_bytes(32)
        self._invite_response = PNInviteResponse(
            txid=message.txid,
            src=self._pne_id,
            dst=message.src,
            pn_id=message.pn_id,
            flow=message.flow,
            status=_OK,
            rand_pne=self._rand_pne,
            local_eukey=self._local_wanted,
        )
        self._send(self._invite_response)
        return []

    def _on_invite_retry(self, message: Message) -> list[Event]:
        if message != self._invite or self._invite_response is None:
            raise UnexpectedMessage("a second invitation")
        self._send(self._invite_response)
        return []

    def _on_notify(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishmentNotify)
        assert self._invite is not None
        _check_notify(message, self._invite)
        return self._check_result(message)

    def _on_early_notify(self, message: Message) -> list[Event]:
        assert isinstance(message, PNEstablishmentNotify)
        assert self._invite is not None
        _check_notify(message, self._invite)
        return self._on_early_result(message)

    TRANSITIONS = MappingProxyType(
        {
            (PNEState.EXPECT_INVITE, PNInvite): (_on_invite, PNEState.EXPECT_AUTHENTICATE_REQUEST),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNInvite): (
                _on_invite_retry,
                PNEState.EXPECT_AUTHENTICATE_REQUEST,
            ),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNEAuthenticateRequest): (
                _PNEBase._on_authenticate,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_AUTHENTICATE_REQUEST, PNEstablishmentNotify): (
                _on_early_notify,
                PNEState.FAILED,
            ),
            (PNEState.EXPECT_RESULT, PNEAuthenticateRequest): (
                _PNEBase._on_retry,
                PNEState.EXPECT_RESULT,
            ),
            (PNEState.EXPECT_RESULT, PNEstablishmentNotify): (_on_notify, PNEState.DONE),
        }
    )


def _check_notify(message: PNEstablishmentNotify, invite: PNInvite) -> None:
    """The notification answers our invitation: same transaction, from the PN GW."""
    if message.txid != invite.txid or message.src != invite.src or message.dst != invite.dst:
        raise RemoteProtocolError(
            "notification does not match the invitation", code=ErrorCode.UNEXPECTED_MESSAGE
        )
