"""Administration on the server's store: users, manufacturer TK records, entities.

These run in the operator's process (``cpns admin ...``) against the same database the
server uses; SQLite (WAL) and the store's transactions make that safe while it runs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cpns.crypto.kdf import password_key
from cpns.errors import ConfigurationError
from cpns.messages.constants import ID_PATTERN, entity_id_problem
from cpns.records import AuditEvent, EntityRecord, TKRecord, UserRecord
from cpns.runtime import wall_time
from cpns.store.base import ServerStore, WriteTx

__all__ = [
    "TKImportError",
    "add_user",
    "import_tk_csv",
    "parse_tk_csv",
    "purge_audit",
    "set_revoked",
]


class TKImportError(ConfigurationError):
    """A TK CSV file is invalid; ``line`` names the first bad line (1-based)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line


def add_user(store: ServerStore, user_id: str, password: str, *, realm: str) -> UserRecord:
    """Register a CPNS User: store the scrypt password key, never the password."""
    if ID_PATTERN.fullmatch(user_id) is None:
        raise ConfigurationError(f"{user_id!r} is not a valid User ID")
    if len(password) < 8:
        raise ConfigurationError("the password must have at least 8 characters")
    now = wall_time()
    user = UserRecord(
        user_id=user_id,
        password_key=password_key(password, realm=realm, user_id=user_id),
        created_at=now,
    )

    def write(tx: WriteTx) -> None:
        tx.add_user(user)
        tx.audit(
            AuditEvent(
                at=now,
                actor="admin",
                procedure="user-add",
                outcome="OK",
                user_id=user_id,
                hop="admin",
            )
        )

    store.write(write)
    return user


class _CSVReader:
    """``csv.reader`` whose syntax errors are :class:`TKImportError` naming the line.

    The csv module raises ``csv.Error`` (an oversize field, a bad quote) that must not
    escape the importer (issue 5 item 17, found by the TK CSV fuzz target).
    """

    def __init__(self, text: str) -> None:
        self._reader = csv.reader(io.StringIO(text, newline=""))

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> _CSVReader:
        return self

    def __next__(self) -> list[str]:
        try:
            return next(self._reader)
        except csv.Error as exc:
            raise TKImportError(self._reader.line_num or 1, f"not valid CSV: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    record: TKRecord


def parse_tk_csv(text: str, *, source: str, server_id: str | None = None) -> Iterator[_Row]:
    """Yield validated TK records from CSV text (header ``entity_id,tk``, TK in hex).

    Every Entity ID must be registrable (canonical, not reserved, not ``server_id``:
    :func:`~cpns.messages.constants.entity_id_problem`). Raises :class:`TKImportError` at
    the first bad line, naming it.
    """
    reader = _CSVReader(text)
    header = next(reader, None)
    if header is None:
        raise TKImportError(1, "empty file (expected a header 'entity_id,tk')")
    names = [h.strip().lower() for h in header]
    if names[:2] != ["entity_id", "tk"]:
        raise TKImportError(1, f"header must start with 'entity_id,tk', got {header!r}")
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise TKImportError(line, "expected two columns: entity_id,tk")
        entity_id, tk_hex = row[0].strip(), row[1].strip()
        problem = entity_id_problem(entity_id, server_id=server_id)
        if problem is not None:
            raise TKImportError(line, f"Entity ID {entity_id!r}: {problem}")
        try:
            tk = bytes.fromhex(tk_hex)
        except ValueError:
            raise TKImportError(line, "the TK is not hexadecimal") from None
        if not 16 <= len(tk) <= 64:
            raise TKImportError(line, f"the TK has {len(tk)} bytes; 16 to 64 are accepted")
        if entity_id in seen:
            raise TKImportError(line, f"{entity_id!r} already appears on line {seen[entity_id]}")
        seen[entity_id] = line
        yield _Row(
            line, TKRecord(entity_id=entity_id, tk=tk, source=source, imported_at=wall_time())
        )


def import_tk_csv(
    store: ServerStore,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
    server_id: str | None = None,
) -> int:
    """Import a manufacturer CSV all or nothing; return the number of records.

    The whole file is validated first (a bad row is reported with its line number and
    nothing is imported), then written in one transaction, so a duplicate of a record
    already in the database also leaves the database unchanged.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    rows = []
    for row in parse_tk_csv(text, source=path.name, server_id=server_id):
        rows.append(row)
        if progress is not None and len(rows) % 1000 == 0:
            progress(1000)
    if progress is not None:
        progress(len(rows) % 1000)
    records = [r.record for r in rows]
    now = wall_time()

    def write(tx: WriteTx) -> None:
        tx.put_tks(records)
        tx.audit(
            AuditEvent(
                at=now,
                actor="admin",
                procedure="tk-import",
                outcome="OK",
                hop="admin",
                detail=f"{len(records)} from {path.name}",
            )
        )

    store.write(write)
    return len(records)


def set_revoked(store: ServerStore, entity_id: str, revoked: bool) -> EntityRecord:
    """Revoke (or restore) an entity; it can no longer authenticate."""
    entity = store.get_entity(entity_id)
    if entity is None:
        raise ConfigurationError(f"no entity {entity_id!r}")
    now = wall_time()

    def write(tx: WriteTx) -> None:
        tx.set_revoked(entity_id, revoked)
        tx.audit(
            AuditEvent(
                at=now,
                actor="admin",
                procedure="revoke" if revoked else "restore",
                outcome="OK",
                entity_id=entity_id,
                hop="admin",
            )
        )

    store.write(write)
    result = store.get_entity(entity_id)
    assert result is not None
    return result


def purge_audit(store: ServerStore, *, days: int, now: int | None = None) -> int:
    """Delete audit events older than ``days`` days (retention, D-SRV-2); return how many.

    The purge itself is audited, so the trail says who shortened it and when.
    """
    if days < 1:
        raise ConfigurationError("the audit retention must be at least 1 day")
    at = wall_time() if now is None else now

    def write(tx: WriteTx) -> int:
        gone = tx.purge_audit(before=at - days * 86400)
        tx.audit(
            AuditEvent(
                at=at,
                actor="admin",
                procedure="audit-purge",
                outcome="OK",
                hop="admin",
                detail=f"{gone} events older than {days} days",
            )
        )
        return gone

    return store.write(write)
