"""Logs and tracing end to end (docs/logging.md): the real three programs with JSON logs
through an EUKey assignment, then ``cpns trace`` on their log files.

Nothing is mocked: server, PN GW daemon and PNE agent are ``cpns`` processes on loopback,
the server's store is SQLite or a fresh database of the session's PostgreSQL cluster.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.conftest import PASSWORD, Net, _make

from cpns.cli.diagram import LIFELINE
from cpns.localnet import LocalDeployment
from cpns.store.keystore import LocalKeyStore

pytestmark = pytest.mark.integration

DEADLINE = 60.0


@pytest.fixture(params=["sqlite", "postgresql"])
def json_net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Server, enrolled gateway daemon, every program logging JSON (CPNS_LOG_FORMAT)."""
    database = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    net, tks = _make(tmp_path / "net", database=database)
    net.env["CPNS_LOG_FORMAT"] = "json"
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-alice", user_id="alice", password=PASSWORD, server_url=url)
        pan_port = net.start_gateway()
        yield Net(net, url, pan_port, tks)


def _wait_attached(net: LocalDeployment, pne_id: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        status = net.cpns("gateway", "status", "--data-dir", str(net.gateway_dir()))
        view = json.loads(status.stdout)
        if pne_id in view.get("attached", []):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pne_id} never attached:\n{net.log('gw')}\n{net.log(pne_id)}")


def _arrows(diagram: str) -> list[tuple[str, str, str]]:
    """(from, to, label) of each arrow row of a ``cpns trace`` diagram."""
    cols = {x: name for name, x in LIFELINE.items()}
    out = []
    for row in diagram.splitlines():
        body = row[: LIFELINE["SRV"] + 1]
        head = body.find(">")
        tail = body.find("<")
        if head < 0 and tail < 0:
            continue
        ends = [x for x in cols if x < len(body) and body[x] == "|"]
        if head >= 0:  # left to right: the arrow ends at the lifeline after '>'
            dst = min(x for x in cols if x > head)
            src = max(x for x in ends if x < head)
        else:
            dst = max(x for x in cols if x < tail)
            src = min(x for x in ends if x > tail)
        label = body[min(src, dst) + 1 : max(src, dst)].strip("-<> ")
        out.append((cols[src], cols[dst], label))
    return out


def _outcomes(diagram: str) -> list[str]:
    """The text under each arrow (the row right after it)."""
    rows = diagram.splitlines()
    found = []
    for i, row in enumerate(rows[:-1]):
        body = row[: LIFELINE["SRV"] + 1]
        if ">" in body or "<" in body:
            found.append(rows[i + 1][: LIFELINE["SRV"]].replace("|", " ").strip())
    return found


def test_one_flow_is_traced_from_the_pne_through_the_gateway_to_the_server(
    json_net: Net,
) -> None:
    """docs/logging.md: the PNE starts the flow (its PNEHello carries the flow ID), the PN
    GW continues it for the assignment, the server echoes it; every program logs JSON
    lines carrying it; ``cpns trace ID`` on the three log files draws each hop in order
    with its outcome; the server's audit record stores the same ID; and no JSON log line
    holds a secret."""
    net = json_net.net
    net.init_device("pne-1", entity_id="pne-1", tk=json_net.tk["pne-1"])
    net.start_device("pne-1", pan_port=json_net.pan_port, once=True, timeout=60)
    _wait_attached(net, "pne-1")
    result = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=30)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"flow ([0-9a-f]{16})", result.stdout)
    assert match, result.stdout
    flow = match.group(1)
    assert net.wait("pne-1", timeout=60) == 0, net.log("pne-1")
    shown = json.loads(
        net.cpns(
            "admin", "entity", "show", "pne-1", "--show-secrets", "--data-dir", str(net.server_dir)
        ).stdout
    )
    net.stop_all()
    gateway_key = LocalKeyStore.open_or_create(net.gateway_dir(), "gateway").load()["eukey"]

    # The PNE started the flow: its hello carried the ID the gateway then used.
    pne_lines = [json.loads(line) for line in net.log("pne-1").splitlines() if line]
    hello = [ln for ln in pne_lines if ln.get("type") == "PNE_HELLO" and ln.get("dir") == "sent"]
    assert hello, pne_lines
    assert hello[0]["flow"] == flow

    logs = [net.base / f"{name}.log" for name in ("pne-1", "gw", "server")]
    traced = net.cpns("trace", flow, *map(str, logs))
    diagram = traced.stdout
    assert _arrows(diagram) == [
        ("PNE", "GW", "PNEHello"),
        ("GW", "SRV", "EUKeyAssignmentRequest"),
        ("SRV", "GW", "EUKeyAssignmentResponse"),
        ("GW", "PNE", "EUKeyAssignmentNotification"),
        ("PNE", "GW", "EUKeyAssignmentAck"),
    ], diagram
    assert _outcomes(diagram) == ["delivered", "delivered", "OK", "OK", "OK"], diagram
    for entity in ("pne-1", "gw-alice", "cpns-server"):
        assert entity in diagram

    # The audit record of the assignment carries the same flow ID.
    audit = [
        json.loads(line)
        for line in net.cpns(
            "admin", "audit", "--flow", flow, "--data-dir", str(net.server_dir)
        ).stdout.splitlines()
    ]
    assert [(a["procedure"], a["outcome"], a["flow"]) for a in audit] == [
        ("eukey-assignment-tk-003", "OK", flow)
    ]

    # Every line of the three programs is one JSON object with the documented fields, the
    # party is right, and no secret is in any of them.
    secrets_hex = [json_net.tk["pne-1"].hex(), *shown["eukeys"], gateway_key.hex()]
    for name, party in (("pne-1", "pne"), ("gw", "gateway"), ("server", "server")):
        text = net.log(name)
        for raw in text.splitlines():
            line = json.loads(raw)
            assert {"ts", "level", "party", "logger", "msg"} <= set(line), raw
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), raw
            assert line["party"] == party, raw
        for value in secrets_hex:
            assert value not in text
            assert value[:16] not in text
        assert PASSWORD not in text
