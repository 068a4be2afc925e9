"""The operator listener and multiprocess collection of cpns.metrics (docs/metrics.md).

The listener runs on a real loopback socket and is read with a plain HTTP client; the
multiprocess test starts real worker interpreters that count into a shared directory.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from tests.metrics import get, parse, value

from cpns import metrics

WAIT = 10.0


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT))


async def fetch(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, f"http://127.0.0.1:{port}{path}")


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    await writer.wait_closed()
    return answer


def test_operator_listener_serves_metrics_liveness_and_readiness() -> None:
    """docs/metrics.md: GET /metrics is the text exposition of this process's metrics,
    /healthz is 200, /readyz follows the readiness check (200, or 503 with its reason);
    other paths are 404, other methods 405, a request that is not HTTP 400."""
    state = {"ready": True}

    async def ready() -> tuple[bool, str]:
        return state["ready"], "" if state["ready"] else "store unreachable: disk gone"

    async def scenario() -> dict[str, Any]:
        server = await metrics.serve_operator("127.0.0.1", 0, ready=ready)
        try:
            port = server.port
            seen: dict[str, Any] = {
                "metrics": await fetch(port, "/metrics"),
                "healthz": await fetch(port, "/healthz"),
                "ready": await fetch(port, "/readyz"),
            }
            state["ready"] = False
            seen["not_ready"] = await fetch(port, "/readyz?verbose=1")
            seen["missing"] = await fetch(port, "/nothing")
            seen["post"] = await raw_request(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            seen["head"] = await raw_request(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            seen["junk"] = await raw_request(port, b"\x16\x03\x01 not http\r\n\r\n")
        finally:
            await server.close()
        return seen

    seen = run(scenario())
    status, body = seen["metrics"]
    assert status == 200
    assert "# TYPE cpns_server_requests_total counter" in body
    parse(body)  # a valid exposition
    assert seen["healthz"] == (200, "ok\n")
    assert seen["ready"] == (200, "ready\n")
    assert seen["not_ready"] == (503, "not ready: store unreachable: disk gone\n")
    assert seen["missing"][0] == 404
    assert seen["post"].startswith(b"HTTP/1.1 405 ")
    assert seen["head"].startswith(b"HTTP/1.1 200 ")
    assert seen["head"].endswith(b"\r\n\r\n")  # no body after a HEAD
    assert seen["junk"].startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("how", ["slow", "raises"])
def test_a_slow_or_failing_readiness_check_is_503(how: str) -> None:
    """docs/metrics.md: a readiness check that takes longer than ready_timeout, or fails
    with an exception, makes /readyz 503 with a reason; the listener keeps serving."""

    async def ready() -> tuple[bool, str]:
        if how == "slow":
            await asyncio.sleep(3600)
        raise RuntimeError("boom")

    async def scenario() -> tuple[tuple[int, str], tuple[int, str]]:
        server = await metrics.serve_operator("127.0.0.1", 0, ready=ready, ready_timeout=0.2)
        try:
            return await fetch(server.port, "/readyz"), await fetch(server.port, "/healthz")
        finally:
            await server.close()

    (status, body), health = run(scenario())
    assert status == 503
    assert ("longer than 0.2s" if how == "slow" else "RuntimeError") in body
    assert health == (200, "ok\n")


WORKER = """
import sys
from cpns import metrics
assert metrics.multiprocess_dir() is not None
metrics.SERVER_REQUESTS.labels("eukey-assignment-tk-003", "OK").inc(int(sys.argv[1]))
metrics.SERVER_PENDING.inc()
metrics.STORE_COMMIT_BATCH.labels("sqlite").observe(int(sys.argv[1]))
"""


def test_several_worker_processes_are_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/metrics.md, several processes: after prepare_multiprocess, worker interpreters
    count into the directory and the supervisor's listener serves their sum (counters and
    histograms of every worker, exited or not; live gauges only of workers not reported
    exited). Files of an earlier run are removed first."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale file of an earlier run")
    # Recorded by monkeypatch so that the variable prepare_multiprocess sets is undone.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "")
    metrics.prepare_multiprocess(directory)
    assert os.environ[metrics.MULTIPROC_ENV] == str(directory)
    assert not (directory / "counter_999999.db").exists()
    pids = []
    for count in (2, 5):
        worker = subprocess.run(
            [sys.executable, "-c", WORKER + "print(__import__('os').getpid())", str(count)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        pids.append(int(worker.stdout))
    metrics.worker_exited(pids[0])

    async def scenario() -> tuple[int, str]:
        server = await metrics.serve_operator("127.0.0.1", 0, multiprocess_dir=directory)
        try:
            return await fetch(server.port, "/metrics")
        finally:
            await server.close()

    status, body = run(scenario())
    monkeypatch.undo()
    assert metrics.MULTIPROC_ENV not in os.environ
    assert status == 200
    samples = parse(body)
    requests = value(
        samples, "cpns_server_requests_total", procedure="eukey-assignment-tk-003", status="OK"
    )
    assert requests == 7
    assert value(samples, "cpns_server_pending_procedures") == 1
    assert value(samples, "cpns_store_commit_batch_size_count", backend="sqlite") == 2
    assert value(samples, "cpns_store_commit_batch_size_sum", backend="sqlite") == 7


def test_a_worker_that_imported_prometheus_client_too_early_is_caught(tmp_path: Path) -> None:
    """docs/metrics.md, several processes: a worker whose interpreter imported
    prometheus_client before PROMETHEUS_MULTIPROC_DIR was set would count in memory only;
    check_worker says so instead of losing its counts silently. A worker started with the
    variable already set passes."""
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    late = (
        "import os\n"
        "from cpns import metrics\n"
        f"os.environ[metrics.MULTIPROC_ENV] = {str(tmp_path)!r}\n"
        "try:\n"
        "    metrics.check_worker()\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', exc)\n"
    )
    refused = subprocess.run(
        [sys.executable, "-c", late], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.stdout.startswith("refused: PROMETHEUS_MULTIPROC_DIR is set"), refused
    fresh = subprocess.run(
        [sys.executable, "-c", "from cpns import metrics; metrics.check_worker(); print('ok')"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, metrics.MULTIPROC_ENV: str(tmp_path)},
    )
    assert fresh.stdout == "ok\n", fresh
