"""The PAN side and the programs, hardened (issue 5 items 8, 10, 11, 13): real ``cpns``
processes and real sockets on loopback, nothing mocked."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest
from tests.integration.conftest import PASSWORD, Net

from cpns.errors import ErrorCode
from cpns.localnet import LocalDeployment
from cpns.messages.codec import decode, encode
from cpns.messages.model import (
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    Message,
    PNEHello,
)
from cpns.store.keystore import LocalKeyStore
from cpns.transport.framing import encode_frame

pytestmark = pytest.mark.integration

#: Upper bound of every poll in these tests, seconds.
DEADLINE = 60.0


def _gateway_status(net: LocalDeployment, name: str = "gw") -> dict[str, object]:
    view: dict[str, object] = json.loads(
        net.cpns("gateway", "status", "--data-dir", str(net.gateway_dir(name))).stdout
    )
    return view


def _wait_attached(net: LocalDeployment, pne_id: str, name: str = "gw") -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        attached = _gateway_status(net, name).get("attached")
        if isinstance(attached, list) and pne_id in attached:
            return
        time.sleep(0.2)
    raise AssertionError(f"{pne_id} never attached:\n{net.log(name)}\n{net.log(pne_id)}")


# -- item 13: secrets off the command line and out of others' reach; a stable PAN port -----


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_deployment_directory_and_tk_csv_are_private(tmp_path: Path) -> None:
    """Issue 5 item 13: the deployment helper (and so the demo) keeps its directory 0700
    and the manufacturer TK CSV 0600, whatever the umask; an existing directory is
    tightened too."""
    base = tmp_path / "net"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    net = LocalDeployment(base)
    with net.running():
        net.init_server(
            users=[("alice", "correct horse battery")], tk_records=[("pne-1", b"k" * 32)]
        )
    assert _mode(base) == 0o700
    assert _mode(base / "manufacturer-tk.csv") == 0o600


def test_device_init_keeps_the_tk_off_the_command_line(tmp_path: Path) -> None:
    """Issue 5 item 13: the deployment helper gives the TK to ``cpns device init`` on
    standard input: it is not among the process's arguments, and the device holds it."""
    net = LocalDeployment(tmp_path / "net")
    net.prepare_base()
    tk = bytes(range(32))
    result = net.init_device("pne-1", entity_id="pne-1", tk=tk)
    assert not any(tk.hex() in arg.lower() for arg in result.args)
    assert "--tk-stdin" in result.args
    assert LocalKeyStore.open_or_create(net.device_dir("pne-1"), "device").load()["tk"] == tk


def test_demo_keeps_its_directory_and_tk_csv_private(tmp_path: Path) -> None:
    """Issue 5 item 13: ``cpns demo --dir`` runs the whole flow and leaves its directory
    0700 and its TK CSV 0600; it draws the flow from the parties' logs too."""
    base = tmp_path / "demo"
    net = LocalDeployment(tmp_path / "unused")
    result = net.cpns("demo", "--dir", str(base), timeout=180.0, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _mode(base) == 0o700
    assert _mode(base / "manufacturer-tk.csv") == 0o600
    # docs/logging.md: the demo also draws its flow as the three programs logged it.
    assert "as the three parties logged it" in result.stdout
    assert "EUKeyAssignmentAck" in result.stdout


def test_restarted_gateway_listens_on_the_same_pan_port_and_the_pne_reconnects(
    running: Net,
) -> None:
    """Issue 5 item 13: a gateway restarted without --pan-port binds the port it had
    (here the free port picked at its first start and remembered), so a PNE agent that
    keeps running finds it again and re-attaches."""
    net = running.net
    net.init_device("pne-1", entity_id="pne-1", tk=running.tk["pne-1"])
    net.start_device("pne-1", pan_port=running.pan_port, once=False, timeout=300)
    _wait_attached(net, "pne-1")
    net.stop("gw")
    assert _gateway_status(net)["running"] is False
    port = net.start_gateway()
    assert port == running.pan_port
    _wait_attached(net, "pne-1")
    net.stop("gw", kill=True)  # a crash: the same port again
    assert net.start_gateway() == running.pan_port
    _wait_attached(net, "pne-1")


# -- item 11: the PAN listener's timeouts and caps -------------------------------------------


def test_control_socket_keeps_answering_with_200_idle_pan_links(running: Net) -> None:
    """Issue 5 item 11: with a 256-descriptor limit, 250 idle PAN links (from 50 loopback
    addresses) once left the gateway's control socket unable to accept. Now PAN links are
    capped below the limit (extra ones closed at once), so ``cpns gateway status`` still
    reaches the running daemon; links that never say hello are closed after
    pan_hello_timeout, and a real PNE then attaches."""
    net = running.net
    net.stop("gw")
    port = net.start_gateway(env={"CPNS_GATEWAY_PAN_HELLO_TIMEOUT": "5"}, fd_limit=256)
    links: list[socket.socket] = []
    try:
        for i in range(250):
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + i % 50}", 0))
            sock.settimeout(DEADLINE)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            links.append(sock)
        assert len(links) >= 200
        view = _gateway_status(net)
        assert view["running"] is True, net.log("gw")
        for sock in links:  # every idle link is closed by the gateway (EOF or reset)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in links:
            sock.close()
    net.init_device("pne-1", entity_id="pne-1", tk=running.tk["pne-1"])
    net.start_device("pne-1", pan_port=port, once=False, timeout=120)
    _wait_attached(net, "pne-1")
    assert _gateway_status(net)["running"] is True


# -- item 8: a fake PNE on the PAN ------------------------------------------------------------


class FakePNE:
    """A raw PAN connection that says hello with someone else's PNE ID."""

    def __init__(self, port: int, pne_id: str, source: str = "127.0.0.1") -> None:
        self.pne_id = pne_id
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.settimeout(DEADLINE)
        self.sock.connect(("127.0.0.1", port))
        self.send(PNEHello(txid=bytes(16), src=pne_id, dst="pan", has_ui=False, key_index=0))

    def send(self, message: Message) -> None:
        self.sock.sendall(encode_frame(encode(message)))

    def receive(self) -> Message | None:
        header = self._exact(4)
        if header is None:
            return None
        body = self._exact(struct.unpack(">I", header)[0])
        return None if body is None else decode(body)

    def _exact(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def refuse(self, notification: EUKeyAssignmentNotification) -> None:
        """Answer a Notification with an (unauthenticated) failure Ack."""
        self.send(
            EUKeyAssignmentAck(
                txid=notification.txid,
                src=self.pne_id,
                dst=notification.src,
                status=ErrorCode.AUTHENTICATION_FAILED,
                key_index=notification.key_index,
            )
        )

    def close(self) -> None:
        self.sock.close()


def test_fake_pne_hellos_neither_detach_the_real_pne_nor_decide_the_outcome(
    running: Net,
) -> None:
    """Issue 5 item 8: while the real PNE is attached, a fake PNE says hello with its ID
    100 times (fresh connections, up to 3 kept open). The real agent's link is never ended
    (it attaches exactly once), the fakes attached at the time get the Notification
    (sealed under the TK: useless to them) and answer it with failure Acks, and still
    ``cpns gateway assign --wait`` reports the key delivered: only the real PNE's Ack,
    whose MAC verifies, decides."""
    net = running.net
    net.init_device("pne-1", entity_id="pne-1", tk=running.tk["pne-1"])
    net.start_device("pne-1", pan_port=running.pan_port, once=True, timeout=120)
    _wait_attached(net, "pne-1")
    fakes: list[FakePNE] = []
    try:
        for i in range(100):
            fakes.append(FakePNE(running.pan_port, "pne-1", source=f"127.0.0.{2 + i % 20}"))
            if len(fakes) > 3:
                fakes.pop(0).close()
        result = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=30)
        for fake in fakes:  # those still attached got the Notification
            message = fake.receive()
            if isinstance(message, EUKeyAssignmentNotification):
                fake.refuse(message)
    finally:
        for fake in fakes:
            fake.close()
    assert result.returncode == 0, result.stdout + result.stderr + net.log("gw")
    assert "delivered" in result.stdout
    assert net.wait("pne-1", timeout=60) == 0, net.log("pne-1")
    assert net.log("pne-1").count("attached to") == 1, net.log("pne-1")


def test_fake_failure_ack_does_not_change_what_assign_wait_reports(running: Net) -> None:
    """Issue 5 item 8: with only a fake PNE attached, its failure Ack (no MAC: anyone can
    send one) is ignored; ``assign --wait`` keeps waiting and then reports TIMEOUT, no PNE
    proved receipt (exit 5), not AUTHENTICATION_FAILED. The real PNE attaching later, with
    the fake still attached, gets its key."""
    net = running.net
    fake = FakePNE(running.pan_port, "pne-2")
    try:
        _wait_attached(net, "pne-2")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                net.assign, pne_id="pne-2", user_id="alice", password=PASSWORD, wait=5
            )
            notification = fake.receive()
            assert isinstance(notification, EUKeyAssignmentNotification)
            fake.refuse(notification)
            result = pending.result(timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 5, output
        assert "TIMEOUT: no PNE proved receipt" in output
        assert "AUTHENTICATION_FAILED" in output  # named as what was ignored, not the outcome
        assert "1 unauthenticated answer(s) ignored" in output
        net.init_device("pne-2", entity_id="pne-2", tk=running.tk["pne-2"])
        net.start_device("pne-2", pan_port=running.pan_port, once=True, timeout=60)
        assert net.wait("pne-2", timeout=60) == 0, net.log("pne-2") + net.log("gw")
    finally:
        fake.close()
