"""Digest interop against the real ``cpns server`` process (004 §5.x.2, DESIGN §2).

curl (``--digest``, SHA-256) and Python's own ``urllib.request.HTTPDigestAuthHandler``
(which only speaks MD5, so the server is configured for legacy clients with MD5 offered
first) must authenticate with the entity's EUKey and get 401 with a wrong key. The
server's certificate is checked by both (TLS 1.3). curl also completes a real CPNS
exchange on the protocol endpoint (``POST /cpns/v1/messages``), and a client sending
concurrent requests on one nonce (counters arriving out of order) gets no spurious 401.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.localnet import LocalDeployment
from cpns.messages.codec import decode, encode
from cpns.messages.model import EUKeyAssignmentResponse
from cpns.protocol import key_assignment as ka
from cpns.protocol.digest import DigestClient
from cpns.runtime import SystemRandom

pytestmark = [pytest.mark.interop, pytest.mark.integration]

PASSWORD = "interop password"


#: The TK of the PNE without UI that the curl exchange assigns a key chain to.
PNE_TK = bytes(range(50, 82))


def _deploy(base: Path, digest: tuple[str, ...]) -> Iterator[tuple[LocalDeployment, str, str]]:
    net = LocalDeployment(base)
    with net.running():
        net.init_server(users=[("alice", PASSWORD)], digest=digest, tk_records=[("pne-9", PNE_TK)])
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-1", user_id="alice", password=PASSWORD, server_url=url)
        shown = json.loads(
            net.cpns(
                "admin",
                "entity",
                "show",
                "gw-1",
                "--show-secrets",
                "--data-dir",
                str(net.server_dir),
            ).stdout
        )
        yield net, url, shown["eukeys"][0]


@pytest.fixture
def sha256_server(tmp_path: Path) -> Iterator[tuple[LocalDeployment, str, str]]:
    """A server offering only SHA-256 Digest, with gw-1 enrolled."""
    yield from _deploy(tmp_path / "sha", ("SHA-256",))


@pytest.fixture
def legacy_server(tmp_path: Path) -> Iterator[tuple[LocalDeployment, str, str]]:
    """A server configured for legacy clients: MD5 offered first, then SHA-256."""
    yield from _deploy(tmp_path / "md5", ("MD5", "SHA-256"))


def _curl(net: LocalDeployment, url: str, user: str, key: str) -> tuple[int, str]:
    out = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--digest",
            "--user",
            f"{user}:{key}",
            "--cacert",
            str(net.ca_file),
            "--tlsv1.3",
            "--write-out",
            "\n%{http_code}",
            f"{url}/cpns/v1/whoami",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sha256_digest(sha256_server: tuple[LocalDeployment, str, str]) -> None:
    """004 §5.x.2 / RFC 7616: curl authenticates with SHA-256 Digest keyed by the EUKey
    (hex) and gets 401 with a wrong key."""
    net, url, key = sha256_server
    code, body = _curl(net, url, "gw-1", key)
    assert code == 200
    assert json.loads(body) == {"entity_id": "gw-1"}
    wrong = "0" * 64 if key != "0" * 64 else "1" * 64
    assert _curl(net, url, "gw-1", wrong)[0] == 401
    assert _curl(net, url, "nobody", key)[0] == 401


def _urllib(net: LocalDeployment, url: str, user: str, key: str) -> int:
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, url, user, key)
    context = ssl.create_default_context(cafile=str(net.ca_file))
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), urllib.request.HTTPDigestAuthHandler(manager)
    )
    try:
        with opener.open(f"{url}/cpns/v1/whoami", timeout=30) as response:
            assert json.loads(response.read()) == {"entity_id": user}
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def test_python_urllib_digest(legacy_server: tuple[LocalDeployment, str, str]) -> None:
    """RFC 2617 (legacy, only when configured): Python's own Digest client (MD5 only)
    authenticates with the EUKey and gets 401 with a wrong key."""
    net, url, key = legacy_server
    assert _urllib(net, url, "gw-1", key) == 200
    assert _urllib(net, url, "gw-1", "f" * 64) == 401


def test_md5_refused_unless_configured(sha256_server: tuple[LocalDeployment, str, str]) -> None:
    """DESIGN §2: MD5 is accepted for legacy clients only when configured; a server
    offering SHA-256 only never lets urllib's MD5 client in."""
    net, url, key = sha256_server
    with pytest.raises(ValueError, match="Unsupported digest"):
        _urllib(net, url, "gw-1", key)


def _assignment_request(gateway_key: str, *, pne: str = "pne-9") -> bytes:
    """A real EUKey Assignment Request of gw-1 for alice's PNE (003 §7.4.2.1.1.1), built by
    the library's PN GW machine with the user's password key (and, with claim binding,
    the claim code from the PNE's label)."""
    gateway = ka.EUKeyAssignmentGateway(
        gateway_id="gw-1",
        gateway_eukey=bytes.fromhex(gateway_key),
        server_id="cpns-server",
        rng=SystemRandom(),
    )
    gateway.start(
        pne_id=pne,
        user_id="alice",
        password_key=password_key(PASSWORD, realm="cpns", user_id="alice"),
        claim_key=ka.claim_key(ka.claim_code(PNE_TK, pne)),  # the code on the PNE's label
        now=int(time.time()),
    )
    [message] = gateway.messages_to_send()
    return encode(message)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_completes_a_cpns_exchange_on_the_protocol_endpoint(
    sha256_server: tuple[LocalDeployment, str, str], tmp_path: Path
) -> None:
    """Issue 5 item 14 / 004 §5.x.2: ``curl --digest -u ENTITY:EUKEYHEX --data-binary
    @req.cbor`` on POST /cpns/v1/messages: curl's empty first leg is challenged (it was
    answered 400 when the body was decoded first), its second leg carries a real EUKey
    Assignment Request and gets the server's EUKey Assignment Response with status OK."""
    net, url, key = sha256_server
    request = tmp_path / "req.cbor"
    request.write_bytes(_assignment_request(key))
    response = tmp_path / "resp.cbor"
    out = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--digest",
            "-u",
            f"gw-1:{key}",
            "--data-binary",
            f"@{request}",
            "-H",
            "Content-Type: application/cbor",
            "--cacert",
            str(net.ca_file),
            "--tlsv1.3",
            "--output",
            str(response),
            "--write-out",
            "%{http_code}",
            f"{url}/cpns/v1/messages",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == "200", out.stderr
    answer = decode(response.read_bytes())
    assert isinstance(answer, EUKeyAssignmentResponse)
    assert answer.status == ErrorCode.OK
    assert answer.pne_id == "pne-9"


def test_concurrent_requests_on_one_nonce_get_no_spurious_401(
    sha256_server: tuple[LocalDeployment, str, str],
) -> None:
    """Issue 5 item 14 / RFC 7616 §5.4: a client that sends concurrent requests on one
    nonce (one Digest state shared by several connections) has its counters arrive out of
    order: nc 3, 1, 2 one after the other, then 12 more at once from 12 threads, are each
    accepted (200, never a spurious 401); a replayed counter is still refused."""
    net, url, key = sha256_server
    context = ssl.create_default_context(cafile=str(net.ca_file))
    uri = "/cpns/v1/whoami"
    with httpx.Client(verify=context, timeout=30) as http:
        first = http.get(url + uri)
        assert first.status_code == 401
        client = DigestClient("gw-1", key)
        rng = SystemRandom()
        challenges = first.headers.get_list("www-authenticate")
        headers = [
            client.authorization(
                challenges=challenges if i == 0 else None, method="GET", uri=uri, rng=rng
            )
            for i in range(15)
        ]
        for index in (2, 0, 1):
            reply = http.get(url + uri, headers={"authorization": headers[index]})
            assert reply.status_code == 200, (index, reply.text)
        assert http.get(url + uri, headers={"authorization": headers[1]}).status_code == 401

    later = headers[3:]
    random.Random(os.getpid()).shuffle(later)
    codes: list[int] = []
    start = threading.Barrier(len(later))

    def send(header: str) -> None:
        with httpx.Client(verify=context, timeout=30) as own:  # one connection per thread
            start.wait(timeout=30)
            codes.append(own.get(url + uri, headers={"authorization": header}).status_code)

    threads = [threading.Thread(target=send, args=(h,)) for h in later]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert codes == [200] * len(later)
