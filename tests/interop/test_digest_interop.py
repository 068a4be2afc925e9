"""The Digest core against real peers: Python's urllib and curl, over loopback HTTP.

A test-only HTTP server (``http.server``) drives :class:`DigestServer`: 401 with one
challenge per configured algorithm, 200 with ``Authentication-Info`` on success. TLS is
tested elsewhere; plain HTTP is enough to check the header dialects.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.error import HTTPError

import pytest

from cpns.errors import AuthenticationFailed
from cpns.protocol.digest import (
    DigestAlgorithm,
    DigestClient,
    DigestServer,
    DigestStale,
    compute_response,
    parse_auth_params,
    parse_digest,
)
from cpns.runtime import SystemRandom, wall_time

pytestmark = pytest.mark.interop

REALM = "cpns-interop@127.0.0.1"
USER = "gw-interop-0001"  # curl --user splits at the first colon
EUKEY_HEX = hashlib.sha256(b"interop EUKey").hexdigest()
WRONG_HEX = hashlib.sha256(b"another EUKey").hexdigest()


class DigestHTTPServer(ThreadingHTTPServer):
    """Loopback server that owns one DigestServer and records verified exchanges."""

    # Join handler threads on server_close(), so no thread outlives the test.
    daemon_threads = False
    block_on_close = True

    def __init__(self, digest: DigestServer) -> None:
        super().__init__(("127.0.0.1", 0), DigestHandler)
        self.digest = digest
        # The core is not thread-safe; this threaded host serialises verify() (digest.py).
        self.digest_lock = threading.Lock()
        self.rng = SystemRandom()
        #: (Authorization, Authentication-Info) of every verified request.
        self.verified: list[tuple[str, str]] = []


class DigestHandler(BaseHTTPRequestHandler):
    """401 with challenges, or 200 with Authentication-Info (RFC 7616 §3.3-§3.5)."""

    protocol_version = "HTTP/1.1"
    timeout = 10
    server: DigestHTTPServer

    def do_GET(self) -> None:
        digest = self.server.digest
        authorization = self.headers.get("Authorization")
        if authorization is None:
            self._unauthorized(stale=False)
            return
        try:
            with self.server.digest_lock:
                result = digest.verify(
                    method=self.command,
                    uri=self.path,
                    authorization=authorization,
                    lookup={USER: EUKEY_HEX}.get,
                    now=wall_time(),
                )
        except DigestStale:
            self._unauthorized(stale=True)
            return
        except AuthenticationFailed:
            self._unauthorized(stale=False)
            return
        self.server.verified.append((authorization, result.authentication_info))
        body = f"hello {result.username}\n".encode()
        self.send_response(200)
        self.send_header("Authentication-Info", result.authentication_info)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _unauthorized(self, *, stale: bool) -> None:
        body = b"unauthorized\n"
        self.send_response(401)
        for value in self.server.digest.challenge(
            now=wall_time(), rng=self.server.rng, stale=stale
        ):
            self.send_header("WWW-Authenticate", value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@contextmanager
def serving(*algorithms: DigestAlgorithm) -> Iterator[DigestHTTPServer]:
    """Run a DigestHTTPServer on 127.0.0.1 in a thread; stop and join it afterwards."""
    digest = DigestServer(realm=REALM, nonce_key=bytes(range(32)), algorithms=algorithms)
    httpd = DigestHTTPServer(digest)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def url_of(httpd: DigestHTTPServer, path: str = "/cpns/v1/ping?probe=1") -> str:
    host, port = httpd.server_address[:2]
    return f"http://{host!s}:{port}{path}"


def check_rspauth(authorization: str, authentication_info: str, password: str) -> None:
    """Recompute the server's rspauth from the client's own header (RFC 7616 §3.5)."""
    sent = parse_digest(authorization)
    info = parse_auth_params(authentication_info)
    expected = compute_response(
        algorithm=DigestAlgorithm(sent.get("algorithm", "MD5")),
        username=sent["username"],
        realm=sent["realm"],
        password=password,
        method="",
        uri=sent["uri"],
        nonce=sent["nonce"],
        nc=sent["nc"],
        cnonce=sent["cnonce"],
    )
    assert info["rspauth"] == expected
    assert (info["cnonce"], info["nc"]) == (sent["cnonce"], sent["nc"])


class ClosingDigestAuthHandler(urllib.request.HTTPDigestAuthHandler):
    """urllib's handler, but it closes each 401 response before retrying.

    The stdlib handler leaves the 401's socket to the garbage collector, which pytest
    (filterwarnings=error) reports as an unclosed-socket ResourceWarning.
    """

    def http_error_401(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        fp.read()
        fp.close()
        return super().http_error_401(req, fp, code, msg, headers)


def urllib_get(url: str, password: str) -> tuple[int, str, str | None]:
    """GET with urllib's HTTPDigestAuthHandler; no proxy from the environment."""
    passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    passwords.add_password(None, url, USER, password)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), ClosingDigestAuthHandler(passwords)
    )
    with opener.open(url, timeout=10) as response:
        body = response.read().decode()
        return response.status, body, response.headers.get("Authentication-Info")


def test_urllib_digest_md5_legacy() -> None:
    """RFC 2617 via urllib: it reads only the first challenge and knows only MD5, so a
    legacy server lists MD5 first; the right hex EUKey gets 200, a wrong one 401."""
    with serving(DigestAlgorithm.MD5, DigestAlgorithm.SHA_256) as httpd:
        status, body, info = urllib_get(url_of(httpd), EUKEY_HEX)
        assert (status, body) == (200, f"hello {USER}\n")
        assert info is not None
        (authorization, sent_info) = httpd.verified[-1]
        assert sent_info == info
        assert parse_digest(authorization)["algorithm"] == "MD5"
        check_rspauth(authorization, info, EUKEY_HEX)

        verified = len(httpd.verified)
        with pytest.raises(HTTPError) as failure:
            urllib_get(url_of(httpd), WRONG_HEX)
        failure.value.close()
        assert failure.value.code == 401
        assert len(httpd.verified) == verified


@pytest.fixture
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


def curl_get(curl: str, url: str, password: str) -> tuple[int, str]:
    """GET with ``curl --digest``; returns the final status and all response headers."""
    completed = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--digest",
            "--user",
            f"{USER}:{password}",
            "--dump-header",
            "-",
            "--output",
            "/dev/null",
            "--write-out",
            "\n%{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    headers, _, status = completed.stdout.rpartition("\n")
    return int(status), headers


def test_curl_digest_sha256(curl: str) -> None:
    """RFC 7616 via curl --digest: with SHA-256 only, the right hex EUKey gets 200 and a
    correct rspauth; a wrong one ends in 401."""
    with serving(DigestAlgorithm.SHA_256) as httpd:
        status, headers = curl_get(curl, url_of(httpd), EUKEY_HEX)
        assert status == 200, headers
        authorization, info = httpd.verified[-1]
        assert parse_digest(authorization)["algorithm"] == "SHA-256"
        assert f"authentication-info: {info}".lower() in headers.lower()
        check_rspauth(authorization, info, EUKEY_HEX)

        verified = len(httpd.verified)
        status, headers = curl_get(curl, url_of(httpd), WRONG_HEX)
        assert status == 401, headers
        assert len(httpd.verified) == verified


def test_digest_client_over_keep_alive() -> None:
    """RFC 7616 §3.4/§3.5 over a real HTTP/1.1 connection: one 401, then the nonce is
    reused with nc 1, 2, 3 and every rspauth verifies."""
    rng = SystemRandom()
    with serving(DigestAlgorithm.SHA_256) as httpd:
        host, port = httpd.server_address[:2]
        connection = http.client.HTTPConnection(str(host), port, timeout=10)
        try:
            client = DigestClient(USER, EUKEY_HEX)
            connection.request("GET", "/cpns/v1/a")
            response = connection.getresponse()
            response.read()
            assert response.status == 401
            challenges: list[str] | None = response.headers.get_all("WWW-Authenticate")
            for path in ("/cpns/v1/a", "/cpns/v1/b", "/cpns/v1/c"):
                header = client.authorization(
                    challenges=challenges, method="GET", uri=path, rng=rng
                )
                challenges = None
                connection.request("GET", path, headers={"Authorization": header})
                response = connection.getresponse()
                response.read()
                assert response.status == 200
                client.verify_response(response.headers["Authentication-Info"])
        finally:
            connection.close()
        sent = [parse_digest(authorization) for authorization, _ in httpd.verified]
        assert [p["nc"] for p in sent] == ["00000001", "00000002", "00000003"]
        assert len({p["nonce"] for p in sent}) == 1
