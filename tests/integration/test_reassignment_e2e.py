"""The full TK-flow cycle over real processes (000 §7.5 with 003): a PNE without UI gets a
chain of two EUKeys, TK-based authentications exhaust it (the server answers
``reassign``), the operator re-assigns through the PN GW after the TK was ratcheted, and
the PNE authenticates again with the new chain. A CPNS Server, a PN GW daemon and a PNE
agent on loopback, each its own ``cpns`` process; nothing is mocked.
(docs/procedures/eukey-assignment.md "Re-assignment after TK-based authentications",
docs/procedures/tk-authentication.md resynchronisation rule 7, deviations D-003-13.)
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.conftest import PASSWORD

from cpns.localnet import LocalDeployment
from cpns.store.masterkey import write_private_file

pytestmark = pytest.mark.integration

GW = "gw-alice"
PNE = "pne-t1"


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[LocalDeployment, int]]:
    """Server with chain length 2 (AssignmentPolicy.chain_length from server.toml), alice's
    PN GW, and one PNE without UI holding EUKey_1 of its first chain, attached."""
    tk = secrets.token_bytes(32)
    net = LocalDeployment(tmp_path / "net")
    net.init_server(users=[("alice", PASSWORD)], tk_records=[(PNE, tk)])
    config = net.server_dir / "server.toml"
    write_private_file(config, (config.read_text() + "chain_length = 2\n").encode(), overwrite=True)
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id=GW, user_id="alice", password=PASSWORD, server_url=url)
        pan_port = net.start_gateway()
        net.init_device(PNE, entity_id=PNE, tk=tk)
        net.start_device(PNE, pan_port=pan_port, once=True, timeout=60)
        assigned = net.assign(pne_id=PNE, user_id="alice", password=PASSWORD, wait=30)
        assert assigned.returncode == 0, assigned.stdout + assigned.stderr
        assert net.wait(PNE) == 0
        net.start_device(
            PNE, pan_port=pan_port, once=False, timeout=600, extra=["--gateway-id", GW]
        )
        net.wait_attached([PNE])
        yield net, pan_port


def _establish(net: LocalDeployment, n: int) -> dict[str, object]:
    result, reply = net.establish(PNE, pn_id="pn-solo", timeout=30)
    assert result.returncode == 0, f"run {n}: " + result.stdout + result.stderr + net.log("gw")
    assert reply["status"] == "OK", reply
    members = reply["members"]
    assert isinstance(members, list)
    assert [(m["pne_id"], m["status"], m["flow"]) for m in members] == [(PNE, "OK", "tk")]
    return reply


def _positions(net: LocalDeployment) -> tuple[int, int, int, object]:
    """(PNE TK step, PNE key index, PN GW TK step, PN GW queued re-assignment)."""
    device = net.device_status(PNE)
    (gw,) = [p for p in net.gateway_status()["pnes"] if p["pne_id"] == PNE]
    return device["tk_step"], device["tk_key_index"], gw["tk_step"], gw["reassign"]


def _server_entity(net: LocalDeployment) -> dict[str, object]:
    shown = net.cpns("admin", "entity", "show", PNE, "--data-dir", str(net.server_dir))
    entity: dict[str, object] = json.loads(shown.stdout)
    return entity


def test_exhausted_chain_is_reassigned_after_ratchets_and_the_pne_authenticates_again(
    network: tuple[LocalDeployment, int],
) -> None:
    """000 + 003, rule 7: chain of 2; run 1 proves EUKey_1 (step 0 -> 1), run 2 proves
    EUKey_2 = EUKey_n (reassign queued at the PN GW), run 3 still works with EUKey_2 (the
    PNE keeps working meanwhile); the re-assignment carries the server's TK_3 and step 3
    (no label check: the record is ratcheted and the PNE is alice's, D-003-13); PN GW and
    PNE restart at (TK_3, 3) with EUKey_1 of the new chain; the server's step is still 3;
    run 4 authenticates with the new chain."""
    net, _ = network
    assert _positions(net) == (0, 1, 0, None)
    _establish(net, 1)
    assert _positions(net) == (1, 2, 1, None)
    _establish(net, 2)
    assert _positions(net) == (2, 2, 2, "CHAIN_EXHAUSTED")
    _establish(net, 3)  # EUKey_n keeps working until the re-assignment
    assert _positions(net) == (3, 2, 3, "CHAIN_EXHAUSTED")
    before = _server_entity(net)
    assert (before["tk_step"], before["key_index"], before["keys"]) == (3, 2, 2)

    # No label at hand: an empty claim code (the ratcheted record cannot check one).
    reassigned = net.assign(pne_id=PNE, user_id="alice", password=PASSWORD, wait=30, claim_code="")
    assert reassigned.returncode == 0, reassigned.stdout + reassigned.stderr + net.log("gw")
    assert _positions(net) == (3, 1, 3, None)
    after = _server_entity(net)
    assert after["epoch"] == 2
    assert (after["tk_step"], after["key_index"], after["keys"]) == (3, 1, 2)  # step kept

    _establish(net, 4)
    assert _positions(net) == (4, 2, 4, None)
    _establish(net, 5)
    assert _positions(net) == (5, 2, 5, "CHAIN_EXHAUSTED")  # the new chain's end, again


def _restart_agent(net: LocalDeployment, pan_port: int, *, restore: Path | None = None) -> None:
    """Stop the PNE's agent (the PN GW sees its link close), optionally put back a copy of
    its store, and start it again attached."""
    net.stop(PNE)
    deadline = time.monotonic() + 30
    while PNE in net.gateway_status().get("attached", []):
        assert time.monotonic() < deadline, "the PN GW still lists the stopped PNE"
        time.sleep(0.1)
    if restore is not None:
        shutil.rmtree(net.device_dir(PNE))
        shutil.copytree(restore, net.device_dir(PNE))
    net.start_device(PNE, pan_port=pan_port, once=False, timeout=600, extra=["--gateway-id", GW])
    net.wait_attached([PNE])


def test_pne_restored_from_an_old_backup_is_reassigned_and_authenticates_again(
    network: tuple[LocalDeployment, int], tmp_path: Path
) -> None:
    """N1 backup edge, rule 7: the PNE's store is backed up at step 0 with EUKey_1; two
    TK-based authentications move every party to step 2 and EUKey_2; the PNE is restored
    from the backup: its next run proves the old key, the server answers
    STALE_CREDENTIAL for it and the PN GW queues a re-assignment; the re-assignment (TK_2
    computed forward from the backup's step 0 by the PNE) brings it back, and it
    authenticates again."""
    net, pan_port = network
    backup = tmp_path / "pne-backup"
    net.stop(PNE)
    shutil.copytree(net.device_dir(PNE), backup)
    _restart_agent(net, pan_port)
    _establish(net, 1)
    _establish(net, 2)
    assert _positions(net)[:3] == (2, 2, 2)

    _restart_agent(net, pan_port, restore=backup)
    assert net.device_status(PNE)["tk_step"] == 0
    result, reply = net.establish(PNE, pn_id="pn-solo", timeout=30)
    assert result.returncode != 0
    assert (reply["status"], reply["members"]) == ("STALE_CREDENTIAL", []), reply
    assert _positions(net)[3] == "STALE_CREDENTIAL"
    assert _server_entity(net)["tk_step"] == 2  # the server did not move

    reassigned = net.assign(pne_id=PNE, user_id="alice", password=PASSWORD, wait=30)
    assert reassigned.returncode == 0, reassigned.stdout + reassigned.stderr + net.log("gw")
    assert _positions(net) == (2, 1, 2, None)
    _establish(net, 3)
    assert _positions(net) == (3, 2, 3, None)
