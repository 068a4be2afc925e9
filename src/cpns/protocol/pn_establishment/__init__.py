"""PN Establishment with mutual authentication of every PNE and the CPNS Server
(002 §7.5.4 rand/hash, 000 §7.5 TK-based), one machine per role.

Theory of operation
-------------------
Parties: the originating PNE, the invited PNEs, their PN GW and the CPNS Server.

1. The originating PNE sends its SETUP Request (PNE ID, rand_PNE, LocalEUKey need, the
   PNEs it invites); the PN GW invites each of them (PNInvite) and collects their SETUP
   Responses (rand_PNE, LocalEUKey need); one that does not answer in time is reported by
   the I/O layer (``timeout(pne_id)``) and left out (002 §7.5.4.1).
2. The PN GW sends the server one SETUP Request with every PNE ID and rand_PNE
   (002 §7.5.4.2).
3. The server checks each PNE alone (unknown, revoked, another user's, listed twice),
   chooses its flow (TK for a PNE whose chain came from a 003 assignment, rand/hash for a
   PNE enrolled with UI), draws one rand_server, generates and seals the LocalEUKeys, and
   answers with the AUTHENTICATE Request; the facts to keep (the pending establishment)
   come out as :class:`EstablishmentPending` (002 §7.5.4.3, 000 §7.5.3).
4. The PN GW opens its LocalEUKey copies, builds one AUTHENTICATE Request per PNE (for a
   TK PNE: checks AN, seals the next EUKey under the TK, :func:`tk_auth.gateway_prepare`)
   and collects the AUTHENTICATE Responses into one for the server; a PNE that does not
   answer in time is reported as ``TIMEOUT``.
5. Each PNE computes SK and hash_PNE (or, TK: checks AN, seals its current EUKey,
   :func:`tk_auth.pne_answer`) and opens its LocalEUKey copy.
6. The server, from the stored pending establishment, verifies every proof alone, computes
   hash_server (or the TK key confirmation), reports the PN inventory and TK/index advances
   as events and answers the SETUP Response; the PN GW relays each PNE's value in the
   SETUP Response (originator) or PNEstablishmentNotify (invited), and each PNE verifies
   it before it counts itself a member.

The rule for many PNEs: **a PNE that fails, fails alone**. Its refusal or failed proof is
reported for it (one opaque ``AUTHENTICATION_FAILED`` for any proof that does not
verify); the others go on. The server's SETUP Response is ``OK`` when at least one PNE
joined.

Each role is a :class:`~cpns.protocol._machine.Machine` with a transition table; stored
facts come in through the constructor or injected lookups, facts to persist go out as
events, and nothing here does I/O, reads a clock or draws randomness of its own.

Layout: :mod:`.events` (the facts each role reports and the records they carry),
:mod:`.server` (the CPNS Server's two halves), :mod:`.gateway` (the PN GW's coordinator),
:mod:`.pne` (the originating and the invited PNE). Everything public is re-exported here.
"""

from __future__ import annotations

from cpns.protocol.pn_establishment.events import (
    PENDING_TTL,
    EstablishmentFinished,
    EstablishmentPending,
    GatewayTKHolding,
    GatewayTKUpdated,
    LocalEUKeyStored,
    PendingPNE,
    PNEJoined,
    PNEResult,
    PNEstablished,
    PNETKUpdated,
    ReassignmentRequested,
    TKAdvanced,
    flow_from_name,
    flow_name,
)
from cpns.protocol.pn_establishment.gateway import (
    GatewayEstablishment,
    GatewayState,
)
from cpns.protocol.pn_establishment.pne import (
    InvitedPNE,
    OriginatingPNE,
    PNEState,
)
from cpns.protocol.pn_establishment.server import (
    EstablishmentLookups,
    ServerCompletion,
    ServerCompletionState,
    ServerSetup,
    ServerSetupState,
)

__all__ = [
    "PENDING_TTL",
    "EstablishmentFinished",
    "EstablishmentLookups",
    "EstablishmentPending",
    "GatewayEstablishment",
    "GatewayState",
    "GatewayTKHolding",
    "GatewayTKUpdated",
    "InvitedPNE",
    "LocalEUKeyStored",
    "OriginatingPNE",
    "PNEJoined",
    "PNEResult",
    "PNEState",
    "PNETKUpdated",
    "PNEstablished",
    "PendingPNE",
    "ReassignmentRequested",
    "ServerCompletion",
    "ServerCompletionState",
    "ServerSetup",
    "ServerSetupState",
    "TKAdvanced",
    "flow_from_name",
    "flow_name",
]
