"""``cpns admin backup / restore / master-key rotate / user import`` (issue 7): every refusal
is a message and exit code 2, never a traceback; progress bars reach stderr only when
asked or on a terminal. In-process on real data directories, both back ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.cli.test_cli import TK, quiet_logs, run, server_dir

from cpns.cli.main import EXIT_OK, EXIT_USAGE
from cpns.server.config import load_server_config
from cpns.server.main import open_store
from cpns.store.masterkey import MasterKey

__all__ = ["quiet_logs", "server_dir"]  # fixtures shared with test_cli


def test_backup_then_restore_refusals_are_clear(
    capsys: pytest.CaptureFixture[str], server_dir: Path, tmp_path: Path
) -> None:
    """A backup is written and described; writing it again is refused (never
    overwritten); restoring into the same, non-empty database is refused; a missing or
    damaged file is refused; each with exit 2 and a one-line reason."""
    csv = tmp_path / "tk.csv"
    csv.write_text(f"entity_id,tk\npne-1,{TK}\n")
    run(capsys, "admin", "tk", "import", str(csv), "--data-dir", str(server_dir))
    backup = tmp_path / "b.backup"
    code, out, err = run(capsys, "admin", "backup", str(backup), "--data-dir", str(server_dir))
    assert code == EXIT_OK, err
    assert "sealed under master key" in out
    assert err == ""  # no progress bar: stderr is not a terminal and --progress not given
    cases = [
        (("admin", "backup", str(backup)), "already exists"),
        (("admin", "restore", str(backup)), "is not empty"),
        (("admin", "restore", str(tmp_path / "missing")), "cannot read"),
    ]
    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(backup.read_bytes()[:-1] + b"\0")
    cases.append((("admin", "restore", str(damaged)), "checksum"))
    for argv, reason in cases:
        code, _, err = run(capsys, *argv, "--data-dir", str(server_dir))
        assert code == EXIT_USAGE, (argv, err)
        assert reason in err
        assert "Traceback" not in err


def test_rotate_from_the_command_line(
    capsys: pytest.CaptureFixture[str],
    server_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``master-key rotate`` replaces the key file and the data opens under the new key;
    with CPNS_MASTER_KEY set it is refused (it rotates the key FILE)."""
    config = load_server_config(server_dir)
    key_file = config.path(config.master_key_file)
    csv = tmp_path / "tk.csv"
    csv.write_text(f"entity_id,tk\npne-1,{TK}\n")
    run(capsys, "admin", "tk", "import", str(csv), "--data-dir", str(server_dir))
    old = MasterKey.load(key_file)
    code, out, err = run(capsys, "admin", "master-key", "rotate", "--data-dir", str(server_dir))
    assert code == EXIT_OK, err
    new = MasterKey.load(key_file)
    assert f"from {old.key_id} to {new.key_id}" in out
    with open_store(config) as store:
        tk = store.get_tk("pne-1")
        assert tk is not None
        assert tk.tk == bytes.fromhex(TK)
    monkeypatch.setenv("CPNS_MASTER_KEY", new.key.hex())
    code, _, err = run(capsys, "admin", "master-key", "rotate", "--data-dir", str(server_dir))
    assert code == EXIT_USAGE
    assert "CPNS_MASTER_KEY" in err


def test_user_import_reports_a_bad_line_and_shows_progress_when_asked(
    capsys: pytest.CaptureFixture[str], server_dir: Path, tmp_path: Path
) -> None:
    """A bad line is named (exit 2, nothing imported); a good file with precomputed
    password keys imports every user; --progress draws bars on stderr."""
    csv = tmp_path / "users.csv"
    csv.write_text("user_id,password_key\nalice," + "11" * 32 + "\nbad id," + "22" * 32 + "\n")
    argv = ("admin", "user", "import", str(csv), "--data-dir", str(server_dir))
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert "line 3" in err
    csv.write_text("user_id,password_key\nalice," + "11" * 32 + "\nbob," + "22" * 32 + "\n")
    code, out, err = run(capsys, *argv, "--progress")
    assert code == EXIT_OK, err
    assert "imported 2 user(s)" in out
    assert "writing" in err
    with open_store(load_server_config(server_dir)) as store:
        assert [u.user_id for u in store.list_users()] == ["alice", "bob"]


def test_an_admin_command_finishes_a_rotation_interrupted_after_its_commit(
    capsys: pytest.CaptureFixture[str], server_dir: Path
) -> None:
    """The server and every admin command open the store through open_store: after a
    crash between the re-seal commit and the key-file swap, the next one finishes the
    swap and works."""
    from cpns.store.rotation import new_key_path, reseal

    config = load_server_config(server_dir)
    key_file = config.path(config.master_key_file)
    half = MasterKey.generate(new_key_path(key_file))
    reseal(config.store_target(), MasterKey.load(key_file), half)  # then the "crash"
    code, _, err = run(capsys, "admin", "user", "list", "--data-dir", str(server_dir))
    assert code == EXIT_OK, err
    assert MasterKey.load(key_file) == half
    assert not new_key_path(key_file).exists()
