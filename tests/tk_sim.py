"""A three-party model of the TK flow (000 §7.5) over the pure functions of tk_auth.

No messages and no machines: each hop is a function call, and a run can be cut after any
hop (the message of that hop is lost). The server, PN GW and PNE keep exactly the state
the resync rule says they persist; "retry" is a new run with a fresh establishment.
Used by tests/unit/protocol/test_tk_auth.py and tests/property/test_tk_auth_property.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from cpns.crypto.hashchain import build_chain
from cpns.protocol.tk_auth import (
    GatewayTKState,
    PNEAnswer,
    PNETKState,
    StaleCredential,
    TKChallenge,
    TKRun,
    TKVerified,
    gateway_confirmed,
    gateway_prepare,
    pne_answer,
    pne_confirmed,
    pne_reassigned,
    pne_tk_at,
    server_challenge,
    server_verify,
)
from tests.helpers import FixedRandom

IDS = {"pn_id": "pn-home", "gw_id": "gw-alice", "server_id": "cpns-server", "pne_id": "pne-lamp"}


class Hop(Enum):
    """Where a run is cut: the message after this point is lost."""

    #: 44 AUTHENTICATE_REQUEST server -> PN GW.
    CHALLENGE_UPSTREAM = "challenge-upstream"
    #: 45 PNE_AUTHENTICATE_REQUEST PN GW -> PNE.
    CHALLENGE_PAN = "challenge-pan"
    #: 46 PNE_AUTHENTICATE_RESPONSE PNE -> PN GW.
    RESPONSE_PAN = "response-pan"
    #: 47 AUTHENTICATE_RESPONSE PN GW -> server.
    RESPONSE_UPSTREAM = "response-upstream"
    #: 48 PN_ESTABLISH_RESPONSE server -> PN GW.
    CONFIRM_UPSTREAM = "confirm-upstream"
    #: 49 / 50 PN GW -> PNE.
    CONFIRM_PAN = "confirm-pan"


@dataclass
class ServerSide:
    """What the server stores for the PNE: TK_s, s, i_s and the chain."""

    tk: bytes = field(repr=False)
    tk_step: int
    key_index: int
    eukeys: tuple[bytes, ...] = field(repr=False)


@dataclass
class Outcome:
    """How one run ended."""

    #: "ok", "lost" or the error code name.
    result: str
    #: The session keys of PNE and server, when the run completed.
    pne_sk: bytes | None = None
    server_sk: bytes | None = None
    #: The server's verdict (for reassign).
    verified: TKVerified | None = None
    #: The exception that ended the run, if any.
    error: Exception | None = None


@dataclass
class World:
    """Server, PN GW and PNE states for one PNE, plus a seeded source of nonces."""

    server: ServerSide
    gateway: GatewayTKState
    gateway_eukeys: tuple[bytes, ...] = field(repr=False)
    pne: PNETKState
    rng: FixedRandom
    chain_len: int
    #: Set when a verdict asked for a 003 re-assignment that has not happened yet.
    reassign_due: bool = False

    @classmethod
    def new(cls, *, seed: int = 1, chain_len: int = 6) -> World:
        """A PNE just assigned through 003: EUKey_1 and the manufacturer TK at step 0."""
        rng = FixedRandom(seed)
        tk = rng.token_bytes(32)
        eukeys = tuple(build_chain(rng.token_bytes(32), chain_len))
        return cls(
            server=ServerSide(tk=tk, tk_step=0, key_index=1, eukeys=eukeys),
            gateway=GatewayTKState(tk=tk, tk_step=0),
            gateway_eukeys=eukeys,
            pne=PNETKState(tk=tk, tk_step=0, eukey=eukeys[0], key_index=1),
            rng=rng,
            chain_len=chain_len,
        )

    def new_run(self) -> TKRun:
        """A fresh establishment: est_id and both randoms."""
        return TKRun(
            **IDS,
            est_id=self.rng.token_bytes(16),
            rand_pne=self.rng.token_bytes(32),
            rand_server=self.rng.token_bytes(32),
        )

    def challenge(self, run: TKRun) -> TKChallenge:
        """The server's challenge at its stored state."""
        s = self.server
        return server_challenge(
            tk=s.tk,
            tk_step=s.tk_step,
            key_index=s.key_index,
            chain_length=len(s.eukeys),
            run=run,
        )

    def run(self, cut: Hop | None = None, *, duplicate: Hop | None = None) -> Outcome:
        """One establishment for the PNE, cut after ``cut`` (that message is lost).

        ``duplicate`` delivers the message of that hop twice (the second copy is what
        travels on). Errors end the run with their code; the parties keep the state they
        persisted up to that point.
        """
        run = self.new_run()
        challenge = self.challenge(run)
        if cut is Hop.CHALLENGE_UPSTREAM:
            return Outcome("lost")
        try:
            prepared = gateway_prepare(
                self.gateway,
                eukeys=self.gateway_eukeys,
                run=run,
                challenge=challenge,
                nonce=self.rng.token_bytes(12),
            )
            self.gateway = prepared.state
            if cut is Hop.CHALLENGE_PAN:
                return Outcome("lost")
            answer = self._pne_answer(run, challenge, prepared.sealed_next)
            if duplicate is Hop.CHALLENGE_PAN:
                answer = self._pne_answer(run, challenge, prepared.sealed_next)
            if cut in (Hop.RESPONSE_PAN, Hop.RESPONSE_UPSTREAM):
                return Outcome("lost")
            verified = self._server_verify(run, challenge, answer)
            if duplicate is Hop.RESPONSE_UPSTREAM:
                # The second copy finds the pending entry gone: the stored reply answers it,
                # and verifying it again would find the state moved (superseded).
                try:
                    self._server_verify(run, challenge, answer)
                except StaleCredential as exc:
                    if exc.reassign:
                        raise AssertionError("a duplicated proof asked for reassign") from exc
                else:
                    raise AssertionError("a duplicated proof verified twice")
            if cut is Hop.CONFIRM_UPSTREAM:
                return Outcome("lost", verified=verified)
            self.gateway = gateway_confirmed(self.gateway, prepared.pending)
            if verified.reassign:
                self.reassign_due = True
            if cut is Hop.CONFIRM_PAN:
                return Outcome("lost", verified=verified)
            self.pne = pne_confirmed(self.pne, run=run, answer=answer, confirm=verified.confirm)
            if duplicate is Hop.CONFIRM_PAN:
                self.pne = pne_confirmed(self.pne, run=run, answer=answer, confirm=verified.confirm)
        except StaleCredential as exc:
            if exc.reassign:
                self.reassign_due = True
            return Outcome(exc.code.name, error=exc)
        except Exception as exc:  # an AuthenticationFailed ends the run with its code
            code = getattr(exc, "code", None)
            return Outcome(code.name if code is not None else type(exc).__name__, error=exc)
        return Outcome("ok", pne_sk=answer.sk, server_sk=verified.sk, verified=verified)

    def _pne_answer(
        self, run: TKRun, challenge: TKChallenge, sealed_next: bytes | None
    ) -> PNEAnswer:
        answer = pne_answer(
            self.pne,
            run=run,
            challenge=challenge,
            sealed_next=sealed_next,
            nonce=self.rng.token_bytes(12),
        )
        self.pne = answer.state
        return answer

    def _server_verify(self, run: TKRun, challenge: TKChallenge, answer: PNEAnswer) -> TKVerified:
        s = self.server
        verified = server_verify(
            tk=s.tk,
            tk_step=s.tk_step,
            eukeys=s.eukeys,
            key_index=s.key_index,
            run=run,
            challenge_step=challenge.tk_step,
            challenge_index=challenge.key_index,
            sealed_eukey=answer.sealed_eukey,
            proof_index=answer.key_index,
        )
        self.server = dataclasses.replace(
            s, tk=verified.tk, tk_step=verified.tk_step, key_index=verified.key_index
        )
        return verified

    def reassign(self) -> None:
        """003 re-assignment: a new chain, EUKey_1 delivered under the server's current TK.

        The server keeps its TK step; the PN GW receives TK_s, s and the new set; the
        PNE computes TK_s forward from its own TK to open the notification.
        """
        eukeys = tuple(build_chain(self.rng.token_bytes(32), self.chain_len))
        s = self.server
        self.server = ServerSide(tk=s.tk, tk_step=s.tk_step, key_index=1, eukeys=eukeys)
        self.gateway = GatewayTKState(tk=s.tk, tk_step=s.tk_step)
        self.gateway_eukeys = eukeys
        tk = pne_tk_at(self.pne, s.tk_step)
        self.pne = pne_reassigned(self.pne, tk=tk, tk_step=s.tk_step, eukey=eukeys[0])
        self.reassign_due = False
