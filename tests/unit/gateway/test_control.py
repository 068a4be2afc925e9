"""The PN GW control socket's commands (cpns.gateway.control), against a recording target:
each op reaches the daemon with typed arguments; malformed requests and failing ops get
a JSON refusal, never an exception."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cpns.gateway.connections import Connections
from cpns.gateway.control import ControlServer
from cpns.gateway.procedures.eukey_assignment import AssignResult


class Target:
    """Records what the control socket asks of the daemon."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def status(self) -> dict[str, object]:
        self.calls.append(("status",))
        return {"ok": True, "status": "OK"}

    def request_shutdown(self) -> None:
        self.calls.append(("shutdown",))

    async def assign(
        self,
        pne_id: str,
        user_id: str,
        password_key: bytes,
        *,
        claim_key: bytes,
        wait: float = 0.0,
    ) -> AssignResult:
        if self.fail:
            raise RuntimeError("boom")
        self.calls.append(("assign", pne_id, user_id, password_key, claim_key, wait))
        return AssignResult(ok=True, status="OK", stage="stored", pne_id=pne_id, txid="00")


def _op(target: Target, request: object) -> dict[str, object]:
    line = request if isinstance(request, bytes) else json.dumps(request).encode()
    return asyncio.run(ControlServer(target, Connections()).op(line))


def test_ops_reach_the_daemon_with_typed_arguments() -> None:
    """status and shutdown are passed on; assign gets its keys as bytes and wait as a
    float, and its reply is the AssignResult's JSON."""
    target = Target()
    assert _op(target, {"op": "status"}) == {"ok": True, "status": "OK"}
    assert _op(target, {"op": "shutdown"}) == {"ok": True, "status": "OK"}
    reply = _op(
        target,
        {
            "op": "assign",
            "pne_id": "pne-1",
            "user_id": "alice",
            "password_key": "11" * 32,
            "claim_key": "22" * 32,
            "wait": 3,
        },
    )
    assert (reply["ok"], reply["stage"], reply["pne_id"]) == (True, "stored", "pne-1")
    assert target.calls == [
        ("status",),
        ("shutdown",),
        ("assign", "pne-1", "alice", b"\x11" * 32, b"\x22" * 32, 3.0),
    ]


ASSIGN = {"op": "assign", "pne_id": "p", "user_id": "u", "password_key": "", "claim_key": ""}


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (b"not json\n", "not JSON"),
        (b"\xff\xfe\n", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"op": "format-disk"}, "unknown op"),
        ({"op": "assign", "pne_id": "p"}, "assign needs"),
        ({**ASSIGN, "wait": -1}, "wait must be"),
        ({**ASSIGN, "wait": True}, "wait must be"),
        ({**ASSIGN, "password_key": "zz"}, "must be hex"),
    ],
)
def test_malformed_requests_are_refused(request_: object, why: str) -> None:
    """A request that is not a well-formed op gets MALFORMED_MESSAGE at hop gateway with
    the reason, and reaches nothing."""
    target = Target()
    reply = _op(target, request_)
    assert (reply["ok"], reply["status"], reply["hop"]) == (False, "MALFORMED_MESSAGE", "gateway")
    assert why in str(reply["error"])
    assert target.calls == []


def test_a_failing_op_is_an_internal_error_reply() -> None:
    """A control client never takes the daemon down: an op that raises is answered with
    INTERNAL_ERROR."""
    reply = _op(
        Target(fail=True),
        {**ASSIGN, "password_key": "11" * 32, "claim_key": "22" * 32},
    )
    assert (reply["ok"], reply["status"]) == (False, "INTERNAL_ERROR")
