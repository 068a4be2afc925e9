"""Wire constants: message types, header keys and size limits (DESIGN §3)."""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Final

__all__ = [
    "ID_PATTERN",
    "MAX_ID_LEN",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "TXID_LEN",
    "HeaderKey",
    "MessageType",
]

#: The only protocol version this implementation speaks.
PROTOCOL_VERSION: Final = 1
#: Largest encoded CPNS message accepted on any link, in bytes.
MAX_MESSAGE_SIZE: Final = 64 * 1024
#: Transaction IDs are 16 random bytes (DESIGN §5: every exchange carries one).
TXID_LEN: Final = 16
#: Longest Entity ID, User ID or PN ID, in characters.
MAX_ID_LEN: Final = 128
#: Entity, User and PN IDs: printable, no spaces, no ':' (Digest user names contain them).
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}")


class HeaderKey(IntEnum):
    """Keys of the top-level CBOR map of every message."""

    VERSION = 0  #: protocol version, always 1
    TYPE = 1  #: :class:`MessageType`
    TXID = 2  #: transaction ID, 16 bytes
    SOURCE = 3  #: source Entity ID (002 §5.3.2 chooses protection by source/destination)
    DESTINATION = 4  #: destination Entity ID
    PN_ID = 5  #: PN ID, where the procedure has one (optional)
    BODY = 6  #: the typed body, a map with small integer keys


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
