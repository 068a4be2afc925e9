"""PN Establishment end to end over real processes (002 §7.5.4, 000 §7.5): a CPNS Server,
a PN GW daemon and eight PNE agents on loopback, each its own ``cpns`` process; nothing is
mocked. Four PNEs have no UI (their EUKey chain came through the PN GW, 003: TK flow) and
four enrolled with UI through the PN GW's relay (004 §5.x.1: rand/hash flow).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.conftest import PASSWORD

from cpns.localnet import LocalDeployment

pytestmark = pytest.mark.integration

GW = "gw-alice"
TK_PNES = [f"pne-t{i}" for i in range(1, 5)]
UI_PNES = [f"pne-u{i}" for i in range(1, 5)]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[LocalDeployment, int]]:
    """Server, alice's PN GW, and eight PNEs holding their EUKeys, every agent attached."""
    tks = {p: secrets.token_bytes(32) for p in TK_PNES}
    net = LocalDeployment(tmp_path / "net")
    net.init_server(users=[("alice", PASSWORD)], tk_records=sorted(tks.items()))
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id=GW, user_id="alice", password=PASSWORD, server_url=url)
        pan_port = net.start_gateway()
        for pne in TK_PNES:  # 003: the PN GW assigns, the agent installs EUKey_1
            net.init_device(pne, entity_id=pne, tk=tks[pne])
            net.start_device(pne, pan_port=pan_port, once=True, timeout=60)
            assigned = net.assign(pne_id=pne, user_id="alice", password=PASSWORD, wait=30)
            assert assigned.returncode == 0, assigned.stdout + assigned.stderr
            assert net.wait(pne) == 0
        for pne in UI_PNES:  # 004 §5.x.1 through the PN GW's relay
            net.enroll_device(
                pne,
                entity_id=pne,
                user_id="alice",
                password=PASSWORD,
                pan_port=pan_port,
                check=True,
            )
        for pne in TK_PNES + UI_PNES:
            net.start_device(
                pne, pan_port=pan_port, once=False, timeout=600, extra=["--gateway-id", GW]
            )
        net.wait_attached(TK_PNES + UI_PNES)
        yield net, pan_port


def _members(reply: dict[str, object]) -> dict[str, tuple[str, str]]:
    members = reply["members"]
    assert isinstance(members, list)
    return {m["pne_id"]: (m["status"], m["flow"]) for m in members}


def test_eight_pnes_of_both_kinds_establish_a_pn_then_establish_again(
    network: tuple[LocalDeployment, int],
) -> None:
    """002 §7.5.4 / 000 §7.5: one PN with 8 PNEs of both credential kinds, the originator
    asking for a LocalEUKey and then authenticating with its PN GW ("7.5.5", the PAN is
    not a Secure PAN); every party records the PN. Then a second establishment of the
    same PNEs works: the TK ratchet and the EUKey chain advanced on every side (server,
    PN GW, PNE) and stay in step, across a restart of the PN GW daemon."""
    net, _ = network
    everyone = TK_PNES + UI_PNES
    origin = "pne-u1"
    result, reply = net.establish(
        origin,
        pn_id="pn-home",
        invite=[p for p in everyone if p != origin],
        local_eukey=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr + net.log("gw")
    assert reply["status"] == "OK"
    assert _members(reply) == {
        **{p: ("OK", "tk") for p in TK_PNES},
        **{p: ("OK", "rand-hash") for p in UI_PNES},
    }
    assert reply["local"] == "OK"
    # The flow the originator started is carried through the PN GW to the server and to
    # every invited PNE (docs/logging.md: cpns trace draws it).
    flow = f"flow={reply['flow_id']}"
    assert flow in net.log("gw")
    assert flow in net.log("server")
    assert flow in net.log("pne-t3")

    # The server's PN inventory.
    shown = net.cpns("admin", "pn", "show", "pn-home", "--json", "--data-dir", str(net.server_dir))
    inventory = json.loads(shown.stdout)
    assert inventory["gateway_id"] == GW
    assert sorted(m["pne_id"] for m in inventory["members"]) == sorted(everyone)
    assert inventory["failed"] == []

    # The PN GW: routing table, memberships, the originator's LocalEUKey session.
    gateway = net.gateway_status()
    assert gateway["pns"] == {"pn-home": sorted(everyone)}
    by_pne = {p["pne_id"]: p for p in gateway["pnes"]}
    assert [p["pn_id"] for p in by_pne["pne-t1"]["pns"]] == ["pn-home"]
    assert by_pne["pne-t1"]["tk_step"] == 1
    # A PNE with UI has no 003 record at the PN GW until it joins a PN: it has one now.
    local = by_pne[origin]
    assert local["pns"][0]["local_eukey"] is True
    assert local["pns"][0]["local_session"] is True

    # Each PNE: a member holding a session key; TK PNEs moved one step and one key.
    for pne in everyone:
        status = net.device_status(pne)
        (pn,) = status["pns"]
        assert (pn["pn_id"], pn["status"], pn["session_key"]) == ("pn-home", "member", True)
        if pne in TK_PNES:
            assert (status["tk_step"], status["tk_key_index"]) == (1, 2)
    assert net.device_status(origin)["pns"][0]["local_session"] is True

    # The PN GW restarts: its TK states, memberships and routing table are in its store.
    net.stop("gw")
    net.start_gateway()
    net.wait_attached(everyone)
    assert net.gateway_status()["pns"] == {"pn-home": sorted(everyone)}

    # A second establishment, from a TK PNE: the ratchet advanced everywhere, and works.
    result, again = net.establish("pne-t1", pn_id="pn-home", invite=everyone[1:])
    assert result.returncode == 0, result.stdout + result.stderr + net.log("gw")
    assert {s for s, _ in _members(again).values()} == {"OK"}
    for pne in TK_PNES:
        status = net.device_status(pne)
        assert (status["tk_step"], status["tk_key_index"]) == (2, 3)
    assert {p["pne_id"]: p["tk_step"] for p in net.gateway_status()["pnes"]}["pne-t2"] == 2
    for pne in TK_PNES:  # the server's index of each chain moved with them
        shown = net.cpns("admin", "entity", "show", pne, "--data-dir", str(net.server_dir))
        assert json.loads(shown.stdout)["key_index"] == 3

    # No key, TK, rand or hash in any log: only IDs, txids and statuses.
    for name in ("gw", "server", origin, "pne-t1"):
        assert "local_eukey=" not in net.log(name)
        assert "sk=" not in net.log(name)


def test_cpns_demo_json_summary(tmp_path: Path) -> None:
    """``cpns demo --pnes 3 --json`` (issue 6 item 7): one JSON document with the members,
    the flow each used and the outcome, after assigning (003) and enrolling (004) PNEs of
    both kinds and establishing one PN with all of them."""
    net = LocalDeployment(tmp_path / "unused")
    result = net.cpns(
        "demo",
        "--pnes",
        "3",
        "--json",
        "--dir",
        str(tmp_path / "demo"),
        timeout=300.0,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "OK"
    assert [(m["pne_id"], m["credential"], m["flow"], m["status"]) for m in summary["members"]] == [
        ("headset-01", "tk", "tk", "OK"),
        ("watch-01", "ui", "rand-hash", "OK"),
        ("sensor-02", "tk", "tk", "OK"),
    ]
    assert summary["local_eukey"] == {"pne_id": "headset-01", "status": "OK"}
    assert summary["views"]["gateway"] == {
        summary["pn_id"]: ["headset-01", "sensor-02", "watch-01"]
    }
    assert len(summary["views"]["server"]["members"]) == 3
