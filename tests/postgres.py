"""The throwaway PostgreSQL cluster of the test session (scripts/pg-cluster).

:class:`PGCluster` starts the cluster through the project's script (so the tests use the
very path CI and developers use), hands out one fresh database per test and drops it
afterwards. No test mocks the database: every PostgreSQL test talks to this server.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pg-cluster"


def with_database(dsn: str, dbname: str) -> str:
    """``dsn`` pointing at database ``dbname``."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + dbname))


@dataclass
class PGCluster:
    """A running cluster: its directory (data, socket, log) and its admin URL."""

    directory: Path
    admin_dsn: str
    #: Databases emptied after their test, ready for the next one.
    free: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> PGCluster:
        out = subprocess.run(
            [str(SCRIPT), "start"], check=True, capture_output=True, text=True, timeout=600
        ).stdout.split()
        return cls(directory=Path(out[0]), admin_dsn=out[1])

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.directory)], check=True, timeout=120)

    def down(self) -> None:
        """Stop the database server, keeping its data (a restart's first half)."""
        subprocess.run([str(SCRIPT), "down", str(self.directory)], check=True, timeout=120)

    def up(self) -> None:
        """Start it again on the same port with the same data."""
        subprocess.run([str(SCRIPT), "up", str(self.directory)], check=True, timeout=120)

    def admin(self, statement: str, params: Any = None) -> list[Any]:
        """Run one statement as the cluster's superuser on its ``postgres`` database."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            cur = conn.execute(statement.encode(), params)
            return cur.fetchall() if cur.description else []

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """An empty database for the ``with`` block.

        Afterwards its connections are ended and its ``public`` schema dropped and made
        again, and the database serves a later test: DROP DATABASE forces a checkpoint
        (about a second each), emptying the schema costs milliseconds. Nothing of one test
        (tables, rows, schema version) is seen by the next.
        """
        if self.free:
            name = self.free.pop()
        else:
            name = "t_" + secrets.token_hex(6)
            self.admin(f"CREATE DATABASE {name}")
        dsn = with_database(self.admin_dsn, name)
        try:
            yield dsn
        finally:
            self.admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            raw(dsn, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            self.free.append(name)


def raw(dsn: str, statement: str, params: Any = None) -> list[Any]:
    """One statement on the database with plain psycopg, as an attacker with access would."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement.encode(), params)
        return cur.fetchall() if cur.description else []
