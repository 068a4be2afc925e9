"""Digest interop against the real ``cpns server`` process (004 §5.x.2, DESIGN §2).

curl (``--digest``, SHA-256) and Python's own ``urllib.request.HTTPDigestAuthHandler``
(which only speaks MD5, so the server is configured for legacy clients with MD5 offered
first) must authenticate with the entity's EUKey and get 401 with a wrong key. The
server's certificate is checked by both (TLS 1.3).
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpns.localnet import LocalDeployment

pytestmark = [pytest.mark.interop, pytest.mark.integration]

PASSWORD = "interop password"


def _deploy(base: Path, digest: tuple[str, ...]) -> Iterator[tuple[LocalDeployment, str, str]]:
    net = LocalDeployment(base)
    with net.running():
        net.init_server(users=[("alice", PASSWORD)], digest=digest)
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
