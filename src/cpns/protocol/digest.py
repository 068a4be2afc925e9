"""HTTP Digest access authentication keyed by the EUKey (004 §5.x.2; RFC 7616, RFC 2617).

Theory of operation
-------------------
OMA CPNS CR 004 §5.x.2: "CPNS Server authenticates PNE and PN GW by Digest authentication
defined in RFC2617 using EUKey as a shared secret", and Digest "can also be used for server
authentication". Our reading:

* Parties: an entity (PN GW, PNE) is the Digest *client*; the CPNS Server is the Digest
  *server*. The username is the entity's Entity ID and the password is its EUKey written
  as 64 lower-case hex digits (the lookup callable hands that string in).
* The server answers an unauthenticated request with 401 and one ``WWW-Authenticate``
  challenge per configured algorithm, in the configured order (RFC 7616 §3.7). SHA-256
  (RFC 7616) is the default; MD5 (RFC 2617) is offered only when configured, for legacy
  clients such as Python's urllib, which reads only the first challenge and knows only
  MD5, so a legacy deployment lists MD5 first.
* The client answers with ``Authorization: Digest ...`` (RFC 7616 §3.4), qop=auth only.
  On success the server proves knowledge of the same EUKey with ``rspauth`` in the
  ``Authentication-Info`` header (RFC 7616 §3.5, RFC 2617 §3.2.3), and the client checks
  it with :meth:`DigestClient.verify_response`: that is the server authentication of 004.
* A client on a keep-alive connection reuses the nonce and counts ``nc`` up (RFC 7616
  §3.4 and §5.4), so only the first request costs a 401 round trip.

Stateless nonces (RFC 7616 §3.3 leaves the nonce format to the server, §5.4 and §5.5
discuss its lifetime): ``nonce = base64url(issued (8 bytes) || random (8) || tag (32))``
with ``tag = HMAC-SHA256(nonce_key, "cpns/v1/digest-nonce", realm, issued, random)``.
Any server process holding the same ``nonce_key`` accepts any other's nonces without a
shared database, and a forged or altered nonce is refused before any user lookup. A nonce
older than ``nonce_lifetime`` is *stale*: if the response is otherwise right,
:class:`DigestStale` tells the HTTP layer to answer 401 with ``stale=true`` so the client
retries with a fresh nonce without treating the key as wrong (RFC 7616 §3.3, "stale").

Replay (RFC 7616 §5.4, §5.5): per nonce, the highest ``nc`` accepted (and, if
``nc_window`` > 1, which of the ``nc_window`` values below it were seen, the way IPsec's
anti-replay window works) is the nonce's *counter state*; :func:`advance_nc` is the one
rule that moves it forward or refuses a replayed ``nc``. Where that state lives is the
host's choice (``nc_in_memory``):

* In memory (the default): each :class:`DigestServer` keeps a bounded table pruned of
  expired nonces; a nonce the table has forgotten while still fresh is answered as
  stale, never as new. Each username holds at most ``max_nonces_per_entity`` entries: an
  entity that uses one nonce more forgets its own oldest, so one gateway burning
  thousands of nonces never makes another gateway's nonces stale. Such a table is per
  process: with several processes behind one key, a captured request could be replayed
  once at each other process within the nonce lifetime.
* With the host (``nc_in_memory=False``, what the CPNS Server does): :meth:`DigestServer.verify`
  keeps no state; each :class:`DigestSuccess` names the ``nonce`` and ``nc`` to record and
  how long to keep them (``replay_until``), and the host applies :func:`advance_nc` to
  the nonce's state in a shared database as one compare-and-set. The request counts as
  authenticated only once the host has recorded it; a replayed ``nc`` raises there. Every
  process over that database then refuses a replay that any of them accepted.

Deliberately not done: qop=auth-int, the ``-sess`` algorithms (RFC 7616 leaves the A1
inputs of later requests ambiguous, and the EUKey is already a high-entropy key),
``userhash`` and ``username*`` (refused cleanly), non-ASCII header text, ``nextnonce`` from
the server side (the client honours it). No sockets, clock or RNG: ``now`` and ``rng``
are arguments.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from cpns.crypto.hashing import KEY_LEN, mac, verify_mac
from cpns.errors import AuthenticationFailed, ConfigurationError, ErrorCode, LocalProtocolError
from cpns.types import Random

__all__ = [
    "MAX_CLOCK_SKEW",
    "MAX_HEADER_LEN",
    "NONCE_LABEL",
    "AuthChallenge",
    "DigestAlgorithm",
    "DigestAttempt",
    "DigestClient",
    "DigestServer",
    "DigestStale",
    "DigestSuccess",
    "NcState",
    "advance_nc",
    "compute_response",
    "format_auth_params",
    "format_digest",
    "parse_auth_params",
    "parse_challenges",
    "parse_digest",
]

#: Longest header value we parse; longer values are refused before any parsing.
MAX_HEADER_LEN: Final = 4096
#: MAC label of the stateless nonce (versioned, DESIGN §4).
NONCE_LABEL: Final = "cpns/v1/digest-nonce"
#: Seconds a nonce may appear to come from the future (clock skew between server processes).
MAX_CLOCK_SKEW: Final = 30

_NONCE_RAND_LEN: Final = 8
_MAX_NC: Final = 0xFFFFFFFF
_MAX_NC_WINDOW: Final = 1024
#: Password used for unknown users, so that they cost the same hashing as known ones.
_DUMMY_PASSWORD: Final = "0" * 64

# RFC 9110 §5.6.2 token, §5.6.4 quoted-string (ASCII only: obs-text is refused up front).
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTED_RE: Final = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t \x21-\x7e])*)"')
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)")
# RFC 9110 §11.2 token68, only when it is the whole challenge body.
_TOKEN68_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*(?=[ \t]*(?:,|\Z))")
_PARAM_START_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+[ \t]*=")
_OWS_RE: Final = re.compile(r"[ \t]*")
_SP_RE: Final = re.compile(r" [ \t]*")
_SEP_RE: Final = re.compile(r"[ \t,]*")
_EQUALS_RE: Final = re.compile(r"=")
_COMMA_RE: Final = re.compile(r",")
_PRINTABLE_RE: Final = re.compile(r"[\t\x20-\x7e]*")
# The usual shape of a Digest header (ours, curl's, httpx's): "Digest " then name=value
# pairs separated by ", ", each value a token or a quoted-string without quoted-pairs.
# parse_digest reads such a header with two regular expressions; anything else, and any
# repeated name, takes the general parser (which gives the same answer for this shape).
_SIMPLE_PARAM: Final = (
    r"[!#$%&'*+.^_`|~0-9A-Za-z-]+="
    r'(?:[!#$%&\'*+.^_`|~0-9A-Za-z-]+|"[\t \x21\x23-\x5b\x5d-\x7e]*")'
)
_SIMPLE_DIGEST_RE: Final = re.compile(
    rf"[Dd][Ii][Gg][Ee][Ss][Tt] {_SIMPLE_PARAM}(?:, {_SIMPLE_PARAM})*"
)
_SIMPLE_PARAM_RE: Final = re.compile(
    r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)="
    r'(?:([!#$%&\'*+.^_`|~0-9A-Za-z-]+)|"([\t \x21\x23-\x5b\x5d-\x7e]*)")'
)
_NONCE_RE: Final = re.compile(r"[A-Za-z0-9_-]{64}")
_NC_RE: Final = re.compile(r"[0-9a-fA-F]{8}")
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")

# Which parameters are written as tokens rather than quoted strings (RFC 7616 §3.3-§3.5).
_CHALLENGE_TOKENS: Final = frozenset({"algorithm", "stale"})
_CREDENTIAL_TOKENS: Final = frozenset({"algorithm", "qop", "nc"})
_INFO_TOKENS: Final = frozenset({"qop", "nc"})
# RFC 7616 §3.4: what a qop=auth Authorization must carry (algorithm defaults to MD5).
_REQUIRED: Final = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")


class DigestStale(AuthenticationFailed):
    """The credentials were right but the nonce is stale: answer 401 with ``stale=true``.

    RFC 7616 §3.3: ``stale=true`` tells the client to retry with the new nonce without
    asking for another password. Raised only after the response itself verified.
    """

    error_code = ErrorCode.STALE_TIME


class DigestAlgorithm(StrEnum):
    """The ``algorithm`` values we implement (RFC 7616 §3.2, IANA registry §6.1).

    Lookup by value is case-insensitive: ``DigestAlgorithm("sha-256")`` works.
    """

    #: SHA-256, the RFC 7616 algorithm and our default.
    SHA_256 = "SHA-256"
    #: MD5, RFC 2617; accepted only when configured, for legacy clients.
    MD5 = "MD5"

    @classmethod
    def _missing_(cls, value: object) -> DigestAlgorithm | None:
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.lower():
                    return member
        return None


#: Hex digest length of each algorithm's ``response``.
_HEX_LEN: Final = {DigestAlgorithm.SHA_256: 64, DigestAlgorithm.MD5: 32}


def _hex_hash(algorithm: DigestAlgorithm, text: str) -> str:
    data = text.encode("utf-8")
    if algorithm is DigestAlgorithm.SHA_256:
        return hashlib.sha256(data).hexdigest()
    # RFC 2617 mandates MD5 for legacy peers; the flag lets this run on FIPS builds.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def compute_response(
    *,
    algorithm: DigestAlgorithm,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str,
    cnonce: str,
    qop: str = "auth",
) -> str:
    """The Digest ``response`` for qop=auth (RFC 7616 §3.4.1, RFC 2617 §3.2.2.1).

    ``response = KD(H(A1), nonce ":" nc ":" cnonce ":" qop ":" H(A2))`` with
    ``A1 = username ":" realm ":" password`` and ``A2 = method ":" uri``; ``KD(s, d) =
    H(s ":" d)`` and ``H`` is the lower-case hex digest. ``nc`` is hashed exactly as
    written on the wire (8 hex digits). With ``method=""``, A2 is ``":" uri`` and the
    result is the ``rspauth`` of RFC 7616 §3.5 / RFC 2617 §3.2.3.

    Returns:
        The lower-case hex digest.
    """
    ha1 = _hex_hash(algorithm, f"{username}:{realm}:{password}")
    ha2 = _hex_hash(algorithm, f"{method}:{uri}")
    return _hex_hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# --------------------------------------------------------------------------------------
# Header syntax: RFC 9110 §11 (was RFC 7235 §2.1) auth-param lists.


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """One challenge (or credentials) of an authentication header (RFC 9110 §11.2)."""

    scheme: str
    """The auth-scheme, lower-cased (schemes are case-insensitive)."""
    params: Mapping[str, str]
    """auth-params, names lower-cased, quoted-string values unescaped."""
    token68: str | None = None
    """The token68 form (e.g. Basic credentials), if that is what followed the scheme."""


def _cut(value: object) -> str:
    """A peer-supplied value quoted in a failure reason, at most about 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _malformed(what: str) -> AuthenticationFailed:
    return AuthenticationFailed("malformed authentication header: " + what)


class _Scanner:
    """A cursor over one header value; every failure is an AuthenticationFailed."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        if len(text) > MAX_HEADER_LEN:
            raise _malformed(f"longer than {MAX_HEADER_LEN} characters")
        if not _PRINTABLE_RE.fullmatch(text):
            raise _malformed("control or non-ASCII character")
        # RFC 9110 §5.5: a field value has no leading or trailing whitespace.
        self.text = text.strip(" \t")
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def take(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        found = pattern.match(self.text, self.pos)
        if found is not None:
            self.pos = found.end()
        return found

    def expect(self, pattern: re.Pattern[str], what: str) -> str:
        found = self.take(pattern)
        if found is None:
            raise _malformed(f"expected {what} at offset {self.pos}")
        return found.group()

    def value(self) -> str:
        """A token or a quoted-string (RFC 9110 §11.2 auth-param value)."""
        if self.peek() == '"':
            found = self.take(_QUOTED_RE)
            if found is None:
                raise _malformed(f"bad quoted-string at offset {self.pos}")
            return _QUOTED_PAIR_RE.sub(r"\1", found.group(1))
        return self.expect(_TOKEN_RE, "token or quoted-string")

    def params(self, *, stop_at_challenge: bool) -> tuple[dict[str, str], bool]:
        """Parse ``#auth-param``; return the params and whether a new challenge follows.

        With ``stop_at_challenge``, an element that is not ``token "="`` ends the list
        (it is the next challenge's scheme, RFC 9110 §11.6.1); its comma is consumed.
        """
        params: dict[str, str] = {}
        while True:
            name = self.expect(_TOKEN_RE, "parameter name").lower()
            self.take(_OWS_RE)
            self.expect(_EQUALS_RE, '"="')
            self.take(_OWS_RE)
            value = self.value()
            # RFC 9110 §11.2: each parameter name MUST only occur once per challenge.
            if name in params:
                raise _malformed(f"duplicate parameter {_cut(name)}")
            params[name] = value
            self.take(_OWS_RE)
            if self.at_end():
                return params, False
            self.expect(_COMMA_RE, '","')
            self.take(_SEP_RE)  # RFC 9110 §5.6.1: empty list elements are allowed
            if self.at_end():
                return params, False
            if stop_at_challenge and not _PARAM_START_RE.match(self.text, self.pos):
                return params, True


def parse_challenges(header: str) -> list[AuthChallenge]:
    """Parse a ``WWW-Authenticate``-style value: one or more challenges (RFC 9110 §11.6.1).

    Params: header: one header field value (which may itself hold several challenges).
    Returns: the challenges in order.
    Raises: AuthenticationFailed: the value is malformed, empty, too long, or not ASCII.
    """
    scanner = _Scanner(header)
    challenges: list[AuthChallenge] = []
    scanner.take(_SEP_RE)
    while not scanner.at_end():
        scheme = scanner.expect(_TOKEN_RE, "auth-scheme").lower()
        params: dict[str, str] = {}
        token68: str | None = None
        separated = False
        if scanner.take(_SP_RE) is not None:
            found = scanner.take(_TOKEN68_RE)
            if found is not None:
                token68 = found.group()
            elif scanner.peek() != ",":
                params, separated = scanner.params(stop_at_challenge=True)
        challenges.append(AuthChallenge(scheme, params, token68))
        if not separated:
            scanner.take(_OWS_RE)
            if scanner.at_end():
                break
            scanner.expect(_COMMA_RE, '","')
            scanner.take(_SEP_RE)
    if not challenges:
        raise _malformed("no challenge")
    return challenges


def parse_digest(header: str) -> dict[str, str]:
    """Parse one ``Digest`` challenge or credentials (RFC 7616 §3.3, §3.4).

    Params: header: an ``Authorization`` value, or one ``WWW-Authenticate`` value holding
    a single Digest challenge.
    Returns: the parameters, names lower-cased, values unescaped.
    Raises: AuthenticationFailed: malformed, not exactly one challenge, or not Digest.
    """
    if len(header) <= MAX_HEADER_LEN and _SIMPLE_DIGEST_RE.fullmatch(header) is not None:
        simple: dict[str, str] = {}
        for name, token, quoted in _SIMPLE_PARAM_RE.findall(header, len("Digest ")):
            if name.lower() in simple:
                break  # the general parser refuses it, with its reason
            simple[name.lower()] = token or quoted
        else:
            return simple
    challenges = parse_challenges(header)
    if len(challenges) != 1:
        raise _malformed("more than one challenge or credentials")
    (only,) = challenges
    if only.scheme != "digest" or only.token68 is not None:
        raise _malformed(f"scheme {_cut(only.scheme)} is not Digest with auth-params")
    return dict(only.params)


def parse_auth_params(header: str) -> dict[str, str]:
    """Parse a bare ``#auth-param`` list, as in ``Authentication-Info`` (RFC 7615 §3).

    Raises: AuthenticationFailed: the value is malformed.
    """
    scanner = _Scanner(header)
    scanner.take(_SEP_RE)
    if scanner.at_end():
        return {}
    params, _ = scanner.params(stop_at_challenge=False)
    return params


def _quote(value: str) -> str:
    if not _PRINTABLE_RE.fullmatch(value):
        raise LocalProtocolError("header values must be printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_auth_params(params: Mapping[str, str], *, tokens: Collection[str] = ()) -> str:
    """Write ``name=value, ...``; the inverse of :func:`parse_auth_params`.

    Params: params: names and values, in the order to write them. tokens: names whose
    value is written as a bare token when it is one (RFC 7616 wants e.g. ``algorithm``,
    ``nc`` and ``qop`` unquoted); every other value is a quoted-string.
    Raises: LocalProtocolError: a name is not a token, names repeat, or a value is not
    printable ASCII.
    """
    seen: set[str] = set()
    parts: list[str] = []
    for name, value in params.items():
        if not _TOKEN_RE.fullmatch(name) or name.lower() in seen:
            raise LocalProtocolError(f"bad or repeated parameter name {name!r}")
        seen.add(name.lower())
        if name.lower() in tokens and _TOKEN_RE.fullmatch(value):
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}={_quote(value)}")
    return ", ".join(parts)


def format_digest(params: Mapping[str, str], *, tokens: Collection[str] = ()) -> str:
    """Write ``Digest name=value, ...``; the inverse of :func:`parse_digest`.

    Raises: LocalProtocolError: as :func:`format_auth_params`.
    """
    body = format_auth_params(params, tokens=tokens)
    return f"Digest {body}" if body else "Digest"


# --------------------------------------------------------------------------------------
# Server side.


def _check_now(now: int) -> None:
    if not 0 <= now < 2**64:
        raise LocalProtocolError("now must be non-negative seconds")


def _is_quotable(value: str) -> bool:
    return bool(_PRINTABLE_RE.fullmatch(value))


#: A nonce's counter state: (highest ``nc`` accepted, bitmap of the window below it).
type NcState = tuple[int, int]


def advance_nc(state: NcState | None, *, nc: int, window: int) -> NcState:
    """The counter state of a nonce after accepting ``nc`` (RFC 7616 §5.4 replay rule).

    ``state`` is None for a nonce never used. Bit ``i`` of the bitmap says ``highest - i``
    was seen; an ``nc`` above the highest moves the window up, one inside the window that
    was not seen yet is accepted once, anything else is a replay.

    Params: state: the current state or None. nc: the request's count (>= 1). window:
    ``nc_window`` (1 means nc must strictly increase).
    Returns: the new state, to be stored in place of ``state``.
    Raises: AuthenticationFailed: ``nc`` was already seen, or fell out of the window.
    """
    if state is None:
        return nc, 1
    highest, bitmap = state
    if nc > highest:
        shift = nc - highest
        # Never shift by a huge nc: that would build a huge integer.
        full = (1 << window) - 1
        return nc, (((bitmap << shift) | 1) & full if shift < window else 1)
    offset = highest - nc
    if offset >= window or (bitmap >> offset) & 1:
        raise AuthenticationFailed(f"replayed nc {nc:08x} for this nonce")
    return highest, bitmap | (1 << offset)


class _NonceCounters:
    """Per-nonce ``nc`` replay table (RFC 7616 §5.4), bounded in total and per entity.

    Not thread-safe, like every core object: the CPNS Server calls it from its one event
    loop thread; a threaded host serialises calls to :meth:`DigestServer.verify` itself.

    Entry per nonce: ``(issued, highest nc, bitmap, owner)`` where bit ``i`` of the bitmap
    says ``highest - i`` was seen and ``owner`` is the username that first used the nonce.
    Each owner holds at most ``share`` nonces: when one more arrives, that owner's oldest
    is forgotten and the owner's own floor rises, so one entity burning nonces only ever
    makes *its own* older nonces stale. A nonce forgotten because the whole table is full
    (``capacity`` nonces, which takes ``capacity / share`` busy entities) raises the
    global ``floor``. An unknown nonce issued at or before a floor that applies may have
    been used already, so it is answered as stale rather than trusted as new.
    """

    def __init__(self, *, window: int, capacity: int, share: int) -> None:
        self._window = window
        self._capacity = capacity
        self._share = min(share, capacity)
        self._seen: dict[str, tuple[int, int, int, str]] = {}
        self._owned: dict[str, dict[str, int]] = {}  # owner -> {nonce: issued}
        self._owner_floor: dict[str, int] = {}
        self._floor = -1
        self._last_prune = 0

    def advance(
        self, nonce: str, *, issued: int, nc: int, now: int, lifetime: int, owner: str = ""
    ) -> None:
        known = nonce in self._seen
        if now - self._last_prune >= lifetime or (not known and len(self._seen) >= self._capacity):
            self._prune(now, lifetime)
        entry = self._seen.get(nonce)
        if entry is None:
            if issued <= self._floor or issued <= self._owner_floor.get(owner, -1):
                raise DigestStale("nonce no longer tracked by the replay table")
            owned = self._owned.setdefault(owner, {})
            if len(owned) >= self._share:
                self._forget_oldest_of(owner, owned)
            self._seen[nonce] = (issued, nc, 1, owner)
            owned[nonce] = issued
            return
        _, highest, bitmap, first = entry
        highest, bitmap = advance_nc((highest, bitmap), nc=nc, window=self._window)
        self._seen[nonce] = (issued, highest, bitmap, first)

    def _forget_oldest_of(self, owner: str, owned: dict[str, int]) -> None:
        oldest = min(owned, key=owned.__getitem__)
        issued = owned.pop(oldest)
        self._seen.pop(oldest, None)
        self._owner_floor[owner] = max(self._owner_floor.get(owner, -1), issued)

    def _prune(self, now: int, lifetime: int) -> None:
        self._last_prune = now
        kept: dict[str, tuple[int, int, int, str]] = {}
        for nonce, entry in self._seen.items():
            if now - entry[0] < lifetime:
                kept[nonce] = entry
            else:
                self._floor = max(self._floor, entry[0])
        if len(kept) >= self._capacity:
            ordered = sorted(kept.items(), key=lambda item: item[1][0])
            cut = max(1, len(ordered) // 2)
            self._floor = max(self._floor, ordered[cut - 1][1][0])
            kept = dict(ordered[cut:])
        self._seen = kept
        owned: dict[str, dict[str, int]] = {}
        for nonce, (issued, _, _, owner) in kept.items():
            owned.setdefault(owner, {})[nonce] = issued
        self._owned = owned
        # A floor older than the lifetime protects nothing: such nonces are stale by age.
        self._owner_floor = {o: f for o, f in self._owner_floor.items() if now - f < lifetime}


@dataclass(frozen=True, slots=True, kw_only=True)
class DigestSuccess:
    """A verified Digest request (RFC 7616 §3.4), and the proof to send back (§3.5)."""

    username: str
    """The authenticated username: the entity's Entity ID."""
    algorithm: DigestAlgorithm
    """The algorithm the client used."""
    authentication_info: str
    """Value of the ``Authentication-Info`` response header: qop, rspauth, cnonce, nc."""
    nonce: str
    """The nonce the client used (the key of its counter state, see :func:`advance_nc`)."""
    nc: int
    """The request's ``nc``: with ``nc_in_memory=False``, the host records it."""
    replay_until: int
    """Until when (seconds) the nonce's counter state must be kept: after that the nonce
    is stale by age on every process (lifetime plus the clock skew allowed)."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class DigestAttempt:
    """An ``Authorization`` header that passed every check made before the user lookup
    (syntax, realm, algorithm, uri, the nonce's MAC): see :meth:`DigestServer.check`."""

    username: str
    """The username to look up (the Entity ID the client claims)."""
    _params: Mapping[str, str] = field(repr=False)
    _algorithm: DigestAlgorithm = field(repr=False)
    _method: str = field(repr=False)
    _uri: str = field(repr=False)
    _issued: int = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class DigestServer:
    """The Digest verifier of the CPNS Server (004 §5.x.2, RFC 7616 §3.3-§3.5).

    The configuration is frozen; the only state is the in-memory ``nc`` replay table
    (none with ``nc_in_memory=False``), which is not thread-safe (a threaded host
    serialises :meth:`verify`). Several processes sharing ``nonce_key`` (and ``realm``)
    accept each other's nonces, and with ``nc_in_memory=False`` and one shared record of
    counter states they refuse each other's replays too.

    Raises: ConfigurationError: on construction, for an invalid field.
    """

    realm: str
    """The protection space (RFC 7616 §3.3 ``realm``); printable ASCII."""
    nonce_key: bytes = field(repr=False)
    """32-byte secret keying the nonce MAC; shared by all processes of one deployment."""
    algorithms: tuple[DigestAlgorithm, ...] = (DigestAlgorithm.SHA_256,)
    """Accepted algorithms in order of preference; one challenge each, in this order."""
    nonce_lifetime: int = 300
    """Seconds a nonce stays fresh; afterwards it is answered as stale."""
    opaque: str | None = None
    """Optional ``opaque`` sent in challenges; if set, clients must echo it exactly."""
    nc_window: int = 1
    """How many ``nc`` values below the highest one are still accepted once each.

    1 means ``nc`` must strictly increase. A client that sends concurrent requests with
    one nonce over several connections may need a larger window (at most 1024)."""
    max_tracked_nonces: int = 10_000
    """Bound on the replay table (nonces currently in use)."""
    max_nonces_per_entity: int = 64
    """Share of the replay table one username may hold: when it uses one more nonce, its
    own oldest is forgotten (and answered as stale), never another entity's. Forgetting
    works by issue second, so an entity starting more than this many nonces within one
    second also sees that second's other new nonces answered as stale (it retries on the
    next challenge)."""
    nc_in_memory: bool = True
    """Keep the ``nc`` replay table in this object (one process). False: keep nothing;
    the host records each success's (``nonce``, ``nc``) with :func:`advance_nc` in state
    shared by all its processes, and treats a replay found there as a failure."""
    _counters: _NonceCounters = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.realm or not _is_quotable(self.realm):
            raise ConfigurationError("realm must be non-empty printable ASCII")
        if not isinstance(self.nonce_key, bytes) or len(self.nonce_key) != KEY_LEN:
            raise ConfigurationError(f"nonce_key must be {KEY_LEN} bytes")
        try:
            algorithms = tuple(DigestAlgorithm(a) for a in self.algorithms)
        except ValueError as exc:
            raise ConfigurationError(f"unsupported Digest algorithm: {exc}") from None
        if not algorithms or len(set(algorithms)) != len(algorithms):
            raise ConfigurationError("algorithms must be non-empty and without repeats")
        if not 0 < self.nonce_lifetime <= 86_400:
            raise ConfigurationError("nonce_lifetime must be 1..86400 seconds")
        if self.opaque is not None and not _is_quotable(self.opaque):
            raise ConfigurationError("opaque must be printable ASCII")
        if not 1 <= self.nc_window <= _MAX_NC_WINDOW:
            raise ConfigurationError(f"nc_window must be 1..{_MAX_NC_WINDOW}")
        if self.max_tracked_nonces < 1:
            raise ConfigurationError("max_tracked_nonces must be positive")
        if self.max_nonces_per_entity < 1:
            raise ConfigurationError("max_nonces_per_entity must be positive")
        object.__setattr__(self, "algorithms", algorithms)
        counters = _NonceCounters(
            window=self.nc_window,
            capacity=self.max_tracked_nonces,
            share=self.max_nonces_per_entity,
        )
        object.__setattr__(self, "_counters", counters)

    def _mint_nonce(self, now: int, rng: Random) -> str:
        rand = rng.token_bytes(_NONCE_RAND_LEN)
        if len(rand) != _NONCE_RAND_LEN:
            raise LocalProtocolError("rng returned the wrong number of bytes")
        tag = mac(self.nonce_key, NONCE_LABEL, self.realm, now, rand)
        return base64.urlsafe_b64encode(now.to_bytes(8, "big") + rand + tag).decode("ascii")

    def _open_nonce(self, nonce: str) -> int:
        """Check a nonce's MAC and return its issue time."""
        # 48 bytes encode to exactly 64 characters with no padding and no spare bits, so
        # each nonce has one spelling and the replay table cannot be sidestepped.
        if not _NONCE_RE.fullmatch(nonce):
            raise AuthenticationFailed("nonce is not one of ours")
        raw = base64.urlsafe_b64decode(nonce)
        issued = int.from_bytes(raw[:8], "big")
        verify_mac(self.nonce_key, raw[16:], NONCE_LABEL, self.realm, issued, raw[8:16])
        return issued

    def challenge(self, *, now: int, rng: Random, stale: bool = False) -> list[str]:
        """The ``WWW-Authenticate`` values of a 401: one per algorithm, in order.

        All challenges share one fresh nonce (RFC 7616 §3.7 example). With ``stale``,
        each carries ``stale=true`` (send it after :class:`DigestStale`).

        Params: now: current time, seconds. rng: source of the nonce's 8 random bytes.
        Returns: header values, in the order to send them.
        """
        _check_now(now)
        nonce = self._mint_nonce(now, rng)
        values: list[str] = []
        for algorithm in self.algorithms:
            params = {
                "realm": self.realm,
                "qop": "auth",
                "algorithm": algorithm.value,
                "nonce": nonce,
            }
            if self.opaque is not None:
                params["opaque"] = self.opaque
            if stale:
                params["stale"] = "true"
            values.append(format_digest(params, tokens=_CHALLENGE_TOKENS))
        return values

    def _algorithm(self, value: str | None) -> DigestAlgorithm:
        # RFC 7616 §3.4: "If this is not present, it is assumed to be MD5."
        try:
            algorithm = DigestAlgorithm("MD5" if value is None else value)
        except ValueError:
            raise AuthenticationFailed(f"unknown algorithm {_cut(value)}") from None
        if algorithm not in self.algorithms:
            raise AuthenticationFailed(f"algorithm {algorithm} is not enabled")
        return algorithm

    def verify(
        self,
        *,
        method: str,
        uri: str,
        authorization: str,
        lookup: Callable[[str], str | None],
        now: int,
    ) -> DigestSuccess:
        """Verify an ``Authorization`` header (RFC 7616 §3.4) and build the rspauth (§3.5).

        The same as :meth:`check`, then ``lookup(attempt.username)``, then :meth:`finish`;
        a host whose lookup must not block calls those three itself.

        Params: method: the request method, as on the request line. uri: the
        request-target exactly as on the request line (RFC 7616 §3.4.6 requires the
        header's ``uri`` to match it). authorization: the header value. lookup: maps a
        username to its password (hex EUKey), or None if unknown. now: seconds.

        Returns: the authenticated username and the ``Authentication-Info`` value.

        Raises:
            DigestStale: the response is right but the nonce has expired (or was
                forgotten by the replay table): answer 401 with ``challenge(stale=True)``.
            AuthenticationFailed: anything else; the reason is for logs only. An
                unknown user and a wrong response raise the same class and code.

        State: on success the nonce's ``nc`` is recorded (``nc_in_memory``); nothing
        changes on failure.
        """
        attempt = self.check(method=method, uri=uri, authorization=authorization, now=now)
        return self.finish(attempt, password=lookup(attempt.username), now=now)

    def check(self, *, method: str, uri: str, authorization: str, now: int) -> DigestAttempt:
        """Everything :meth:`verify` checks before it looks the user up.

        Params: as :meth:`verify`.
        Returns: the attempt, whose ``username`` the host looks up.
        Raises: AuthenticationFailed: malformed, wrong realm, algorithm, qop, nc, uri or
        opaque, or a nonce that is not ours (forged nonces stop here, before any lookup).
        """
        _check_now(now)
        params = parse_digest(authorization)
        # RFC 7616 §3.4.4 username hashing and RFC 8187 username* are not offered.
        if params.get("userhash", "false").lower() != "false" or "username*" in params:
            raise AuthenticationFailed("userhash / username* are not supported")
        missing = [name for name in _REQUIRED if name not in params]
        if missing:
            raise AuthenticationFailed("missing Digest parameters: " + ", ".join(missing))
        nc, cnonce, response = params["nc"], params["cnonce"], params["response"]
        if params["realm"] != self.realm:
            raise AuthenticationFailed("realm mismatch")
        algorithm = self._algorithm(params.get("algorithm"))
        if params["qop"] != "auth":
            raise AuthenticationFailed("only qop=auth is supported")
        # RFC 7616 §3.4: nc is 8 hex digits counting requests from 1.
        if not _NC_RE.fullmatch(nc) or int(nc, 16) == 0:
            raise AuthenticationFailed("bad nc")
        if not cnonce:
            raise AuthenticationFailed("empty cnonce")
        if params["uri"] != uri:
            raise AuthenticationFailed("uri does not match the request-target")
        if params.get("opaque") != self.opaque:
            raise AuthenticationFailed("opaque mismatch")
        if len(response) != _HEX_LEN[algorithm] or not _HEX_RE.fullmatch(response):
            raise AuthenticationFailed("response is not a digest of the right length")
        issued = self._open_nonce(params["nonce"])
        return DigestAttempt(
            username=params["username"],
            _params=params,
            _algorithm=algorithm,
            _method=method,
            _uri=uri,
            _issued=issued,
        )

    def finish(self, attempt: DigestAttempt, *, password: str | None, now: int) -> DigestSuccess:
        """Judge an attempt of :meth:`check` with the looked-up password (None: unknown).

        Raises: as :meth:`verify`.
        """
        _check_now(now)
        params, algorithm, uri = attempt._params, attempt._algorithm, attempt._uri
        username, nonce, nc, cnonce = (params[n] for n in ("username", "nonce", "nc", "cnonce"))
        issued = attempt._issued

        def digest(secret: str, request_method: str) -> str:
            return compute_response(
                algorithm=algorithm,
                username=username,
                realm=self.realm,
                password=secret,
                method=request_method,
                uri=uri,
                nonce=nonce,
                nc=nc,
                cnonce=cnonce,
            )

        expected = digest(_DUMMY_PASSWORD if password is None else password, attempt._method)
        matched = hmac.compare_digest(expected, params["response"].lower())
        if password is None:
            raise AuthenticationFailed("unknown username")
        if not matched:
            raise AuthenticationFailed("wrong Digest response")

        # Freshness and replay are judged only for correct responses, so a peer without
        # the key can neither learn staleness nor push a nonce's counter forward.
        age = now - issued
        if age >= self.nonce_lifetime or age < -MAX_CLOCK_SKEW:
            raise DigestStale(f"nonce issued {age}s ago")
        if self.nc_in_memory:
            self._counters.advance(
                nonce,
                issued=issued,
                nc=int(nc, 16),
                now=now,
                lifetime=self.nonce_lifetime,
                owner=username,
            )

        rspauth = digest(password, "")  # RFC 7616 §3.5: A2 = ":" request-uri
        info = {"qop": "auth", "rspauth": rspauth, "cnonce": cnonce, "nc": nc}
        return DigestSuccess(
            username=username,
            algorithm=algorithm,
            authentication_info=format_auth_params(info, tokens=_INFO_TOKENS),
            nonce=nonce,
            nc=int(nc, 16),
            replay_until=issued + self.nonce_lifetime + MAX_CLOCK_SKEW,
        )


# --------------------------------------------------------------------------------------
# Client side.


@dataclass(frozen=True, slots=True)
class _Session:
    realm: str
    nonce: str
    algorithm: DigestAlgorithm
    opaque: str | None
    nc: int


@dataclass(frozen=True, slots=True)
class _Expected:
    rspauth: str
    cnonce: str
    nc: str


class DigestClient:
    """The Digest client of a PN GW or PNE (004 §5.x.2, RFC 7616 §3.4-§3.5).

    Keeps the current nonce and its ``nc`` so that requests on a keep-alive connection
    reuse the nonce; call :meth:`authorization` with the 401's challenges when the server
    asks again (e.g. ``stale=true``), and with ``challenges=None`` otherwise. Not
    thread-safe: one instance per sequential request stream.

    Params: username: the Entity ID. password: the EUKey as 64 lower-case hex digits.
    algorithms: algorithms we accept from the server (default SHA-256 only; add MD5
    only to talk to a legacy server).
    Raises: LocalProtocolError: username not printable ASCII, or no algorithm.
    """

    def __init__(
        self,
        username: str,
        password: str,
        *,
        algorithms: Sequence[DigestAlgorithm] = (DigestAlgorithm.SHA_256,),
    ) -> None:
        if not _is_quotable(username):
            raise LocalProtocolError("username must be printable ASCII")
        if not algorithms:
            raise LocalProtocolError("at least one algorithm")
        self._username = username
        self._password = password
        self._algorithms = tuple(DigestAlgorithm(a) for a in algorithms)
        self._session: _Session | None = None
        self._expected: _Expected | None = None

    def __repr__(self) -> str:
        return f"DigestClient(username={self._username!r})"

    def _choose(self, challenges: Sequence[str]) -> _Session:
        """The first usable Digest challenge, in the server's order (RFC 7616 §3.7)."""
        for header in challenges:
            try:
                parsed = parse_challenges(header)
            except AuthenticationFailed:
                continue  # another scheme's odd syntax must not hide a good challenge
            for challenge in parsed:
                params = challenge.params
                realm, nonce = params.get("realm"), params.get("nonce")
                if challenge.scheme != "digest" or realm is None or not nonce:
                    continue
                try:
                    algorithm = DigestAlgorithm(params.get("algorithm", "MD5"))
                except ValueError:
                    continue
                qops = {q.strip(" \t") for q in params.get("qop", "").split(",")}
                if algorithm not in self._algorithms or "auth" not in qops:
                    continue
                session = _Session(realm, nonce, algorithm, params.get("opaque"), 0)
                if self._session is not None and replace(self._session, nc=0) == session:
                    return self._session  # same nonce again: keep counting
                return session
        raise AuthenticationFailed("no Digest challenge with qop=auth and an accepted algorithm")

    def authorization(
        self,
        *,
        challenges: Sequence[str] | None = None,
        method: str,
        uri: str,
        rng: Random,
    ) -> str:
        """Build the ``Authorization`` value for one request (RFC 7616 §3.4).

        Params: challenges: the 401's ``WWW-Authenticate`` values, or None to reuse the
        current nonce with the next ``nc``. method, uri: the request line's method and
        request-target. rng: source of the 16-byte cnonce.

        Returns: the header value.
        Raises:
            AuthenticationFailed: no challenge is usable.
            LocalProtocolError: ``challenges=None`` before any challenge, the nonce's
                count is exhausted, or ``uri`` is not printable ASCII.

        State: adopts the chosen nonce, advances ``nc`` and remembers the expected rspauth.
        """
        session = self._choose(challenges) if challenges is not None else self._session
        if session is None:
            raise LocalProtocolError("no Digest challenge received yet")
        if session.nc >= _MAX_NC:  # pragma: no cover - needs 2**32 requests on one nonce
            raise LocalProtocolError("nonce count exhausted; a fresh challenge is needed")
        session = replace(session, nc=session.nc + 1)
        nc = f"{session.nc:08x}"
        cnonce = rng.token_bytes(16).hex()

        def digest(request_method: str) -> str:
            return compute_response(
                algorithm=session.algorithm,
                username=self._username,
                realm=session.realm,
                password=self._password,
                method=request_method,
                uri=uri,
                nonce=session.nonce,
                nc=nc,
                cnonce=cnonce,
            )

        response = digest(method)
        params = {
            "username": self._username,
            "realm": session.realm,
            "uri": uri,
            "algorithm": session.algorithm.value,
            "nonce": session.nonce,
            "nc": nc,
            "cnonce": cnonce,
            "qop": "auth",
            "response": response,
        }
        if session.opaque is not None:
            params["opaque"] = session.opaque
        header = format_digest(params, tokens=_CREDENTIAL_TOKENS)
        self._session = session
        self._expected = _Expected(digest(""), cnonce, nc)  # RFC 7616 §3.5 A2 = ":" uri
        return header

    def verify_response(self, authentication_info: str) -> None:
        """Check the server's ``rspauth`` for the last request (RFC 7616 §3.5).

        This is the server authentication of 004 §5.x.2. A ``nextnonce``, once rspauth
        verified, becomes the nonce of the next request.

        Raises:
            AuthenticationFailed: malformed header, rspauth missing or wrong, or qop,
                cnonce or nc not those of the last request.
            LocalProtocolError: no request was authorised yet.
        """
        expected = self._expected
        if expected is None:
            raise LocalProtocolError("no Authorization was sent yet")
        params = parse_auth_params(authentication_info)
        rspauth = params.get("rspauth")
        if rspauth is None:
            raise AuthenticationFailed("Authentication-Info without rspauth")
        for name, want in (("qop", "auth"), ("cnonce", expected.cnonce), ("nc", expected.nc)):
            if params.get(name, want) != want:
                raise AuthenticationFailed(f"Authentication-Info {name} does not match")
        if not hmac.compare_digest(rspauth.lower(), expected.rspauth):
            raise AuthenticationFailed("wrong rspauth: the server does not hold the key")
        nextnonce = params.get("nextnonce")
        if nextnonce:
            assert self._session is not None  # set together with self._expected
            self._session = replace(self._session, nonce=nextnonce, nc=0)
