"""PostgreSQL connections for :class:`cpns.store.sql.SQLStore` (psycopg 3 and its pool).

The store's statements, migrations and group-commit writer are shared with SQLite and live
in :mod:`cpns.store.sql`; this module only knows how to reach a PostgreSQL server:

* :func:`is_dsn` tells a ``postgresql://`` URL from a SQLite file name;
* :func:`redact_dsn` is the only form of a DSN that may appear in a message or a log line
  (the password becomes ``***``), and :func:`scrub` removes the password from driver
  error text, in case a driver ever echoes it;
* :class:`PGConnection` gives a psycopg connection the small part of the ``sqlite3``
  connection interface the store uses (``execute``, ``executemany``, ``executescript``,
  ``in_transaction``), so the writer code is one code path for both engines;
* :class:`PGReaders` is the bounded pool of read connections (psycopg_pool): any thread
  may read, and the number of server connections stays capped however many threads do.

Every connection runs with ``autocommit`` on: the writer issues BEGIN / SAVEPOINT / COMMIT
itself, exactly as on SQLite, and a reader's statements are each their own read-only
transaction. The writer forces ``synchronous_commit = on``: a COMMIT returns only once its
WAL record is flushed on the server, so the commit-before-reply rule holds whatever the
server's default is (DESIGN §6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

__all__ = ["PGConnection", "PGReaders", "is_dsn", "redact_dsn", "scrub"]

#: URL schemes accepted for a PostgreSQL database.
SCHEMES: Final = ("postgresql://", "postgres://")
#: Name the server sees in pg_stat_activity.
_APPLICATION: Final = "cpns-server"


def is_dsn(target: str) -> bool:
    """Whether ``target`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return target.startswith(SCHEMES)


def _password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password (if any) replaced by ``***``: safe to print or log."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "postgresql://(unparsable DSN)"
    if password is None:
        return dsn
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def scrub(text: str, dsn: str) -> str:
    """``text`` (a driver's error message) without the password of ``dsn``."""
    password = _password(dsn)
    if password:
        text = text.replace(password, "***")
    return text


class PGConnection:
    """A psycopg connection seen through the ``sqlite3.Connection`` methods the store uses."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, dsn: str, *, timeout: float) -> PGConnection:
        """Open the writer's connection: autocommit, durable commits."""
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, int(timeout)),
            application_name=_APPLICATION,
        )
        try:
            conn.execute("SET synchronous_commit = on")
            # A write transaction waits at most this long for a row lock held elsewhere.
            conn.execute(f"SET lock_timeout = {int(timeout * 1000)}")
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        """Run one statement (``%s`` placeholders)."""
        return self._conn.execute(sql.encode(), parameters if parameters else None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> psycopg.Cursor[Any]:
        """Run one statement once per row (pipelined by psycopg)."""
        cur = self._conn.cursor()
        cur.executemany(sql.encode(), rows)
        return cur

    def copy(self, statement: str) -> contextlib.AbstractContextManager[psycopg.Copy]:
        """``COPY ... FROM STDIN`` (bulk insert, :mod:`cpns.store.bulk`): the copy object,
        whose ``write_row`` sends one row; the COPY ends when the ``with`` block does."""
        return self._conn.cursor().copy(statement.encode())

    def stream(self, statement: str, *, batch: int = 10_000) -> Iterator[tuple[Any, ...]]:
        """The rows of a query through a server-side cursor, ``batch`` at a time (inside
        the caller's transaction): a million rows are never held in memory at once."""
        with self._conn.cursor(name="cpns_stream") as cur:
            cur.itersize = batch
            cur.execute(statement.encode())
            yield from cur

    def executescript(self, script: str, /) -> None:
        """Run several statements without parameters (a migration file)."""
        self._conn.execute(script.encode())

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (also when a failed statement aborted it)."""
        return self._conn.info.transaction_status in (
            TransactionStatus.INTRANS,
            TransactionStatus.INERROR,
        )

    @property
    def broken(self) -> bool:
        """Whether the connection is lost (the server restarted, the network cut it): the
        writer then opens a new one (issue 7: PostgreSQL restarted under load)."""
        return self._conn.closed or self._conn.broken

    @property
    def unusable(self) -> bool:
        """Whether the writer must not run its next batch on this connection: lost, or
        left in any state but idle after a failed batch and its rollback (a server that
        ended the session can leave a command in flight before the socket is seen
        closed: "another command is already in progress")."""
        return self.broken or self._conn.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        """Close the connection (a transaction still open is rolled back by the server)."""
        self._conn.close()


def _configure_reader(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET default_transaction_read_only = on")


class PGReaders:
    """The pool of read-only connections; ``connection()`` lends one to the calling thread."""

    __slots__ = ("_pool",)

    def __init__(self, dsn: str, *, max_size: int, timeout: float) -> None:
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = (
            psycopg_pool.ConnectionPool(
                dsn,
                min_size=1,
                max_size=max_size,
                kwargs={"autocommit": True, "application_name": _APPLICATION},
                configure=_configure_reader,
                timeout=timeout,
                open=False,
                name="cpns-store-readers",
            )
        )
        self._pool.open(wait=True, timeout=timeout)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the duration of the ``with`` block. If it turns out
        lost (the database restarted since the pool last used it), the pool drops every
        idle connection that is lost too before the error goes on, so the next caller
        gets a live one."""
        lent: psycopg.Connection[Any] | None = None
        try:
            with self._pool.connection() as conn:
                lent = conn
                yield conn
        except psycopg.OperationalError:
            if lent is not None and lent.broken:
                self._pool.check()
            raise

    def read[T](self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run the read ``fn`` on a pooled connection; once more if that connection was
        lost (a read is idempotent): after a database restart the first read of each
        pooled connection would otherwise fail."""
        lent: psycopg.Connection[Any] | None = None
        try:
            with self.connection() as conn:  # drops the pool's lost connections on failure
                lent = conn
                return fn(conn)
        except psycopg.OperationalError:
            if lent is None or not lent.broken:
                raise
        with self.connection() as conn:
            return fn(conn)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()
