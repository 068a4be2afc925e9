"""``cpns admin pn list|show [--json]`` (issue 6 item 6): the PN inventory as the operator
sees it, on each back end: PN ID, PN GW, owner, member and failure counts, and per PNE its
flow, status and time; a PNE that failed is shown as such and never as a member. Exit
codes follow cpns.cli.main (0 done, 2 no such PN or not a server data directory)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpns.cli.main import EXIT_OK, EXIT_USAGE, main
from cpns.records import FLOW_NONE, FLOW_RAND_HASH, FLOW_TK, MEMBER, PNMember
from cpns.server.config import load_server_config
from cpns.server.main import open_store

#: 2026-12-01 00:00:00 UTC.
T0 = 1_796_083_200


@pytest.fixture(autouse=True)
def quiet_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep main()'s log handler out of capsys's streams; a wide console, so the text
    tables are never wrapped whatever the terminal of the test run."""
    monkeypatch.setenv("COLUMNS", "160")
    logger = logging.getLogger("cpns")
    saved = logger.handlers[:]
    logger.handlers[:] = [logging.NullHandler()]
    yield
    logger.handlers[:] = saved


@pytest.fixture(params=["sqlite", "postgresql"])
def server_dir(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Path:
    """A server data directory on each back end, with two PNs of alice and one of bob."""
    data = tmp_path / "srv"
    argv = ["server", "init", "--data-dir", str(data), "--port", "0"]
    if request.param == "postgresql":
        argv += ["--database", request.getfixturevalue("pg_dsn")]
    assert main(argv) == EXIT_OK
    home = [
        PNMember(pne_id="pne-1", flow=FLOW_TK, status=MEMBER, at=T0),
        PNMember(pne_id="pne-2", flow=FLOW_RAND_HASH, status=MEMBER, at=T0),
        PNMember(pne_id="pne-3", flow=FLOW_RAND_HASH, status="AUTHENTICATION_FAILED", at=T0),
        PNMember(pne_id="pne-bob", flow=FLOW_NONE, status="POLICY_DENIED", at=T0),
    ]
    with open_store(load_server_config(data)) as store:
        store.write(lambda tx: tx.record_pn("pn-home", "gw-alice", "alice", T0, home))
        store.write(lambda tx: tx.record_pn("pn-car", "gw-alice", "alice", T0 + 60, home[:1]))
        store.write(lambda tx: tx.record_pn("pn-bob", "gw-bob", "bob", T0 + 120, []))
    capsys.readouterr()  # what init printed
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pn_list_json_and_owner_filter(
    capsys: pytest.CaptureFixture[str], server_dir: Path
) -> None:
    """``pn list --json``: every PN ordered by PN ID with its PN GW, owner, member and
    failure counts and times; ``--owner`` and ``--gateway`` filter."""
    base = ("admin", "pn", "list", "--data-dir", str(server_dir), "--json")
    code, out, _ = run(capsys, *base)
    assert code == EXIT_OK
    assert json.loads(out) == [
        {
            "pn_id": "pn-bob",
            "gateway_id": "gw-bob",
            "owner": "bob",
            "created_at": T0 + 120,
            "updated_at": T0 + 120,
            "members": 0,
            "failed": 0,
        },
        {
            "pn_id": "pn-car",
            "gateway_id": "gw-alice",
            "owner": "alice",
            "created_at": T0 + 60,
            "updated_at": T0 + 60,
            "members": 1,
            "failed": 0,
        },
        {
            "pn_id": "pn-home",
            "gateway_id": "gw-alice",
            "owner": "alice",
            "created_at": T0,
            "updated_at": T0,
            "members": 2,
            "failed": 2,
        },
    ]
    _, out, _ = run(capsys, *base, "--owner", "alice")
    assert [p["pn_id"] for p in json.loads(out)] == ["pn-car", "pn-home"]
    _, out, _ = run(capsys, *base, "--gateway", "gw-bob")
    assert [p["pn_id"] for p in json.loads(out)] == ["pn-bob"]
    _, out, _ = run(capsys, *base, "--owner", "carol")
    assert json.loads(out) == []


def test_pn_list_text_table(capsys: pytest.CaptureFixture[str], server_dir: Path) -> None:
    """``pn list``: a table with PN ID, PN GW, owner, members, failed and the last update
    in UTC."""
    code, out, _ = run(capsys, "admin", "pn", "list", "--data-dir", str(server_dir))
    assert code == EXIT_OK
    for heading in ("PN ID", "PN GW", "owner", "members", "failed", "updated"):
        assert heading in out
    [home] = [line for line in out.splitlines() if "pn-home" in line]
    assert [c.strip() for c in home.split("│")[1:-1]] == [
        "pn-home",
        "gw-alice",
        "alice",
        "2",
        "2",
        "2026-12-01 00:00:00Z",
    ]


def test_pn_show_json_splits_members_and_failures(
    capsys: pytest.CaptureFixture[str], server_dir: Path
) -> None:
    """``pn show --json``: each member and each failure with its flow (null when refused
    before a flow was chosen), status and time; a policy-denied PNE is not a member."""
    argv = ("admin", "pn", "show", "pn-home", "--data-dir", str(server_dir), "--json")
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK
    view = json.loads(out)
    assert (view["pn_id"], view["gateway_id"], view["owner"]) == ("pn-home", "gw-alice", "alice")
    assert view["members"] == [
        {"pne_id": "pne-1", "flow": "tk", "status": "member", "at": T0},
        {"pne_id": "pne-2", "flow": "rand-hash", "status": "member", "at": T0},
    ]
    assert view["failed"] == [
        {"pne_id": "pne-3", "flow": "rand-hash", "status": "AUTHENTICATION_FAILED", "at": T0},
        {"pne_id": "pne-bob", "flow": None, "status": "POLICY_DENIED", "at": T0},
    ]


def test_pn_show_text(capsys: pytest.CaptureFixture[str], server_dir: Path) -> None:
    """``pn show``: a summary line, then one row per PNE (members first) with member yes/no,
    flow ("-" for none), status and time."""
    code, out, _ = run(capsys, "admin", "pn", "show", "pn-home", "--data-dir", str(server_dir))
    assert code == EXIT_OK
    assert "PN pn-home: PN GW gw-alice, owner alice, 2 member(s), 2 failed" in out
    rows = [
        [c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "pne-" in line
    ]
    assert rows == [
        ["pne-1", "yes", "tk", "member", "2026-12-01 00:00:00Z"],
        ["pne-2", "yes", "rand-hash", "member", "2026-12-01 00:00:00Z"],
        ["pne-3", "no", "rand-hash", "AUTHENTICATION_FAILED", "2026-12-01 00:00:00Z"],
        ["pne-bob", "no", "-", "POLICY_DENIED", "2026-12-01 00:00:00Z"],
    ]


def test_pn_show_of_an_unknown_pn_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], server_dir: Path
) -> None:
    """Exit 2 with a message naming the PN, as ``admin entity show`` for an unknown ID; the
    same for a directory that is not a server's."""
    code, out, err = run(capsys, "admin", "pn", "show", "pn-x", "--data-dir", str(server_dir))
    assert (code, out) == (EXIT_USAGE, "")
    assert "no PN 'pn-x'" in err
    code, _, err = run(capsys, "admin", "pn", "list", "--data-dir", str(server_dir.parent))
    assert code == EXIT_USAGE
    assert "run 'cpns server init' first" in err
