"""Administration on the server's store (issue #2, item 4): users, manufacturer TK import
from CSV (a bad row is reported with its line number and nothing partial is imported),
revocation. Runs on the real SQLite store in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cpns.crypto.kdf import password_key
from cpns.errors import ConfigurationError
from cpns.records import EntityRecord
from cpns.server.admin import (
    TKImportError,
    add_user,
    import_tk_csv,
    import_users_csv,
    parse_tk_csv,
    parse_user_csv,
    set_revoked,
)
from cpns.store import ConflictError
from cpns.store.masterkey import MasterKey
from cpns.store.sql import SQLStore
from cpns.types import EntityKind

TK_A = "00" * 32
TK_B = "11" * 16


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLStore]:
    s = SQLStore.open(tmp_path / "cpns.db", master_key=MasterKey(bytes(range(32))))
    yield s
    s.close()


def write_csv(tmp_path: Path, text: str, name: str = "acme.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- parse_tk_csv: one row per malformed input, with the exact line --------------------------

CSV_FAILURES = [
    pytest.param("", 1, "empty file", id="empty-file"),
    pytest.param("entity,key\npne-1," + TK_A + "\n", 1, "header", id="wrong-header"),
    pytest.param("entity_id,tk\npne-1\n", 2, "two columns", id="one-column"),
    pytest.param("entity_id,tk\npne-1," + TK_A + "\nbad id!," + TK_A + "\n", 3, "Entity ID",
                 id="bad-entity-id"),
    pytest.param("entity_id,tk\npne-1,zz" + TK_A[2:] + "\n", 2, "hexadecimal", id="not-hex"),
    pytest.param("entity_id,tk\npne-1," + "00" * 15 + "\n", 2, "15 bytes", id="tk-too-short"),
    pytest.param("entity_id,tk\npne-1," + "00" * 65 + "\n", 2, "65 bytes", id="tk-too-long"),
    pytest.param("entity_id,tk\npne-1," + TK_A + "\n\npne-1," + TK_B + "\n", 4, "line 2",
                 id="duplicate-names-first-line"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "reason"), CSV_FAILURES)
def test_bad_csv_names_its_line(text: str, line: int, reason: str) -> None:
    """Issue #2 item 4: a bad row is reported with its line number (1-based, header = 1)."""
    with pytest.raises(TKImportError) as info:
        list(parse_tk_csv(text, source="acme.csv"))
    assert info.value.line == line
    assert reason in str(info.value)
    assert str(info.value).startswith(f"line {line}: ")


def test_good_csv_parses_with_blank_lines_spaces_and_extra_columns() -> None:
    """Blank lines are skipped, cells are trimmed, columns after the second are ignored,
    the header is case-insensitive; each record keeps its source file name."""
    text = f"Entity_ID , TK ,model\n\n pne-1 , {TK_A} ,x1\npne-2,{TK_B.upper()}\n"
    rows = list(parse_tk_csv(text, source="acme.csv"))
    assert [(r.line, r.record.entity_id, r.record.tk) for r in rows] == [
        (3, "pne-1", bytes(32)),
        (4, "pne-2", b"\x11" * 16),
    ]
    assert {r.record.source for r in rows} == {"acme.csv"}


# -- import_tk_csv: all or nothing -----------------------------------------------------------


def test_import_stores_every_record_and_reports_progress(store: SQLStore, tmp_path: Path) -> None:
    """A valid file is imported whole; the progress callback adds up to the row count; the
    import is audited; the TK is read back exactly (sealed at rest, opened on read)."""
    lines = ["entity_id,tk", *(f"pne-{i},{i:064x}" for i in range(2500))]
    path = write_csv(tmp_path, "\ufeff" + "\n".join(lines) + "\n")  # a BOM is accepted too
    seen: dict[str, int] = {}

    def progress(phase: str, rows: int, total: int) -> None:
        seen[phase] = seen.get(phase, 0) + rows

    assert import_tk_csv(store, path, progress=progress) == 2500
    assert seen == {"validating": 2500, "sealing": 2500, "writing": 2500}
    record = store.get_tk("pne-2499")
    assert record is not None
    assert record.tk == (2499).to_bytes(32, "big")
    assert record.source == "acme.csv"
    [event] = [e for e in store.audit_events() if e.procedure == "tk-import"]
    assert event.outcome == "OK"
    assert event.detail == "2500 from acme.csv"


def test_a_bad_row_imports_nothing(store: SQLStore, tmp_path: Path) -> None:
    """Issue #2 item 4: "nothing partial is imported": a bad row on line 4 leaves the
    database without the rows before it."""
    path = write_csv(tmp_path, f"entity_id,tk\npne-1,{TK_A}\npne-2,{TK_B}\npne-3,oops\n")
    with pytest.raises(TKImportError) as info:
        import_tk_csv(store, path)
    assert info.value.line == 4
    assert store.get_tk("pne-1") is None
    assert store.get_tk("pne-2") is None


def test_a_record_already_in_the_database_imports_nothing(store: SQLStore, tmp_path: Path) -> None:
    """The file is written in one transaction: a record that conflicts with one imported
    earlier aborts the whole file, and the earlier record is unchanged."""
    import_tk_csv(store, write_csv(tmp_path, f"entity_id,tk\npne-2,{TK_B}\n", "first.csv"))
    second = write_csv(tmp_path, f"entity_id,tk\npne-1,{TK_A}\npne-2,{TK_A}\n", "second.csv")
    with pytest.raises(ConflictError):
        import_tk_csv(store, second)
    assert store.get_tk("pne-1") is None
    record = store.get_tk("pne-2")
    assert record is not None
    assert (record.tk, record.source) == (b"\x11" * 16, "first.csv")


@pytest.mark.parametrize("content", [None, b"entity_id,tk\n\xff\xfe\n"], ids=["missing", "binary"])
def test_unreadable_file_is_a_configuration_error(
    store: SQLStore, tmp_path: Path, content: bytes | None
) -> None:
    """A missing or non-UTF-8 file is a clear ConfigurationError naming the file."""
    path = tmp_path / "tks.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigurationError, match="cannot read"):
        import_tk_csv(store, path)


# -- users and revocation --------------------------------------------------------------------


def test_add_user_stores_the_password_key_never_the_password(store: SQLStore) -> None:
    """003 §7.4.2.1.1.2 step 1 needs Hash(Password) at the server: the user record holds
    the scrypt password key (DESIGN §4: no password equivalent in clear)."""
    user = add_user(store, "alice", "correct horse", realm="cpns")
    assert user.password_key == password_key("correct horse", realm="cpns", user_id="alice")
    stored = store.get_user("alice")
    assert stored is not None
    assert stored.password_key == user.password_key
    assert "correct horse" not in repr(stored)


@pytest.mark.parametrize(
    ("user_id", "password", "message"),
    [("bad id!", "long enough", "User ID"), ("alice", "short", "8 characters")],
)
def test_add_user_refuses_bad_input(
    store: SQLStore, user_id: str, password: str, message: str
) -> None:
    """A malformed User ID or a password under 8 characters is refused before any write."""
    with pytest.raises(ConfigurationError, match=message):
        add_user(store, user_id, password, realm="cpns")
    assert store.list_users() == []


def test_add_user_twice_is_a_conflict(store: SQLStore) -> None:
    """User IDs are unique; the first registration stays."""
    first = add_user(store, "alice", "correct horse", realm="cpns")
    with pytest.raises(ConflictError):
        add_user(store, "alice", "another password", realm="cpns")
    stored = store.get_user("alice")
    assert stored is not None
    assert stored.password_key == first.password_key


def test_revoke_and_restore(store: SQLStore) -> None:
    """An entity can be revoked (it no longer authenticates) and restored; both are
    audited; an unknown entity is a clear error."""
    add_user(store, "alice", "correct horse", realm="cpns")
    store.write(
        lambda tx: tx.put_entity(
            EntityRecord(
                entity_id="gw-1",
                kind=EntityKind.PN_GW,
                owner="alice",
                eukeys=(b"k" * 32,),
                key_index=1,
            )
        )
    )
    assert set_revoked(store, "gw-1", True).revoked
    assert not set_revoked(store, "gw-1", False).revoked
    procedures = [e.procedure for e in store.audit_events() if e.entity_id == "gw-1"]
    assert sorted(procedures) == ["restore", "revoke"]
    with pytest.raises(ConfigurationError, match="no entity"):
        set_revoked(store, "gw-9", True)


# -- Entity ID syntax at TK import (issue 5 item 9, D-SRV-3) ---------------------------------


@pytest.mark.parametrize(
    ("entity_id", "reason"),
    [
        ("cpns-server", "server's own"),
        ("CPNS-Server", "canonical"),
        ("127.0.0.1", "network address"),
        ("pan", "reserved"),
        ("unknown", "reserved"),
        ("localhost", "reserved"),
        ("PNE-1", "canonical"),  # a case variant of pne-1 (line 2)
    ],
)
def test_tk_import_refuses_reserved_and_non_canonical_ids(
    store: SQLStore, tmp_path: Path, entity_id: str, reason: str
) -> None:
    """Issue 5 item 9, D-SRV-3: a TK record for the server's own ID, a reserved or
    address-like name, or a non-lowercase ID (a case variant) is refused with its line,
    and nothing of the file is imported."""
    path = write_csv(tmp_path, f"entity_id,tk\npne-1,{TK_A}\n{entity_id},{TK_B}\n")
    with pytest.raises(TKImportError) as info:
        import_tk_csv(store, path, server_id="cpns-server")
    assert info.value.line == 3
    assert reason in str(info.value)
    assert store.get_tk("pne-1") is None


def test_audit_purge_keeps_the_retention_and_audits_itself(store: SQLStore) -> None:
    """Issue 5 item 6, D-SRV-2: `cpns admin audit --purge` deletes events older than the
    retention, keeps newer ones, and records the purge in the trail."""
    from cpns.records import AuditEvent
    from cpns.server.admin import purge_audit

    now = 1_700_000_000
    store.write(
        lambda tx: (
            tx.audit(AuditEvent(at=now - 91 * 86400, actor="old", procedure="p", outcome="OK")),
            tx.audit(AuditEvent(at=now - 89 * 86400, actor="new", procedure="p", outcome="OK")),
        )
    )
    assert purge_audit(store, days=90, now=now) == 1
    actors = [e.actor for e in store.audit_events()]
    assert "old" not in actors
    assert "new" in actors
    assert store.audit_events()[0].procedure == "audit-purge"
    with pytest.raises(ConfigurationError):
        purge_audit(store, days=0)


# -- user import -----------------------------------------------------------------------------


def test_user_import_hashes_passwords_in_a_process_pool(store: SQLStore, tmp_path: Path) -> None:
    """``user_id,password``: each password becomes the same scrypt password key that
    add_user stores (realm and User ID in the salt), computed by worker processes; the
    import is audited."""
    path = write_csv(tmp_path, "user_id,password\nalice,correct horse\nbob,battery staple\n")
    assert import_users_csv(store, path, realm="cpns", workers=2) == 2
    alice = store.get_user("alice")
    assert alice is not None
    assert alice.password_key == password_key("correct horse", realm="cpns", user_id="alice")
    [event] = [e for e in store.audit_events() if e.procedure == "user-import"]
    assert event.detail == "2 from acme.csv"


def test_user_import_takes_precomputed_password_keys(store: SQLStore, tmp_path: Path) -> None:
    """``user_id,password_key``: the 64-hex-digit key is stored as given (no hashing)."""
    key = password_key("correct horse", realm="cpns", user_id="alice")
    path = write_csv(tmp_path, f"user_id,password_key\nalice,{key.hex()}\n")
    assert import_users_csv(store, path, realm="cpns") == 1
    alice = store.get_user("alice")
    assert alice is not None
    assert alice.password_key == key


USER_CSV_FAILURES = [
    pytest.param("user_id,secret\nalice,x\n", 1, "header", id="header"),
    pytest.param("user_id,password\nalice,short\n", 2, "8 characters", id="short-password"),
    pytest.param("user_id,password_key\nalice,zz\n", 2, "hexadecimal", id="not-hex"),
    pytest.param("user_id,password_key\nalice,00\n", 2, "1 bytes", id="short-key"),
    pytest.param("user_id,password\nal ice,long enough\n", 2, "User ID", id="bad-id"),
    pytest.param("user_id,password\nalice,long enough\nalice,long enough\n", 3, "line 2",
                 id="duplicate"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "reason"), USER_CSV_FAILURES)
def test_bad_user_csv_names_its_line(text: str, line: int, reason: str) -> None:
    """A bad user row is reported with its line number, like a bad TK row."""
    with pytest.raises(TKImportError) as info:
        list(parse_user_csv(text))
    assert info.value.line == line
    assert reason in str(info.value)
