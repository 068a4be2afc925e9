"""Hypothesis checks of the Digest core: garbage in, header round trips, client/server."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from cpns.errors import AuthenticationFailed
from cpns.protocol.digest import (
    DigestAlgorithm,
    DigestClient,
    DigestServer,
    format_auth_params,
    format_digest,
    parse_auth_params,
    parse_challenges,
    parse_digest,
)

REALM = "cpns@example.org"
SERVER_KEY = bytes(32)
NOW = 1_700_000_000
EUKEY_HEX = hashlib.sha256(b"property EUKey").hexdigest()


class CounterRandom:
    """Deterministic :class:`cpns.types.Random` for the property tests."""

    def __init__(self) -> None:
        self._counter = 0

    def token_bytes(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.sha256(self._counter.to_bytes(8, "big")).digest()[:n]


def make_server() -> DigestServer:
    return DigestServer(
        realm=REALM, nonce_key=SERVER_KEY, algorithms=(DigestAlgorithm.SHA_256, DigestAlgorithm.MD5)
    )


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
PRINTABLE = st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]) | st.just("\t")
names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)
values = st.text(alphabet=PRINTABLE, max_size=40)
param_dicts = st.dictionaries(names, values, max_size=8)

# Text that looks like Digest credentials, to reach past the first parsing checks.
fragments = st.sampled_from(
    [
        "Digest",
        " ",
        ",",
        "=",
        '"',
        "\\",
        "\t",
        "username",
        "realm",
        "nonce",
        "nc",
        "uri",
        "response",
        "qop",
        "auth",
        "cnonce",
        "algorithm",
        "SHA-256",
        "MD5",
        "00000001",
        REALM,
        "userhash",
        "true",
        "opaque",
        "/x",
        "abc==",
    ]
)
header_like = st.lists(fragments | st.text(max_size=4), max_size=40).map("".join)


def lookup(username: str) -> str | None:
    return EUKEY_HEX if username == "gw" else None


@settings(max_examples=300)
@given(st.text(max_size=300) | header_like | header_like.map(lambda t: "Digest " + t))
def test_any_authorization_fails_only_as_authentication_failed(header: str) -> None:
    """DESIGN §3: no input makes verify() raise anything but AuthenticationFailed."""
    try:
        make_server().verify(method="GET", uri="/x", authorization=header, lookup=lookup, now=NOW)
    except AuthenticationFailed:
        pass


@settings(max_examples=300)
@given(st.text(max_size=300) | header_like)
def test_any_header_parses_or_fails_as_authentication_failed(header: str) -> None:
    """DESIGN §3: the header parsers raise AuthenticationFailed and nothing else."""
    for parse in (parse_challenges, parse_digest, parse_auth_params):
        try:
            parse(header)
        except AuthenticationFailed:
            pass


@given(st.text(max_size=200) | header_like)
def test_any_authentication_info_fails_only_as_authentication_failed(header: str) -> None:
    """RFC 7616 §3.5: a client given any Authentication-Info accepts it or fails cleanly."""
    server, rng = make_server(), CounterRandom()
    client = DigestClient("gw", EUKEY_HEX)
    client.authorization(
        challenges=server.challenge(now=NOW, rng=rng), method="GET", uri="/", rng=rng
    )
    try:
        client.verify_response(header)
    except AuthenticationFailed:
        pass


@given(param_dicts, st.sets(names))
def test_digest_header_round_trip(params: dict[str, str], tokens: set[str]) -> None:
    """RFC 9110 §11.2: parse(format(params)) gives params back, quoted or as tokens."""
    assert parse_digest(format_digest(params, tokens=tokens)) == params
    assert parse_auth_params(format_auth_params(params, tokens=tokens)) == params


@given(
    username=st.text(alphabet=PRINTABLE, min_size=1, max_size=30),
    uri=st.text(alphabet=PRINTABLE, min_size=1, max_size=60),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    requests=st.integers(min_value=1, max_value=4),
)
def test_client_server_round_trip(username: str, uri: str, method: str, requests: int) -> None:
    """RFC 7616 §3.4/§3.5: any printable username and uri authenticate, both ways."""
    server, rng = make_server(), CounterRandom()
    client = DigestClient(username, EUKEY_HEX, algorithms=(DigestAlgorithm.SHA_256,))
    challenges: list[str] | None = server.challenge(now=NOW, rng=rng)
    for _ in range(requests):
        header = client.authorization(challenges=challenges, method=method, uri=uri, rng=rng)
        challenges = None
        result = server.verify(
            method=method, uri=uri, authorization=header, lookup=lambda _: EUKEY_HEX, now=NOW
        )
        assert result.username == username
        client.verify_response(result.authentication_info)


def _general_parse(header: str) -> dict[str, str] | None:
    """What the general parser makes of a single Digest challenge or credentials (None:
    refused)."""
    try:
        challenges = parse_challenges(header)
    except AuthenticationFailed:
        return None
    if len(challenges) != 1 or challenges[0].scheme != "digest" or challenges[0].token68:
        return None
    return dict(challenges[0].params)


simple_values = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12) | st.text(
    alphabet=PRINTABLE, max_size=20
).filter(lambda v: '"' not in v and "\\" not in v).map(lambda v: f'"{v}"')


@given(
    st.sampled_from(["Digest", "digest", "DIGEST", "DiGeSt"]),
    st.lists(st.tuples(names | names.map(str.upper), simple_values), min_size=1, max_size=9),
    st.sampled_from([", ", ",", " , ", ",, "]),
)
@settings(max_examples=400)
def test_parse_digest_fast_path_answers_as_the_general_parser(
    scheme: str, pairs: list[tuple[str, str]], separator: str
) -> None:
    """RFC 9110 §11.2 / RFC 7616 §3.4: the fast path of parse_digest for the usual header
    shape ("Digest " and name=value pairs separated by ", ") gives exactly what the general
    parser gives, and refuses what it refuses (a repeated name in any case); other
    separators take the general parser."""
    header = scheme + " " + separator.join(f"{n}={v}" for n, v in pairs)
    expected = _general_parse(header)
    if expected is None:
        try:
            parse_digest(header)
        except AuthenticationFailed:
            return
        raise AssertionError(f"accepted: {header!r}")
    assert parse_digest(header) == expected
