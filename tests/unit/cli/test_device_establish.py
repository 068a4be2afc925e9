"""``cpns device establish`` (issue 6 item 7): it asks the running agent over its control
socket and prints each member's outcome; exit codes scripts can trust. The agent side here
is the real control socket in a thread, with a participant whose outcome is given."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tests.helpers import FixedRandom

from cpns.cli.main import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, main
from cpns.device.establishment import (
    AGENT_SOCKET,
    AgentControl,
    EstablishResult,
    PNEParticipant,
)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Keep main()'s stderr handler out of capsys's streams."""
    logger = logging.getLogger("cpns")
    saved = logger.handlers[:]
    logger.handlers[:] = [logging.NullHandler()]
    yield
    logger.handlers[:] = saved


class _Given(PNEParticipant):
    """A participant whose establishment ends in a given result."""

    def __init__(self, result: EstablishResult) -> None:
        super().__init__(_Holder(), rng=FixedRandom(0), clock=lambda: 0)
        self.result = result
        self.asked: list[tuple[str, tuple[str, ...], bool]] = []

    async def establish(
        self,
        pn_id: str,
        invite: Sequence[str] = (),
        *,
        local_eukey: bool = False,
        timeout: float = 60.0,
    ) -> EstablishResult:
        self.asked.append((pn_id, tuple(invite), local_eukey))
        return self.result


class _Holder:
    def __init__(self) -> None:
        self.data: dict[str, object] = {"entity_id": "pne-1"}

    def save(self, data: dict[str, object]) -> None:
        self.data = data


def _launch(
    tmp_path: Path, result: EstablishResult
) -> tuple[_Given, threading.Thread, asyncio.AbstractEventLoop]:
    participant = _Given(result)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    control = AgentControl(participant)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(control.start(tmp_path / AGENT_SOCKET))
        started.set()
        loop.run_forever()
        loop.run_until_complete(control.close(tmp_path / AGENT_SOCKET))
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    return participant, thread, loop


def _stop(thread: threading.Thread, loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_no_agent_is_exit_4(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """No agent runs on the data directory: exit 4 and what to do."""
    code = main(["device", "establish", "--data-dir", str(tmp_path), "--pn-id", "pn-1"])
    assert code == EXIT_UNREACHABLE
    assert "cpns device run" in capsys.readouterr().err


def test_each_member_is_printed_and_the_exit_code_is_the_pnes_own(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The originator's outcome decides the exit code (0 joined); every member's outcome
    and flow is printed, and the LocalEUKey authentication's outcome."""
    result = EstablishResult(
        status="OK",
        pn_id="pn-1",
        est_id="ab" * 16,
        flow="rand-hash",
        members=(("pne-1", "OK", "rand-hash"), ("pne-2", "OK", "tk"), ("pne-3", "TIMEOUT", "")),
        local="OK",
    )
    participant, thread, loop = _launch(tmp_path, result)
    try:
        argv = ["device", "establish", "--data-dir", str(tmp_path), "--pn-id", "pn-1"]
        code = main([*argv, "--invite", "pne-2", "--invite", "pne-3", "--local-eukey"])
        out = capsys.readouterr().out
        assert code == EXIT_OK
        assert participant.asked == [("pn-1", ("pne-2", "pne-3"), True)]
        assert "pne-2: joined (tk flow)" in out
        assert "pne-3: not joined: TIMEOUT" in out
        assert "LocalEUKey authentication with the PN GW: OK" in out
        assert main([*argv, "--json"]) == EXIT_OK
        assert json.loads(capsys.readouterr().out)["members"][2] == {
            "pne_id": "pne-3",
            "status": "TIMEOUT",
            "flow": "",
        }
    finally:
        _stop(thread, loop)


def test_a_refused_originator_is_exit_3(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The originator itself not joined (here the server's verdict) is exit 3."""
    result = EstablishResult(
        status="POLICY_DENIED",
        pn_id="pn-1",
        est_id=None,
        flow="",
        members=(),
        local=None,
        hop="device",
        reason="not a member: POLICY_DENIED",
    )
    _, thread, loop = _launch(tmp_path, result)
    try:
        code = main(["device", "establish", "--data-dir", str(tmp_path), "--pn-id", "pn-1"])
        assert code == EXIT_REFUSED
        assert "POLICY_DENIED" in capsys.readouterr().out
    finally:
        _stop(thread, loop)
