"""rand/hash PNE authentication and the LocalEUKey (002 §7.5.4), shared by "7.5.5".

Theory of operation
-------------------
002 §7.5.4 lets a PNE and the CPNS Server authenticate each other through the PN GW with
one random value each and two hashes keyed by the PNE's EUKey ``K``:

* the PNE draws ``rand_PNE`` (SETUP Request / SETUP Response, 002 §7.5.4.1);
* the server draws one ``rand_server`` per establishment (002 §7.5.4.3);
* the PNE computes the session key ``SK`` from rand_PNE, rand_server and ``K``, then
  ``hash_PNE`` from rand_PNE, rand_server, ``K`` and ``SK``, and sends hash_PNE;
* the server recomputes ``SK``, checks hash_PNE, computes ``hash_server`` from rand_PNE,
  rand_server, ``K``, ``SK`` and hash_PNE, and sends it; the PNE checks it.

Instantiation (docs/crypto.md, docs/wire.md section 8.10), with the context
``ctx = (pn_id, gw_id, server_id, pne_id)`` in every derivation, so that one rand_server
shared by every PNE of an establishment still gives each PNE its own values:

* ``SK = HKDF(K, salt = rand_PNE || rand_server, label, ctx)``
* ``hash_PNE = MAC(K, label, ctx..., rand_PNE, rand_server, SK)``
* ``hash_server = MAC(K, label, ctx..., rand_PNE, rand_server, SK, hash_PNE)``

The same exchange with the LocalEUKey as ``K`` and the PN GW in the server's part is the
"7.5.5" the seed cites (:mod:`cpns.protocol.local_auth`): the labels differ
(:data:`LOCAL`), and the context's server slot holds the role string ``"pngw"``.

LocalEUKey: when a PNE asks for one, the server draws a distinct 32-byte LocalEUKey for it
and seals two copies, one under the PNE's EUKey and one under the PN GW's EUKey
(:func:`seal_local_eukey`); each holder opens its own (:func:`open_local_eukey`).

Pure functions; every verification raises one opaque :class:`AuthenticationFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cpns.crypto.hashing import KEY_LEN, Part, mac, verify_mac
from cpns.crypto.kdf import derive_key
from cpns.crypto.keywrap import open_sealed, seal
from cpns.errors import AuthenticationFailed, LocalProtocolError

__all__ = [
    "ESTABLISHMENT",
    "LOCAL",
    "LOCAL_EUKEY_PURPOSE",
    "LOCAL_SERVER_ROLE",
    "AuthContext",
    "AuthLabels",
    "PNEProof",
    "RandHashResponder",
    "ServerVerdict",
    "hash_pne",
    "hash_server",
    "open_local_eukey",
    "prove",
    "seal_local_eukey",
    "session_key",
    "verify_proof",
    "verify_server",
]


@dataclass(frozen=True, slots=True)
class AuthLabels:
    """The three labels of one use of the rand/hash exchange."""

    #: HKDF label of SK.
    session_key: str
    #: MAC label of hash_PNE.
    hash_pne: str
    #: MAC label of hash_server (the verifier's hash).
    hash_server: str


#: PN Establishment (002 §7.5.4): the PNE and the CPNS Server, K = the PNE's EUKey.
ESTABLISHMENT: Final = AuthLabels(
    session_key="cpns/v1/pne-session-key",
    hash_pne="cpns/v1/hash-pne",
    hash_server="cpns/v1/hash-server",
)
#: LocalEUKey authentication ("7.5.5"): the PNE and the PN GW, K = the LocalEUKey.
LOCAL: Final = AuthLabels(
    session_key="cpns/v1/local-session-key",
    hash_pne="cpns/v1/local-hash-pne",
    hash_server="cpns/v1/local-hash-gw",
)
#: What stands in the context's server slot when the PN GW plays the server's part.
LOCAL_SERVER_ROLE: Final = "pngw"
#: Seal purpose of a LocalEUKey copy.
LOCAL_EUKEY_PURPOSE: Final = "local-eukey"


@dataclass(frozen=True, slots=True)
class AuthContext:
    """Who takes part: bound into SK, hash_PNE and hash_server (in this order)."""

    #: PN ID.
    pn_id: str
    #: The PN GW's Entity ID.
    gw_id: str
    #: The CPNS Server's Entity ID, or :data:`LOCAL_SERVER_ROLE` for "7.5.5".
    server_id: str
    #: The PNE's Entity ID.
    pne_id: str

    def parts(self) -> tuple[Part, ...]:
        """``(pn_id, gw_id, server_id, pne_id)``."""
        return (self.pn_id, self.gw_id, self.server_id, self.pne_id)

    @classmethod
    def local(cls, *, pn_id: str, gw_id: str, pne_id: str) -> AuthContext:
        """The context of a LocalEUKey authentication (the PN GW in the server's part)."""
        return cls(pn_id=pn_id, gw_id=gw_id, server_id=LOCAL_SERVER_ROLE, pne_id=pne_id)


def _check_inputs(key: bytes, rand_pne: bytes, rand_server: bytes) -> None:
    if len(key) != KEY_LEN:
        raise LocalProtocolError("the authentication key is 32 bytes")
    if len(rand_pne) != 32 or len(rand_server) != 32:
        raise LocalProtocolError("rand_PNE and rand_server are 32 bytes")


def session_key(
    key: bytes, *, ctx: AuthContext, rand_pne: bytes, rand_server: bytes, labels: AuthLabels
) -> bytes:
    """SK from rand_PNE, rand_server and K (002 §7.5.4.1): HKDF, 32 bytes."""
    _check_inputs(key, rand_pne, rand_server)
    return derive_key(
        key, salt=rand_pne + rand_server, label=labels.session_key, context=ctx.parts()
    )


def hash_pne(
    key: bytes,
    *,
    ctx: AuthContext,
    rand_pne: bytes,
    rand_server: bytes,
    sk: bytes,
    labels: AuthLabels,
) -> bytes:
    """hash_PNE from rand_PNE, rand_server, K and SK (002 §7.5.4.1)."""
    return mac(key, labels.hash_pne, *ctx.parts(), rand_pne, rand_server, sk)


def hash_server(
    key: bytes,
    *,
    ctx: AuthContext,
    rand_pne: bytes,
    rand_server: bytes,
    sk: bytes,
    hash_pne_value: bytes,
    labels: AuthLabels,
) -> bytes:
    """hash_server from rand_PNE, rand_server, K, SK and hash_PNE (002 §7.5.4.3)."""
    return mac(key, labels.hash_server, *ctx.parts(), rand_pne, rand_server, sk, hash_pne_value)


@dataclass(frozen=True, slots=True)
class PNEProof:
    """What the PNE computes on an AUTHENTICATE Request."""

    #: hash_PNE, sent in the AUTHENTICATE Response.
    hash_pne: bytes
    #: The session key, kept until hash_server verifies.
    sk: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServerVerdict:
    """What the verifier (server, or the PN GW for "7.5.5") computes on a valid hash_PNE."""

    #: The session key shared with the PNE.
    sk: bytes = field(repr=False)
    #: hash_server, sent back to the PNE.
    hash_server: bytes


def prove(
    key: bytes, *, ctx: AuthContext, rand_pne: bytes, rand_server: bytes, labels: AuthLabels
) -> PNEProof:
    """The PNE's side (002 §7.5.4.1): SK, then hash_PNE."""
    sk = session_key(key, ctx=ctx, rand_pne=rand_pne, rand_server=rand_server, labels=labels)
    tag = hash_pne(key, ctx=ctx, rand_pne=rand_pne, rand_server=rand_server, sk=sk, labels=labels)
    return PNEProof(hash_pne=tag, sk=sk)


def verify_proof(
    key: bytes,
    *,
    ctx: AuthContext,
    rand_pne: bytes,
    rand_server: bytes,
    hash_pne_value: bytes,
    labels: AuthLabels,
) -> ServerVerdict:
    """The verifier's side (002 §7.5.4.3): recompute SK, check hash_PNE in constant time,
    compute hash_server. Raises one opaque :class:`AuthenticationFailed`."""
    sk = session_key(key, ctx=ctx, rand_pne=rand_pne, rand_server=rand_server, labels=labels)
    verify_mac(key, hash_pne_value, labels.hash_pne, *ctx.parts(), rand_pne, rand_server, sk)
    reply = hash_server(
        key,
        ctx=ctx,
        rand_pne=rand_pne,
        rand_server=rand_server,
        sk=sk,
        hash_pne_value=hash_pne_value,
        labels=labels,
    )
    return ServerVerdict(sk=sk, hash_server=reply)


def verify_server(
    key: bytes,
    *,
    ctx: AuthContext,
    rand_pne: bytes,
    rand_server: bytes,
    proof: PNEProof,
    hash_server_value: bytes,
    labels: AuthLabels,
) -> None:
    """The PNE authenticates the verifier (002 §7.5.4.1, last paragraph): hash_server must
    be what rand_PNE, rand_server, K, SK and hash_PNE give. One opaque failure."""
    verify_mac(
        key,
        hash_server_value,
        labels.hash_server,
        *ctx.parts(),
        rand_pne,
        rand_server,
        proof.sk,
        proof.hash_pne,
    )


class RandHashResponder:
    """The PNE's part of one rand/hash exchange, shared by PN Establishment (flow
    RAND_HASH, K = the PNE's EUKey) and LocalEUKey authentication (flow LOCAL, K = the
    LocalEUKey): the same code answers the AUTHENTICATE Request and checks the verifier's
    hash in both (:mod:`cpns.protocol.pn_establishment`, :mod:`cpns.protocol.local_auth`).

    Built with the values the PNE itself holds (its key, its own context, the rand_PNE it
    drew), never with values taken from the request other than rand_server.
    """

    __slots__ = ("_ctx", "_key", "_labels", "_proof", "_rand_pne", "_rand_server")

    def __init__(
        self, *, key: bytes, ctx: AuthContext, rand_pne: bytes, labels: AuthLabels
    ) -> None:
        self._key = key
        self._ctx = ctx
        self._rand_pne = rand_pne
        self._labels = labels
        self._rand_server: bytes | None = None
        self._proof: PNEProof | None = None

    def __repr__(self) -> str:
        return f"RandHashResponder(pne_id={self._ctx.pne_id!r}, answered={self.answered})"

    @property
    def answered(self) -> bool:
        """Whether :meth:`answer` ran."""
        return self._proof is not None

    def answer(self, rand_server: bytes) -> bytes:
        """hash_PNE for ``rand_server`` (002 §7.5.4.1); the same value again on a retry of
        the same challenge. A second, different rand_server is refused (one run, one SK)."""
        if self._proof is not None:
            if self._rand_server != rand_server:
                raise AuthenticationFailed("a second challenge in one run")
            return self._proof.hash_pne
        self._proof = prove(
            self._key,
            ctx=self._ctx,
            rand_pne=self._rand_pne,
            rand_server=rand_server,
            labels=self._labels,
        )
        self._rand_server = rand_server
        return self._proof.hash_pne

    def accept(self, hash_server_value: bytes) -> bytes:
        """Check the verifier's hash (002 §7.5.4.1, last paragraph); return SK.

        Raises one opaque :class:`AuthenticationFailed`; :class:`LocalProtocolError`
        before :meth:`answer`.
        """
        if self._proof is None or self._rand_server is None:
            raise LocalProtocolError("accept() before answer()")
        verify_server(
            self._key,
            ctx=self._ctx,
            rand_pne=self._rand_pne,
            rand_server=self._rand_server,
            proof=self._proof,
            hash_server_value=hash_server_value,
            labels=self._labels,
        )
        return self._proof.sk


# -- LocalEUKey copies (002 §7.5.4.3) -----------------------------------------------------------


def _local_context(
    *, server_id: str, gw_id: str, pne_id: str, pn_id: str, est_id: bytes, holder_id: str
) -> tuple[Part, ...]:
    return (server_id, gw_id, pne_id, pn_id, est_id, holder_id)


def seal_local_eukey(
    holder_eukey: bytes,
    local_eukey: bytes,
    *,
    server_id: str,
    gw_id: str,
    pne_id: str,
    pn_id: str,
    est_id: bytes,
    holder_id: str,
    nonce: bytes,
) -> bytes:
    """One copy of a PNE's LocalEUKey, sealed under its holder's EUKey (002 §7.5.4.3:
    "encrypt each copy by PNE's EUKey and PN GW's EUKey"); ``holder_id`` is the PNE or the
    PN GW, so a copy cannot be handed to the other holder."""
    context = _local_context(
        server_id=server_id,
        gw_id=gw_id,
        pne_id=pne_id,
        pn_id=pn_id,
        est_id=est_id,
        holder_id=holder_id,
    )
    return seal(
        holder_eukey, local_eukey, purpose=LOCAL_EUKEY_PURPOSE, context=context, nonce=nonce
    )


def open_local_eukey(
    holder_eukey: bytes,
    blob: bytes,
    *,
    server_id: str,
    gw_id: str,
    pne_id: str,
    pn_id: str,
    est_id: bytes,
    holder_id: str,
) -> bytes:
    """Open one's own LocalEUKey copy; one opaque :class:`AuthenticationFailed` otherwise."""
    context = _local_context(
        server_id=server_id,
        gw_id=gw_id,
        pne_id=pne_id,
        pn_id=pn_id,
        est_id=est_id,
        holder_id=holder_id,
    )
    key = open_sealed(holder_eukey, blob, purpose=LOCAL_EUKEY_PURPOSE, context=context)
    if len(key) != KEY_LEN:
        raise AuthenticationFailed("sealed value rejected")
    return key
