"""Wire status codes and the exception tree.

Every failure that can cross a link has one :class:`ErrorCode`. The code travels on the
exception class (``error_code``), the way h2 and aioquic attach wire codes to their
exceptions, so the layer that replies never has to translate.

The tree::

    CPNSError
    ├── LocalProtocolError          the caller misused the API (wrong state, bad argument)
    ├── RemoteProtocolError         the peer misbehaved; carries .code
    │   ├── DecodeError             malformed bytes
    │   ├── UnexpectedMessage       well formed, wrong state
    │   └── AuthenticationFailed    any MAC / AEAD / chain failure, one opaque code
    ├── ProcedureRejected           the peer (or we) refused for a stated, non-crypto reason
    └── ConfigurationError          bad configuration (also a ValueError)
    StoreError, TransportError      I/O layers only
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "AuthenticationFailed",
    "CPNSError",
    "ConfigurationError",
    "DecodeError",
    "ErrorCode",
    "LocalProtocolError",
    "ProcedureRejected",
    "RemoteProtocolError",
    "StoreError",
    "TransportError",
    "UnexpectedMessage",
]


class ErrorCode(IntEnum):
    """Status values carried in CPNS messages (the ``status`` field of every response).

    0 is success; 1xx are message-level faults, 2xx authentication and authorisation
    verdicts, 3xx procedure-specific refusals, 5xx faults of the responder itself.
    The seeds only say "fail status code" (003 §7.4.2.1.1.2 step 2); the values are ours
    and are listed, with the comment of each member below, in docs/wire.md section 5.
    """

    #: The procedure step succeeded.
    OK = 0
    #: The bytes were not a well-formed CPNS message (DESIGN §3 strict decoding).
    MALFORMED_MESSAGE = 100
    #: Unsupported protocol version in the header.
    UNSUPPORTED_VERSION = 101
    #: A well-formed message that is not legal in the receiver's current state.
    UNEXPECTED_MESSAGE = 102
    #: A message addressed to another entity.
    WRONG_DESTINATION = 103
    #: A MAC, AEAD tag, hash-chain value or Digest response did not verify.
    AUTHENTICATION_FAILED = 200
    #: No CPNS User with this User ID (003 §7.4.2.1.1.2 step 2).
    UNKNOWN_USER = 201
    #: The user authentication data did not verify: wrong password (003 §7.4.2.1.1.2 step 2).
    WRONG_PASSWORD = 202
    #: The Time in the request is outside the accepted window (003 §7.4.2.1.1.1 step 3).
    STALE_TIME = 203
    #: The RANDPNGW (or transaction) was already used: a replay.
    REPLAY = 204
    #: The requesting entity is not allowed to act for this user (004 §5.x.3).
    NOT_AUTHORIZED = 205
    #: Too many failed password proofs for this User ID lately; retry later (D-SRV-1).
    TOO_MANY_ATTEMPTS = 206
    #: The claim of a PNE carried no valid proof of its label's claim code, or the PNE has no
    #: Temporary Key on record: nothing is released on the strength of an Entity ID (D-003-10).
    CLAIM_NOT_PROVEN = 207
    #: The PNE Entity ID is unknown or has no Temporary Key on record (003 §7.4.2.1.1.2 step 6).
    UNKNOWN_ENTITY = 301
    #: The entity is already registered to another CPNS User (004 §5.x.1).
    OWNED_BY_OTHER_USER = 302
    #: The entity is revoked.
    ENTITY_REVOKED = 303
    #: The entity kind does not allow this procedure (e.g. a gateway asking for a TK chain).
    WRONG_ENTITY_KIND = 304
    #: Another assignment of the same entity committed first (racing claims: one winner).
    CLAIM_CONFLICT = 305
    #: The Entity ID cannot be registered: not in canonical (lowercase) form, reserved, written
    #: like a network address, or the server's own ID ("Entity ID syntax", D-SRV-3).
    INVALID_ENTITY_ID = 306
    #: A TK step or EUKey index behind the receiver's window, or beyond its look-ahead: the
    #: credential is stale and the PNE needs a 003 re-assignment (000, resync rule N1).
    STALE_CREDENTIAL = 311
    #: The responder could not complete the step (storage, upstream unreachable).
    INTERNAL_ERROR = 500
    #: The next hop (CPNS Server seen from the PN GW) could not be reached.
    UPSTREAM_UNAVAILABLE = 502
    #: The step timed out at the named hop.
    TIMEOUT = 504

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode | int:
        """Map a received integer to a known code, or keep it as a plain int (h2 style)."""
        try:
            return cls(value)
        except ValueError:
            return value


class CPNSError(Exception):
    """Base class of every error this package raises on purpose."""


class LocalProtocolError(CPNSError):
    """The local caller used the API wrongly: wrong state, bad argument, terminal machine."""


class RemoteProtocolError(CPNSError):
    """The peer sent something we must refuse.

    ``code`` is what goes on the wire; ``str(exc)`` is a precise internal reason for logs
    and is never sent to the peer.
    """

    error_code: ErrorCode = ErrorCode.MALFORMED_MESSAGE

    def __init__(self, reason: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code: ErrorCode = code if code is not None else self.error_code


class DecodeError(RemoteProtocolError):
    """The bytes are not a well-formed CPNS message. The only error the codec raises."""

    error_code = ErrorCode.MALFORMED_MESSAGE


class UnexpectedMessage(RemoteProtocolError):
    """A well-formed message that the receiving state machine does not accept now."""

    error_code = ErrorCode.UNEXPECTED_MESSAGE


class AuthenticationFailed(RemoteProtocolError):
    """Any verification failed. One opaque failure: the reason never reaches the peer."""

    error_code = ErrorCode.AUTHENTICATION_FAILED

    def __init__(self, reason: str = "authentication failed", *, code: ErrorCode | None = None):
        super().__init__(reason, code=code)


class ProcedureRejected(CPNSError):
    """A procedure step was refused with a status (ours or the peer's).

    Raised by I/O layers and the CLI when a response carries a non-OK status.
    """

    def __init__(self, code: ErrorCode | int, reason: str = "", *, hop: str = "") -> None:
        name = code.name if isinstance(code, ErrorCode) else str(code)
        where = f" at {hop}" if hop else ""
        super().__init__(f"{name}{where}" + (f": {reason}" if reason else ""))
        self.code = code
        self.hop = hop
        self.reason = reason


class ConfigurationError(CPNSError, ValueError):
    """Invalid configuration value or file."""


class StoreError(CPNSError):
    """A persistence operation failed (I/O layer only)."""


class TransportError(CPNSError):
    """A network operation failed (I/O layer only)."""
