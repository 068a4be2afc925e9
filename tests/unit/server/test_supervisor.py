"""cpns.server.supervisor: which worker counts a configuration may run, and the operator
endpoint hook (the supervisor itself runs real processes in
tests/integration/test_server_processes.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cpns.errors import ConfigurationError
from cpns.server.config import ServerConfig
from cpns.server.supervisor import MAX_WORKERS, check_workers, operator_endpoint


def config(tmp_path: Path, database: str = "cpns.db") -> ServerConfig:
    return ServerConfig(data_dir=tmp_path, database=database)


def test_several_workers_need_postgresql(tmp_path: Path) -> None:
    """Issue 7 item 2: --workers above 1 on SQLite is refused with a message that says why
    and what to use; one worker on SQLite and several on PostgreSQL are accepted."""
    check_workers(config(tmp_path), 1)
    with pytest.raises(ConfigurationError, match="needs a PostgreSQL database"):
        check_workers(config(tmp_path), 2)
    check_workers(config(tmp_path, "postgresql://cpns@db.example/cpns"), 4)


@pytest.mark.parametrize("workers", [0, -1, MAX_WORKERS + 1])
def test_a_worker_count_out_of_range_is_refused(tmp_path: Path, workers: int) -> None:
    """--workers must be 1..MAX_WORKERS."""
    with pytest.raises(ConfigurationError, match="--workers must be"):
        check_workers(config(tmp_path, "postgresql://cpns@db.example/cpns"), workers)


def test_workers_never_bind_the_operator_port(tmp_path: Path) -> None:
    """docs/metrics.md: the supervisor's operator endpoint gives every worker
    operator_port = 0 (only the supervisor may bind it); with no operator port configured
    it serves nothing and prepares no metrics directory."""

    async def main() -> dict[str, str]:
        async with operator_endpoint(config(tmp_path), workers=2, stopping=lambda: False) as env:
            return env

    assert asyncio.run(main()) == {"CPNS_SERVER_OPERATOR_PORT": "0"}
    assert not (tmp_path / "metrics-workers").exists()
