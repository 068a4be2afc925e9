"""Wire constants: message types, header keys and size limits (DESIGN §3)."""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Final

__all__ = [
    "ID_PATTERN",
    "RESERVED_IDS",
    "MAX_ID_LEN",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "EST_ID_LEN",
    "FLOW_LEN",
    "MAX_PNES_PER_ESTABLISHMENT",
    "TXID_LEN",
    "AuthFlow",
    "HeaderKey",
    "MessageType",
    "entity_id_problem",
]

#: The only protocol version this implementation speaks.
PROTOCOL_VERSION: Final = 1
#: Largest encoded CPNS message accepted on any link, in bytes.
MAX_MESSAGE_SIZE: Final = 64 * 1024
#: Transaction IDs are 16 random bytes (DESIGN §5: every exchange carries one).
TXID_LEN: Final = 16
#: Flow (correlation) IDs are 8 random bytes chosen by the party that starts a flow; logs
#: show them as 16 hex digits. Not a security input: nothing is decided on them.
FLOW_LEN: Final = 8
#: Establishment IDs are 16 random bytes chosen by the CPNS Server when it answers a PN GW's
#: SETUP Request (the key of its pending state); a LocalEUKey authentication uses one drawn
#: by the PN GW.
EST_ID_LEN: Final = 16
#: Most PNEs one PN Establishment carries (entries in each of its aggregated messages).
MAX_PNES_PER_ESTABLISHMENT: Final = 64
#: Longest Entity ID, User ID or PN ID, in characters.
MAX_ID_LEN: Final = 128
#: Entity, User and PN IDs on the wire (docs/architecture.md "Entity ID syntax"): 1..128
#: of ``A-Z a-z 0-9 . _ @ + -``, starting with a letter or digit; no spaces, no ':' (Digest
#: user names are joined with ':'), so no IPv6 literal and no host:port is an ID. IDs are
#: compared byte for byte; an ID an entity may REGISTER is also canonical (lowercase) and
#: not reserved (:func:`entity_id_problem`), so no two registered IDs differ by case.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}")
#: Names no entity may register: the PAN address of a PN GW ("pan"), the destination of a
#: reply to an unreadable request ("unknown"), the audit actor of operator actions
#: ("admin"), the source recorded for in-process requests ("local"), and host names that
#: designate this machine. The server's own Entity ID is refused as well (it is
#: configured, so it is checked by :func:`entity_id_problem`, not listed here).
RESERVED_IDS: Final = frozenset(
    {"pan", "unknown", "admin", "local", "localhost", "localhost.localdomain", "ip6-localhost"}
)
#: IPv4 literals and anything written like one (digits and dots only: "10.0.0.1", "127.1").
_ADDRESS_LIKE: Final = re.compile(r"[0-9]+(?:\.[0-9]*)*")


def entity_id_problem(entity_id: str, *, server_id: str | None = None) -> str | None:
    """Why ``entity_id`` cannot be registered (enrolment, TK import), or None if it can.

    A registrable Entity ID matches :data:`ID_PATTERN`, is lowercase (its canonical form),
    is not in :data:`RESERVED_IDS`, does not look like an IPv4 address, does not end in
    ".localhost", and is not the server's own Entity ID in any case.
    """
    if ID_PATTERN.fullmatch(entity_id) is None:
        return "not a valid Entity ID"
    if entity_id != entity_id.lower():
        return "not in canonical form: Entity IDs are registered in lowercase"
    if server_id is not None and entity_id == server_id.lower():
        return "the server's own Entity ID"
    if entity_id in RESERVED_IDS or entity_id.endswith(".localhost"):
        return "a reserved name"
    if _ADDRESS_LIKE.fullmatch(entity_id) is not None:
        return "written like a network address"
    return None


class HeaderKey(IntEnum):
    """Keys of the top-level CBOR map of every message."""

    VERSION = 0  #: protocol version, always 1
    TYPE = 1  #: :class:`MessageType`
    TXID = 2  #: transaction ID, 16 bytes
    SOURCE = 3  #: source Entity ID (002 §5.3.2 chooses protection by source/destination)
    DESTINATION = 4  #: destination Entity ID
    PN_ID = 5  #: PN ID, where the procedure has one (optional)
    BODY = 6  #: the typed body, a map with small integer keys
    FLOW = 7  #: flow (correlation) ID, 8 bytes (optional; for logs and traces only)


class MessageType(IntEnum):
    """Every CPNS message; the values are ours (the seeds define names, not numbers)."""

    #: Generic error reply (malformed or unexpected message), carries a status.
    ERROR = 1
    #: EUKey assignment for an entity with UI, request (004 §5.x.1).
    USER_KEY_ASSIGNMENT_REQUEST = 10
    #: EUKey assignment for an entity with UI, response (004 §5.x.1).
    USER_KEY_ASSIGNMENT_RESPONSE = 11
    #: EUKey Assignment Request, PN GW -> CPNS Server (003 §7.4.2.1.1.1).
    EUKEY_ASSIGNMENT_REQUEST = 20
    #: EUKey Assignment Response, CPNS Server -> PN GW (003 §7.4.2.1.1.2).
    EUKEY_ASSIGNMENT_RESPONSE = 21
    #: EUKey Assignment Notification, PN GW -> PNE (003 §7.4.2.1.1.3).
    EUKEY_ASSIGNMENT_NOTIFICATION = 22
    #: EUKey Assignment Acknowledgement, PNE -> PN GW (ours: docs/deviations.md D-003-4).
    EUKEY_ASSIGNMENT_ACK = 23
    #: PNE announces itself on a PAN connection (ours: the PAN attach).
    PNE_HELLO = 30
    #: SETUP Request, originating PNE -> PN GW (002 §7.5.4.1, PN Establishment).
    PN_SETUP_REQUEST = 40
    #: The PN GW's SETUP Request to an invited PNE (ours: the invitation, 002 §7.5.4.1).
    PN_INVITE = 41
    #: SETUP Response, invited PNE -> PN GW (002 §7.5.4.1).
    PN_INVITE_RESPONSE = 42
    #: SETUP Request, PN GW -> CPNS Server: every PNE ID and rand_PNE (002 §7.5.4.2).
    PN_ESTABLISH_REQUEST = 43
    #: AUTHENTICATE Request, CPNS Server -> PN GW: rand_server and per-PNE challenges
    #: (002 §7.5.4.3).
    AUTHENTICATE_REQUEST = 44
    #: AUTHENTICATE Request, PN GW -> one PNE, created by the PN GW (002 §7.5.4.2).
    PNE_AUTHENTICATE_REQUEST = 45
    #: AUTHENTICATE Response, one PNE -> PN GW (002 §7.5.4.1).
    PNE_AUTHENTICATE_RESPONSE = 46
    #: AUTHENTICATE Response, PN GW -> CPNS Server: every PNE's proof (002 §7.5.4.2).
    AUTHENTICATE_RESPONSE = 47
    #: SETUP Response, CPNS Server -> PN GW: per-PNE results and hash_server (002 §7.5.4.3).
    PN_ESTABLISH_RESPONSE = 48
    #: SETUP Response, PN GW -> originating PNE (002 §7.5.4.2).
    PN_SETUP_RESPONSE = 49
    #: PNEstablishmentNotify, PN GW -> invited PNE (002 §7.5.4.2).
    PN_ESTABLISHMENT_NOTIFY = 50
    #: LocalEUKey authentication request, PNE -> PN GW (ours: the "7.5.5" the seeds cite).
    LOCAL_AUTH_REQUEST = 51
    #: LocalEUKey authentication response with the PN GW's hash, PN GW -> PNE (ours: "7.5.5").
    LOCAL_AUTH_RESPONSE = 52


class AuthFlow(IntEnum):
    """How one PNE authenticates in a PN Establishment (values ours)."""

    #: rand/hash mutual authentication with the PNE's EUKey (002 §7.5.4).
    RAND_HASH = 1
    #: TK-based mutual authentication with the TK ratchet and the EUKey chain (000 §7.5).
    TK = 2
    #: PNE <-> PN GW with the LocalEUKey, the PN GW in the server's part (ours: "7.5.5").
    LOCAL = 3
