"""HTTP Digest core (004 §5.x.2; RFC 7616, RFC 2617): vectors, round trips, failure table."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

import cpns.protocol.digest as digest_module
from cpns.errors import AuthenticationFailed, ConfigurationError, ErrorCode, LocalProtocolError
from cpns.protocol.digest import (
    MAX_CLOCK_SKEW,
    MAX_HEADER_LEN,
    AuthChallenge,
    DigestAlgorithm,
    DigestClient,
    DigestServer,
    DigestStale,
    DigestSuccess,
    NcState,
    advance_nc,
    compute_response,
    format_auth_params,
    format_digest,
    parse_auth_params,
    parse_challenges,
    parse_digest,
)

SHA_256 = DigestAlgorithm.SHA_256
MD5 = DigestAlgorithm.MD5

REALM = "cpns@example.org"
NONCE_KEY = bytes(range(32))
USER = "urn:cpns:gw:0001"
EUKEY_HEX = hashlib.sha256(b"test EUKey").hexdigest()  # 64 lower-case hex digits
PASSWORDS = {USER: EUKEY_HEX}
NOW = 1_700_000_000
URI = "/cpns/v1/key-assignment?x=1"


class FakeRandom:
    """Deterministic :class:`cpns.types.Random`: SHA-256 of a counter, as many bytes as asked."""

    def __init__(self, seed: int = 0) -> None:
        self._counter = seed

    def token_bytes(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self._counter += 1
            out += hashlib.sha256(self._counter.to_bytes(8, "big")).digest()
        return out[:n]


class ShortRandom:
    """A broken Random that returns too few bytes."""

    def token_bytes(self, n: int) -> bytes:
        return b"\x00" * (n - 1)


def lookup(username: str) -> str | None:
    return PASSWORDS.get(username)


def make_server(**overrides: object) -> DigestServer:
    config: dict[str, object] = {"realm": REALM, "nonce_key": NONCE_KEY}
    config.update(overrides)
    return DigestServer(**config)  # type: ignore[arg-type]


def make_client(
    password: str = EUKEY_HEX, algorithms: tuple[DigestAlgorithm, ...] = (SHA_256,)
) -> DigestClient:
    return DigestClient(USER, password, algorithms=algorithms)


def verify(server: DigestServer, header: str, *, now: int = NOW, uri: str = URI) -> DigestSuccess:
    return server.verify(method="GET", uri=uri, authorization=header, lookup=lookup, now=now)


def fresh_nonce(server: DigestServer, *, now: int = NOW, seed: int = 0) -> str:
    return parse_digest(server.challenge(now=now, rng=FakeRandom(seed))[0])["nonce"]


def credentials(nonce: str, /, **overrides: str | None) -> str:
    """An Authorization header for ``nonce`` with a correct response, then ``overrides``.

    The response is computed from the final algorithm, username, realm, uri, nc and cnonce,
    so a row that changes one of them still carries a well-formed, matching response unless
    it overrides ``response`` itself. ``None`` removes a parameter.
    """
    params: dict[str, str | None] = {
        "username": USER,
        "realm": REALM,
        "uri": URI,
        "algorithm": "SHA-256",
        "nonce": nonce,
        "nc": "00000001",
        "cnonce": "0a4f113b",
        "qop": "auth",
    }
    params.update(overrides)
    password = overrides.get("password", EUKEY_HEX)
    params.pop("password", None)
    try:
        algorithm = DigestAlgorithm(params["algorithm"] or "MD5")
    except ValueError:
        algorithm = SHA_256  # the server refuses the name before it looks at the response
    if "response" not in overrides:
        params["response"] = compute_response(
            algorithm=algorithm,
            username=params["username"] or "",
            realm=params["realm"] or "",
            password=password or "",
            method="GET",
            uri=params["uri"] or "",
            nonce=params["nonce"] or "",
            nc=params["nc"] or "",
            cnonce=params["cnonce"] or "",
            qop=params["qop"] or "",
        )
    kept = {k: v for k, v in params.items() if v is not None}
    return format_digest(kept, tokens={"algorithm", "qop", "nc"})


# ---------------------------------------------------------------------------------------
# Known-answer vectors.

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


def rfc7616_response(algorithm: DigestAlgorithm) -> str:
    return compute_response(
        algorithm=algorithm,
        username="Mufasa",
        realm="http-auth@example.org",
        password="Circle of Life",
        method="GET",
        uri="/dir/index.html",
        nonce=RFC7616_NONCE,
        nc="00000001",
        cnonce=RFC7616_CNONCE,
    )


def test_rfc7616_sha256_vector() -> None:
    """RFC 7616 §3.9.1: the SHA-256 response of the Mufasa example."""
    assert (
        rfc7616_response(SHA_256)
        == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    )


def test_rfc7616_md5_vector() -> None:
    """RFC 7616 §3.9.1: the MD5 response of the Mufasa example.

    The RFC prints 8ca523f5e9506fed4657c9700eebdbec; hashlib agrees (checked below with
    an independent straight-line computation of RFC 2617 §3.2.2.1).
    """
    assert rfc7616_response(MD5) == "8ca523f5e9506fed4657c9700eebdbec"

    def h(text: str) -> str:
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

    ha1 = h("Mufasa:http-auth@example.org:Circle of Life")
    ha2 = h("GET:/dir/index.html")
    independent = h(f"{ha1}:{RFC7616_NONCE}:00000001:{RFC7616_CNONCE}:auth:{ha2}")
    assert independent == "8ca523f5e9506fed4657c9700eebdbec"


def test_rfc2617_md5_vector() -> None:
    """RFC 2617 §3.5: the MD5 response of the original Mufasa example."""
    response = compute_response(
        algorithm=MD5,
        username="Mufasa",
        realm="testrealm@host.com",
        password="Circle Of Life",
        method="GET",
        uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


RFC7616_AUTHORIZATION = (
    'Digest username="Mufasa",\t realm="http-auth@example.org",  uri="/dir/index.html", '
    f'algorithm=SHA-256, nonce="{RFC7616_NONCE}", nc=00000001, cnonce="{RFC7616_CNONCE}", '
    "qop=auth, "
    'response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1", '
    f'opaque="{RFC7616_OPAQUE}"'
)


def test_rfc7616_authorization_example_parses_and_matches() -> None:
    """RFC 7616 §3.9.1: the example Authorization parses, and its response recomputes."""
    params = parse_digest(RFC7616_AUTHORIZATION)
    assert params["username"] == "Mufasa"
    assert params["opaque"] == RFC7616_OPAQUE
    assert params["response"] == rfc7616_response(DigestAlgorithm(params["algorithm"]))


def test_rfc7616_challenges_parse() -> None:
    """RFC 7616 §3.9.1: the two example challenges, SHA-256 first, share one nonce."""
    values = [
        f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={alg}, '
        f'nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
        for alg in ("SHA-256", "MD5")
    ]
    parsed = [parse_digest(v) for v in values]
    assert [p["algorithm"] for p in parsed] == ["SHA-256", "MD5"]
    assert parsed[0]["qop"] == "auth, auth-int"
    client = DigestClient("Mufasa", "Circle of Life", algorithms=(SHA_256, MD5))
    header = client.authorization(
        challenges=values, method="GET", uri="/dir/index.html", rng=FakeRandom()
    )
    assert parse_digest(header)["algorithm"] == "SHA-256"
    assert parse_digest(header)["opaque"] == RFC7616_OPAQUE


# ---------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_sha256_default() -> None:
    """RFC 7616 §3.4/§3.5: SHA-256 by default; the server's rspauth convinces the client."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    challenges = server.challenge(now=NOW, rng=rng)
    assert len(challenges) == 1
    header = client.authorization(challenges=challenges, method="GET", uri=URI, rng=rng)
    result = verify(server, header)
    assert result.username == USER
    assert result.algorithm is SHA_256
    info = parse_auth_params(result.authentication_info)
    assert info["qop"] == "auth"
    assert info["nc"] == "00000001"
    assert info["cnonce"] == parse_digest(header)["cnonce"]
    client.verify_response(result.authentication_info)


def test_rspauth_uses_empty_method() -> None:
    """RFC 7616 §3.5 / RFC 2617 §3.2.3: rspauth is computed with A2 = ":" uri."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    header = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    p = parse_digest(header)
    expected = compute_response(
        algorithm=SHA_256,
        username=USER,
        realm=REALM,
        password=EUKEY_HEX,
        method="",
        uri=URI,
        nonce=p["nonce"],
        nc=p["nc"],
        cnonce=p["cnonce"],
    )
    info = parse_auth_params(verify(server, header).authentication_info)
    assert info["rspauth"] == expected


def test_round_trip_md5_when_configured() -> None:
    """RFC 2617: MD5 works when the server lists it (legacy clients)."""
    server = make_server(algorithms=(MD5,))
    client, rng = make_client(algorithms=(MD5,)), FakeRandom()
    header = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    result = verify(server, header)
    assert result.algorithm is MD5
    client.verify_response(result.authentication_info)


def test_one_challenge_per_algorithm_in_configured_order() -> None:
    """RFC 7616 §3.7: one challenge per algorithm, in preference order, one shared nonce."""
    server = make_server(algorithms=("MD5", "sha-256"), opaque="xyz")
    values = server.challenge(now=NOW, rng=FakeRandom())
    parsed = [parse_digest(v) for v in values]
    assert [p["algorithm"] for p in parsed] == ["MD5", "SHA-256"]
    assert {p["nonce"] for p in parsed} == {parsed[0]["nonce"]}
    assert all(p["realm"] == REALM and p["qop"] == "auth" for p in parsed)
    assert all(p["opaque"] == "xyz" and "stale" not in p for p in parsed)
    assert values[0].startswith(f'Digest realm="{REALM}", qop="auth", algorithm=MD5, nonce="')
    stale = server.challenge(now=NOW, rng=FakeRandom(), stale=True)
    assert all(parse_digest(v)["stale"] == "true" for v in stale)


def test_client_takes_the_servers_order() -> None:
    """RFC 7616 §3.7: the client answers the first challenge it supports, in server order."""
    server, rng = make_server(algorithms=(MD5, SHA_256)), FakeRandom()
    both = make_client(algorithms=(SHA_256, MD5))
    header = both.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    assert verify(server, header).algorithm is MD5
    sha_only = make_client()
    header = sha_only.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    assert verify(server, header).algorithm is SHA_256


def test_keep_alive_reuses_nonce_with_increasing_nc() -> None:
    """RFC 7616 §3.4: a reused nonce carries nc 1, 2, 3; each request verifies."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    first = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    client.verify_response(verify(server, first).authentication_info)
    seen = []
    for step in range(2):
        header = client.authorization(method="POST", uri="/other", rng=rng)
        result = server.verify(
            method="POST", uri="/other", authorization=header, lookup=lookup, now=NOW + step
        )
        client.verify_response(result.authentication_info)
        seen.append(parse_digest(header))
    assert [p["nc"] for p in seen] == ["00000002", "00000003"]
    assert {p["nonce"] for p in seen} == {parse_digest(first)["nonce"]}


def test_same_nonce_in_new_challenge_keeps_counting() -> None:
    """RFC 7616 §3.4: nc counts requests per nonce, even if the nonce is offered again."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    challenges = server.challenge(now=NOW, rng=rng)
    client.authorization(challenges=challenges, method="GET", uri=URI, rng=rng)
    again = client.authorization(challenges=challenges, method="GET", uri=URI, rng=rng)
    assert parse_digest(again)["nc"] == "00000002"
    verify(server, again)


def test_nonces_are_stateless_across_processes() -> None:
    """Design: processes sharing nonce_key accept each other's nonces (no shared state)."""
    issuer, other = make_server(), make_server()
    client, rng = make_client(), FakeRandom()
    header = client.authorization(
        challenges=issuer.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    assert verify(other, header).username == USER


def test_nextnonce_is_adopted_after_rspauth() -> None:
    """RFC 7616 §3.5: a nextnonce in a verified Authentication-Info is used next, nc=1."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    header = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    info = verify(server, header).authentication_info
    nextnonce = fresh_nonce(server, seed=99)
    client.verify_response(f'{info}, nextnonce="{nextnonce}"')
    following = client.authorization(method="GET", uri=URI, rng=rng)
    assert parse_digest(following)["nonce"] == nextnonce
    assert parse_digest(following)["nc"] == "00000001"
    verify(server, following)


# ---------------------------------------------------------------------------------------
# Refusals.


def test_wrong_password_and_unknown_user_fail_alike() -> None:
    """004 §5.x.2 / DESIGN §6: unknown user and wrong key give the same opaque failure."""
    server, rng = make_server(), FakeRandom()
    challenges = server.challenge(now=NOW, rng=rng)
    wrong = make_client(password="00" * 32).authorization(
        challenges=challenges, method="GET", uri=URI, rng=rng
    )
    unknown = DigestClient("urn:cpns:gw:9999", EUKEY_HEX).authorization(
        challenges=challenges, method="GET", uri=URI, rng=rng
    )
    errors = []
    for header in (wrong, unknown):
        with pytest.raises(AuthenticationFailed) as info:
            verify(server, header)
        errors.append(info.value)
    assert [type(e) for e in errors] == [AuthenticationFailed, AuthenticationFailed]
    assert [e.code for e in errors] == [ErrorCode.AUTHENTICATION_FAILED] * 2


def test_replayed_nc_is_refused() -> None:
    """RFC 7616 §5.4: the same nonce and nc twice is a replay."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    header = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    verify(server, header)
    with pytest.raises(AuthenticationFailed, match="replayed nc") as info:
        verify(server, header)
    assert type(info.value) is AuthenticationFailed
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


def test_nc_must_strictly_increase_by_default() -> None:
    """Brief: with the default window, a lower nc than already seen is refused."""
    server = make_server()
    nonce = fresh_nonce(server)
    verify(server, credentials(nonce, nc="00000005"))
    with pytest.raises(AuthenticationFailed, match="replayed"):
        verify(server, credentials(nonce, nc="00000004"))
    verify(server, credentials(nonce, nc="00000006"))


def test_nc_window_accepts_out_of_order_once() -> None:
    """RFC 7616 §5.4 with a window: an out-of-order nc inside the window is accepted once."""
    server = make_server(nc_window=4)
    nonce = fresh_nonce(server)
    for nc in ("00000001", "00000003", "00000002"):
        verify(server, credentials(nonce, nc=nc))
    for nc in ("00000002", "00000003"):
        with pytest.raises(AuthenticationFailed, match="replayed"):
            verify(server, credentials(nonce, nc=nc))
    verify(server, credentials(nonce, nc="00000009"))  # a jump past the window
    with pytest.raises(AuthenticationFailed, match="replayed"):  # now outside the window
        verify(server, credentials(nonce, nc="00000005"))
    verify(server, credentials(nonce, nc="00000006"))


def test_advance_nc_is_the_one_window_rule() -> None:
    """RFC 7616 §5.4: advance_nc moves a nonce's state up, accepts an unseen nc inside the
    window once, and refuses a seen one or one below the window; the state a host stores
    is exactly what the in-memory table keeps."""
    state: NcState = advance_nc(None, nc=3, window=4)
    assert state == (3, 0b1)
    state = advance_nc(state, nc=5, window=4)
    assert state == (5, 0b101)
    state = advance_nc(state, nc=4, window=4)
    assert state == (5, 0b111)
    for replayed in (5, 4, 3, 1):  # seen, seen, seen, below the window
        with pytest.raises(AuthenticationFailed, match="replayed"):
            advance_nc(state, nc=replayed, window=4)
    assert advance_nc(state, nc=2, window=4) == (5, 0b1111)
    assert advance_nc(state, nc=0xFFFFFFFF, window=4) == (0xFFFFFFFF, 1)  # a huge jump
    with pytest.raises(AuthenticationFailed, match="replayed"):
        advance_nc((7, 1), nc=6, window=1)


def test_a_host_kept_replay_guard_gets_what_to_record() -> None:
    """nc_in_memory=False: the verifier keeps no counter (the same header verifies twice);
    each success names the nonce, the nc and how long to keep them (lifetime + skew), and
    a host applying advance_nc to one shared state refuses the replay."""
    server = make_server(nc_in_memory=False, nonce_lifetime=300)
    nonce = fresh_nonce(server, now=NOW - 10)
    header = credentials(nonce, nc="00000002")
    first, second = verify(server, header), verify(server, header)
    assert (first.nonce, first.nc) == (nonce, 2) == (second.nonce, second.nc)
    assert first.replay_until == NOW - 10 + 300 + MAX_CLOCK_SKEW
    shared: dict[str, NcState] = {}
    shared[nonce] = advance_nc(shared.get(nonce), nc=first.nc, window=server.nc_window)
    with pytest.raises(AuthenticationFailed, match="replayed"):
        advance_nc(shared.get(nonce), nc=second.nc, window=server.nc_window)


def test_check_refuses_a_forged_nonce_before_any_lookup() -> None:
    """check() runs every test that needs no user lookup (a forged nonce stops there), and
    check + finish with the looked-up password is verify."""
    server = make_server()
    forged = fresh_nonce(make_server(nonce_key=bytes(32)))
    with pytest.raises(AuthenticationFailed):
        server.check(method="GET", uri=URI, authorization=credentials(forged), now=NOW)
    attempt = server.check(
        method="GET", uri=URI, authorization=credentials(fresh_nonce(server)), now=NOW
    )
    assert attempt.username == USER
    assert EUKEY_HEX not in repr(attempt)
    ok = server.finish(attempt, password=lookup(attempt.username), now=NOW)
    assert ok.username == USER
    with pytest.raises(AuthenticationFailed, match="unknown"):
        server.finish(attempt, password=None, now=NOW)


def test_failures_do_not_advance_nc() -> None:
    """RFC 7616 §5.4: only a verified request moves the counter, so forgers cannot block it."""
    server = make_server()
    nonce = fresh_nonce(server)
    with pytest.raises(AuthenticationFailed):
        verify(server, credentials(nonce, nc="ffffffff", password="00" * 32))
    verify(server, credentials(nonce, nc="00000001"))


def test_expired_nonce_is_stale() -> None:
    """RFC 7616 §3.3 stale: a right response on an expired nonce asks for a retry."""
    server = make_server(nonce_lifetime=60)
    header = credentials(fresh_nonce(server))
    with pytest.raises(DigestStale) as info:
        verify(server, header, now=NOW + 60)
    assert isinstance(info.value, AuthenticationFailed)
    assert info.value.code is ErrorCode.STALE_TIME
    verify(server, header, now=NOW + 59)


def test_stale_retry_round_trip() -> None:
    """RFC 7616 §3.3: after stale=true the client answers the new challenge with nc=1."""
    server, client, rng = make_server(nonce_lifetime=60), make_client(), FakeRandom()
    first = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    verify(server, first)
    later = NOW + 61
    with pytest.raises(DigestStale):
        verify(server, client.authorization(method="GET", uri=URI, rng=rng), now=later)
    retry = client.authorization(
        challenges=server.challenge(now=later, rng=rng, stale=True), method="GET", uri=URI, rng=rng
    )
    assert parse_digest(retry)["nc"] == "00000001"
    assert parse_digest(retry)["nonce"] != parse_digest(first)["nonce"]
    client.verify_response(verify(server, retry, now=later).authentication_info)


def test_expired_nonce_with_wrong_key_is_not_stale() -> None:
    """RFC 7616 §3.3: stale=true only when the response was right; otherwise a plain failure."""
    server = make_server(nonce_lifetime=60)
    header = credentials(fresh_nonce(server), password="00" * 32)
    with pytest.raises(AuthenticationFailed) as info:
        verify(server, header, now=NOW + 3600)
    assert type(info.value) is AuthenticationFailed


def test_nonce_from_the_future_is_stale() -> None:
    """Design: a nonce dated beyond MAX_CLOCK_SKEW from now is answered as stale."""
    server = make_server()
    header = credentials(fresh_nonce(server, now=NOW + MAX_CLOCK_SKEW + 1))
    with pytest.raises(DigestStale):
        verify(server, header)
    verify(server, credentials(fresh_nonce(server, now=NOW + MAX_CLOCK_SKEW)))


def test_nonce_from_another_key_is_refused() -> None:
    """Design: a nonce whose MAC is under another nonce_key is not ours."""
    other = make_server(nonce_key=b"\x01" * 32)
    header = credentials(fresh_nonce(other))
    with pytest.raises(AuthenticationFailed, match="MAC mismatch"):
        verify(make_server(), header)


def test_nonce_from_another_realm_is_refused() -> None:
    """Design: the nonce MAC binds the realm."""
    other = make_server(realm="elsewhere")
    nonce = fresh_nonce(other)
    with pytest.raises(AuthenticationFailed, match="MAC mismatch"):
        verify(make_server(), credentials(nonce))


@pytest.mark.parametrize("position", [0, 7, 12, 30, 63])
def test_tampered_nonce_is_refused(position: int) -> None:
    """Design: any change to the nonce (time, random or tag) breaks its MAC."""
    server = make_server()
    nonce = fresh_nonce(server)
    flipped = "B" if nonce[position] == "A" else "A"
    tampered = nonce[:position] + flipped + nonce[position + 1 :]
    with pytest.raises(AuthenticationFailed):
        verify(server, credentials(tampered))


def test_uri_mismatch_is_refused() -> None:
    """RFC 7616 §3.4.6: the uri parameter must match the request-target."""
    server = make_server()
    header = credentials(fresh_nonce(server), uri="/cpns/v1/other")
    with pytest.raises(AuthenticationFailed, match="uri"):
        verify(server, header)


def test_realm_mismatch_is_refused() -> None:
    """RFC 7616 §3.4: the realm must be the server's."""
    server = make_server()
    with pytest.raises(AuthenticationFailed, match="realm"):
        verify(server, credentials(fresh_nonce(server), realm="other@example.org"))


def test_md5_refused_when_not_configured() -> None:
    """Design: MD5 is accepted only when configured, even with a correct MD5 response."""
    server = make_server()
    nonce = fresh_nonce(server)
    with pytest.raises(AuthenticationFailed, match="not enabled"):
        verify(server, credentials(nonce, algorithm="MD5"))
    with pytest.raises(AuthenticationFailed, match="not enabled"):  # absent means MD5
        verify(server, credentials(nonce, algorithm=None))
    legacy = make_server(algorithms=(SHA_256, MD5))
    assert verify(legacy, credentials(nonce, algorithm=None)).algorithm is MD5


def test_opaque_must_be_echoed() -> None:
    """RFC 7616 §3.3: a configured opaque must come back unchanged."""
    server = make_server(opaque="session-7")
    nonce = fresh_nonce(server)
    with pytest.raises(AuthenticationFailed, match="opaque"):
        verify(server, credentials(nonce))
    with pytest.raises(AuthenticationFailed, match="opaque"):
        verify(server, credentials(nonce, opaque="session-8"))
    verify(server, credentials(nonce, opaque="session-7"))


def test_response_may_be_upper_case_hex() -> None:
    """RFC 7616 §3.4: response is hex; case is not significant to us."""
    server = make_server()
    params = parse_digest(credentials(fresh_nonce(server)))
    params["response"] = params["response"].upper()
    verify(server, format_digest(params))


# Failure table: each row turns a valid header (for a fresh nonce) into a bad one.
MALFORMED: list[tuple[str, str]] = [
    ("empty", ""),
    ("whitespace only", " \t "),
    ("basic scheme", "Basic dXNlcjpwYXNz"),
    ("bearer scheme", 'Bearer realm="x"'),
    ("digest without params", "Digest"),
    ("digest token68", "Digest abc=="),
    ("name without value", "Digest username"),
    ("empty value", "Digest username=, realm=x"),
    ("unterminated quote", 'Digest username="abc'),
    ("missing comma", 'Digest username="a" realm="b"'),
    ("bad escape at end", 'Digest username="a\\"'),
    ("equals first", "Digest =x"),
    ("only commas", "Digest ,,,"),
    ("two credentials", "Digest username=a, Basic abc"),
    ("two digest credentials", "Digest username=a, Digest username=b"),
    ("non-ascii", 'Digest username="M\u00fcfasa"'),
    ("control character", 'Digest username="a\x00b"'),
    ("newline", 'Digest username="a",\r\n realm="b"'),
    ("too long", 'Digest username="' + "a" * MAX_HEADER_LEN + '"'),
    ("garbage after value", 'Digest username="a"x'),
    ("quote in token", 'Digest username=a"b'),
    ("duplicate parameter", 'Digest username="a", USERNAME="a"'),
]


@pytest.mark.parametrize(("name", "header"), MALFORMED, ids=[row[0] for row in MALFORMED])
def test_malformed_authorization_table(name: str, header: str) -> None:
    """RFC 9110 §11 / RFC 7616 §3.4: malformed credentials fail with one opaque code."""
    with pytest.raises(AuthenticationFailed) as info:
        verify(make_server(), header)
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


REQUIRED = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
MISSING: list[tuple[str, dict[str, str | None]]] = [(f"missing {n}", {n: None}) for n in REQUIRED]
BAD_PARAMS: list[tuple[str, dict[str, str | None]]] = [
    *MISSING,
    ("qop auth-int", {"qop": "auth-int"}),
    ("qop quoted list", {"qop": "auth,auth-int"}),
    ("nc zero", {"nc": "00000000"}),
    ("nc not hex", {"nc": "0000000g"}),
    ("nc too short", {"nc": "0001"}),
    ("nc too long", {"nc": "000000001"}),
    ("empty cnonce", {"cnonce": ""}),
    ("empty username", {"username": ""}),
    ("response too short", {"response": "ab" * 16}),
    ("response not hex", {"response": "zz" * 32}),
    ("response wrong", {"response": "00" * 32}),
    ("algorithm unknown", {"algorithm": "SHA-512-256"}),
    ("algorithm sess", {"algorithm": "SHA-256-sess"}),
    ("unexpected opaque", {"opaque": "x"}),
    ("userhash true", {"userhash": "true"}),
    ("userhash junk", {"userhash": "maybe"}),
    ("username star", {"username*": "UTF-8''Mufasa"}),
    ("nonce not base64url", {"nonce": "!" * 64}),
    ("nonce too short", {"nonce": "A" * 63}),
    ("nonce padded", {"nonce": "A" * 62 + "=="}),
]


@pytest.mark.parametrize(("name", "change"), BAD_PARAMS, ids=[row[0] for row in BAD_PARAMS])
def test_bad_parameter_table(name: str, change: dict[str, str | None]) -> None:
    """RFC 7616 §3.4: each missing or invalid parameter fails with the same opaque code."""
    server = make_server()
    header = credentials(fresh_nonce(server), **change)
    with pytest.raises(AuthenticationFailed) as info:
        verify(server, header)
    assert type(info.value) is AuthenticationFailed
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


def test_userhash_false_and_unknown_params_are_ignored() -> None:
    """RFC 7616 §3.4: userhash=false is the default; unknown parameters are ignored."""
    server = make_server()
    header = credentials(fresh_nonce(server), userhash="false", future_param="1")
    verify(server, header)


def test_lenient_quoting_and_case() -> None:
    """RFC 9110 §11.2: names are case-insensitive; token and quoted-string values are equal."""
    server = make_server()
    params = parse_digest(credentials(fresh_nonce(server)))
    header = "digest " + ", ".join(f'{k.upper()} = "{v}"' for k, v in params.items())
    verify(server, header)


# ---------------------------------------------------------------------------------------
# Replay table bounds.


def test_replay_table_evicts_oldest_and_treats_them_as_stale() -> None:
    """Design: a full table forgets its oldest nonces; a forgotten nonce is stale, not new."""
    server = make_server(max_tracked_nonces=2)
    nonces = [fresh_nonce(server, now=NOW + i, seed=i) for i in range(3)]
    for nonce in nonces:
        verify(server, credentials(nonce), now=NOW + 2)
    with pytest.raises(DigestStale, match="no longer tracked"):
        verify(server, credentials(nonces[0], nc="00000002"), now=NOW + 2)
    verify(server, credentials(nonces[2], nc="00000002"), now=NOW + 2)


def test_replay_table_prunes_expired_nonces() -> None:
    """Design: expired nonces leave the table; one seen again, even if the clock went back,
    is stale rather than new."""
    server = make_server(nonce_lifetime=60)
    old = fresh_nonce(server)
    verify(server, credentials(old))
    later = NOW + 120
    verify(server, credentials(fresh_nonce(server, now=later, seed=5)), now=later)  # prunes
    with pytest.raises(DigestStale, match="no longer tracked"):
        verify(server, credentials(old, nc="00000002"), now=NOW + 1)


# ---------------------------------------------------------------------------------------
# The client.


def authenticated_client() -> tuple[DigestClient, dict[str, str]]:
    """A client that sent one request, and the parsed Authentication-Info it got back."""
    server, client, rng = make_server(), make_client(), FakeRandom()
    header = client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    return client, parse_auth_params(verify(server, header).authentication_info)


def test_client_verifies_rspauth() -> None:
    """RFC 7616 §3.5 / 004 §5.x.2: the server proves the key with rspauth (hex, any case)."""
    client, info = authenticated_client()
    client.verify_response(format_auth_params(info, tokens={"qop", "nc"}))
    client.verify_response(format_auth_params({**info, "rspauth": info["rspauth"].upper()}))
    client.verify_response(format_auth_params({"rspauth": info["rspauth"]}))  # rest optional


BAD_INFO: dict[str, dict[str, str | None]] = {
    "tampered rspauth": {"rspauth": "0" * 64},
    "missing rspauth": {"rspauth": None},
    "other cnonce": {"cnonce": "00"},
    "other nc": {"nc": "00000002"},
    "other qop": {"qop": "auth-int"},
}


@pytest.mark.parametrize("change", BAD_INFO.values(), ids=BAD_INFO.keys())
def test_client_refuses_bad_authentication_info(change: dict[str, str | None]) -> None:
    """RFC 7616 §3.5: a wrong or missing rspauth, or another request's cnonce/nc, fails."""
    client, info = authenticated_client()
    changed = {k: v for k, v in {**info, **change}.items() if v is not None}
    with pytest.raises(AuthenticationFailed):
        client.verify_response(format_auth_params(changed))


def test_client_refuses_malformed_authentication_info() -> None:
    """RFC 7615 §3: a malformed Authentication-Info is an AuthenticationFailed."""
    client, _ = authenticated_client()
    with pytest.raises(AuthenticationFailed):
        client.verify_response('rspauth="unterminated')


def test_client_rspauth_from_a_server_with_another_key_is_refused() -> None:
    """004 §5.x.2: a server that does not hold the EUKey cannot produce rspauth."""
    rng = FakeRandom()
    impostor = make_server()
    client = make_client()
    header = client.authorization(
        challenges=impostor.challenge(now=NOW, rng=rng), method="GET", uri=URI, rng=rng
    )
    fake = impostor.verify(
        method="GET",
        uri=URI,
        authorization=credentials(parse_digest(header)["nonce"], password="11" * 32),
        lookup=lambda _: "11" * 32,
        now=NOW,
    )
    with pytest.raises(AuthenticationFailed):
        client.verify_response(fake.authentication_info)


def test_client_without_usable_challenge() -> None:
    """RFC 7616 §3.7: Basic, malformed, unsupported or qop-less challenges are skipped."""
    nonce = fresh_nonce(make_server())
    skipped = [
        'Basic realm="x"',
        'Digest realm="x", nonce="unterminated',
        f'Digest realm="{REALM}", nonce="{nonce}", qop="auth", algorithm=MD5',
        f'Digest realm="{REALM}", nonce="{nonce}", qop="auth", algorithm=SHA-512-256',
        f'Digest realm="{REALM}", nonce="{nonce}", qop="auth-int", algorithm=SHA-256',
        f'Digest realm="{REALM}", nonce="{nonce}", algorithm=SHA-256',
        f'Digest nonce="{nonce}", qop="auth", algorithm=SHA-256',
        f'Digest realm="{REALM}", nonce="", qop="auth", algorithm=SHA-256',
        'Negotiate, Bearer error="invalid_token"',
    ]
    client = make_client()
    with pytest.raises(AuthenticationFailed, match="no Digest challenge"):
        client.authorization(challenges=skipped, method="GET", uri=URI, rng=FakeRandom())
    usable = f'Basic realm="x", Digest realm="{REALM}", nonce="{nonce}", qop="auth,auth-int"'
    header = DigestClient(USER, EUKEY_HEX, algorithms=(MD5,)).authorization(
        challenges=[*skipped, usable], method="GET", uri=URI, rng=FakeRandom()
    )
    assert parse_digest(header)["algorithm"] == "MD5"  # RFC 7616 §3.3: absent means MD5


def test_client_local_misuse() -> None:
    """DESIGN §6: misuse by the local caller is a LocalProtocolError."""
    client = make_client()
    with pytest.raises(LocalProtocolError):
        client.authorization(method="GET", uri=URI, rng=FakeRandom())
    with pytest.raises(LocalProtocolError):
        client.verify_response('qop=auth, rspauth="00"')
    with pytest.raises(LocalProtocolError):
        DigestClient("M\u00fcfasa", EUKEY_HEX)
    with pytest.raises(LocalProtocolError):
        DigestClient(USER, EUKEY_HEX, algorithms=())
    server, rng = make_server(), FakeRandom()
    with pytest.raises(LocalProtocolError):
        client.authorization(
            challenges=server.challenge(now=NOW, rng=rng), method="GET", uri="/\u00e9", rng=rng
        )


def test_secrets_stay_out_of_repr() -> None:
    """DESIGN §4: keys never reach repr."""
    assert EUKEY_HEX not in repr(make_client())
    assert repr(NONCE_KEY) not in repr(make_server())
    assert "nonce_key" not in repr(make_server())


# ---------------------------------------------------------------------------------------
# Configuration and arguments.


@pytest.mark.parametrize(
    "overrides",
    [
        {"realm": ""},
        {"realm": "caf\u00e9"},
        {"nonce_key": b"short"},
        {"nonce_key": "not bytes" * 4},
        {"algorithms": ()},
        {"algorithms": (SHA_256, "sha-256")},
        {"algorithms": ("SHA-512",)},
        {"nonce_lifetime": 0},
        {"nonce_lifetime": 86_401},
        {"opaque": "a\nb"},
        {"nc_window": 0},
        {"nc_window": 1025},
        {"max_tracked_nonces": 0},
    ],
)
def test_server_configuration_is_validated(overrides: dict[str, object]) -> None:
    """DESIGN §5: configuration is checked on construction with ConfigurationError."""
    with pytest.raises(ConfigurationError):
        make_server(**overrides)


def test_server_normalises_algorithm_names() -> None:
    """RFC 7616 §3.3: algorithm names from a config file map to the enum."""
    assert make_server(algorithms=("md5", "SHA-256")).algorithms == (MD5, SHA_256)


def test_bad_now_and_rng_are_local_errors() -> None:
    """DESIGN §6: a negative clock or a short RNG is the caller's fault."""
    server = make_server()
    with pytest.raises(LocalProtocolError):
        server.challenge(now=-1, rng=FakeRandom())
    with pytest.raises(LocalProtocolError):
        server.challenge(now=NOW, rng=ShortRandom())
    with pytest.raises(LocalProtocolError):
        verify(server, credentials(fresh_nonce(server)), now=-1)


def test_algorithm_lookup() -> None:
    """RFC 7616 §3.3: algorithm values are matched without regard to case."""
    assert DigestAlgorithm("sha-256") is SHA_256
    assert DigestAlgorithm("Md5") is MD5
    with pytest.raises(ValueError, match="SHA-1"):
        DigestAlgorithm("SHA-1")
    with pytest.raises(ValueError, match="1"):
        DigestAlgorithm(1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Header syntax.


def test_parse_challenges_forms() -> None:
    """RFC 9110 §11.6.1: several challenges in one value, token68, empty list elements."""
    value = (
        ' , Basic abc==, Digest realm="a\\"b\\\\c", nonce=x,, Negotiate ,'
        ' Bearer realm=x , error="y",'
    )
    assert parse_challenges(value) == [
        AuthChallenge("basic", {}, "abc=="),
        AuthChallenge("digest", {"realm": 'a"b\\c', "nonce": "x"}),
        AuthChallenge("negotiate", {}),
        AuthChallenge("bearer", {"realm": "x", "error": "y"}),
    ]
    assert parse_challenges("Negotiate") == [AuthChallenge("negotiate", {})]


@pytest.mark.parametrize("value", ["", ",", "Basic abc==, =", "Digest a=b c=d", "Digest a=b;"])
def test_parse_challenges_rejects(value: str) -> None:
    """RFC 9110 §11.6.1: malformed challenge lists fail as AuthenticationFailed."""
    with pytest.raises(AuthenticationFailed):
        parse_challenges(value)


def test_auth_params_round_trip_and_forms() -> None:
    """RFC 7615 §3: Authentication-Info is a bare auth-param list."""
    params = {"qop": "auth", "rspauth": 'a"b\\c', "nc": "00000001", "nextnonce": "x y"}
    text = format_auth_params(params, tokens={"qop", "nc", "nextnonce"})
    assert text == 'qop=auth, rspauth="a\\"b\\\\c", nc=00000001, nextnonce="x y"'
    assert parse_auth_params(text) == params
    assert parse_auth_params("") == {}
    assert parse_auth_params(" , ,") == {}
    assert format_digest({}) == "Digest"
    with pytest.raises(AuthenticationFailed):
        parse_auth_params("qop=auth, Digest")


@pytest.mark.parametrize(
    "params",
    [{"bad name": "x"}, {"a": "x", "A": "y"}, {"a": "line\nbreak"}, {"a": "caf\u00e9"}],
)
def test_format_rejects_unwritable(params: dict[str, str]) -> None:
    """RFC 9110 §5.6: names are tokens, each once; values must be printable ASCII."""
    with pytest.raises(LocalProtocolError):
        format_auth_params(params)


def test_module_keeps_the_dependency_rule() -> None:
    """DESIGN §1: the core imports no clock, OS RNG, socket, TLS, asyncio or database."""
    source = Path(digest_module.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"time", "os", "secrets", "socket", "ssl", "asyncio", "sqlite3", "random"}
    assert not imported & forbidden


def _credentials_of(user: str, nonce: str, nc: str = "00000001") -> str:
    password = hashlib.sha256(user.encode()).hexdigest()
    return credentials(nonce, username=user, password=password, nc=nc)


def _lookup_any(user: str) -> str | None:
    return hashlib.sha256(user.encode()).hexdigest()


def test_one_entity_burning_nonces_does_not_make_others_stale() -> None:
    """Issue 5 item 13: one gateway burning 10,001 Digest nonces (each verified once) made
    every other gateway's nonce stale (the full table dropped its oldest half); now each
    entity holds a bounded share of the table: the burner only forgets its own oldest
    nonces, and another gateway keeps counting on its nonce."""
    server = make_server()
    other = fresh_nonce(server, now=NOW - 1, seed=99_999)
    server.verify(
        method="GET",
        uri=URI,
        authorization=_credentials_of("gw-b", other),
        lookup=_lookup_any,
        now=NOW - 1,
    )
    burned = []
    for i in range(10_001):
        now = NOW + i // 40  # 40 a second: 10,001 nonces within one lifetime
        nonce = fresh_nonce(server, now=now, seed=i)
        burned.append(nonce)
        server.verify(
            method="GET",
            uri=URI,
            authorization=_credentials_of("gw-a", nonce),
            lookup=_lookup_any,
            now=now,
        )
    later = NOW + 251
    # gw-b's nonce is still tracked: its next count is accepted, a replay still refused.
    server.verify(
        method="GET",
        uri=URI,
        authorization=_credentials_of("gw-b", other, "00000002"),
        lookup=_lookup_any,
        now=later,
    )
    with pytest.raises(AuthenticationFailed, match="replayed"):
        server.verify(
            method="GET",
            uri=URI,
            authorization=_credentials_of("gw-b", other, "00000002"),
            lookup=_lookup_any,
            now=later,
        )
    # The burner's own oldest nonce was forgotten and is stale; its newest still counts.
    with pytest.raises(DigestStale):
        server.verify(
            method="GET",
            uri=URI,
            authorization=_credentials_of("gw-a", burned[0], "00000002"),
            lookup=_lookup_any,
            now=later,
        )
    server.verify(
        method="GET",
        uri=URI,
        authorization=_credentials_of("gw-a", burned[-1], "00000002"),
        lookup=_lookup_any,
        now=later,
    )


def test_the_per_entity_share_is_configurable_and_checked() -> None:
    """Issue 5 item 13: max_nonces_per_entity bounds one username's entries (here 2)."""
    server = make_server(max_nonces_per_entity=2)
    nonces = [fresh_nonce(server, now=NOW + i, seed=i) for i in range(3)]
    for nonce in nonces:
        verify(server, credentials(nonce), now=NOW + 2)
    with pytest.raises(DigestStale):
        verify(server, credentials(nonces[0], nc="00000002"), now=NOW + 2)
    verify(server, credentials(nonces[1], nc="00000002"), now=NOW + 2)
    with pytest.raises(ConfigurationError):
        make_server(max_nonces_per_entity=0)
