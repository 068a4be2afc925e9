"""The local sealed key store of the PN GW daemon and the PNE agent (DESIGN §6).

A gateway keeps its own EUKey, the EUKey sets and TKs of the PNEs it assigned, and its
LocalEUKeys; a device keeps its TK, EUKey chain position and LocalEUKey. Each keeps them in
one small file, ``<name>.store``, whose whole content is one CBOR map sealed with
:func:`cpns.crypto.keywrap.seal` (purpose ``"local-keystore"``, context the file name, so a
store file renamed or swapped for another one fails to open).

Why the writes look the way they do. Key material that is lost or half written forces a
re-onboarding, which the reliability rules forbid (DESIGN §5). :meth:`LocalKeyStore.save`
therefore never edits the file in place: it writes a 0600 temp file in the same directory,
fsyncs it, renames it over the old one (atomic on POSIX) and fsyncs the directory. After a
crash at any point the file is either the old store or the new one.

Why a lock. Two daemons using one store would each save their own view and silently drop
the other's keys. :meth:`LocalKeyStore.lock` takes a non-blocking exclusive ``flock`` on
``<name>.lock``; the second daemon fails at start-up with a clear message instead. The lock
is released by the kernel when the process dies, so a crash never leaves a stale lock.

Why records. A PN GW keeps one entry per PNE it assigned; rewriting one file holding all
of them at every change costs O(number of PNEs) per write. Per-PNE data therefore lives
in *records*: one sealed file each in ``<name>.d/<record>.store``, written the same
atomic way under the same key, each bound to its own file name (so two records swapped on
disk fail to open). The main file keeps what belongs to the party itself.

The sealing key comes from ``<name>.key`` beside the store (a 0600 file, created with the
OS CSPRNG on first use by :meth:`LocalKeyStore.open_or_create`) or from the caller.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import cbor2

from cpns.crypto.keywrap import NONCE_LEN, open_sealed, seal
from cpns.errors import AuthenticationFailed, ConfigurationError, LocalProtocolError, StoreError
from cpns.messages.constants import ID_PATTERN
from cpns.store.masterkey import MasterKey, fsync_directory, write_private_file

__all__ = ["LocalKeyStore"]

#: First bytes of every store file: says what the file is before any crypto runs.
_MAGIC: Final = b"CPNS-KS1"
_PURPOSE: Final = "local-keystore"
#: Nesting bound for :func:`_check_value`; a key store is a few levels deep at most.
_MAX_DEPTH: Final = 32


def _check_value(value: object, where: str, depth: int = 0) -> None:
    """Refuse anything that would not round-trip through CBOR as the same Python value."""
    if depth > _MAX_DEPTH:
        raise LocalProtocolError(f"key store data nested deeper than {_MAX_DEPTH} at {where}")
    if value is None or isinstance(value, (str, bytes, bool, int)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise LocalProtocolError(f"key store maps have str keys; {where} has {key!r}")
            _check_value(item, f"{where}.{key}", depth + 1)
        return
    raise LocalProtocolError(
        f"key store values are str, bytes, int, bool, None, lists and dicts; "
        f"{where} is a {type(value).__name__}"
    )


class LocalKeyStore:
    """One sealed key-store file.

    ``path`` is the store file; ``key`` (at least 16 bytes) seals it. The lock file is
    ``path`` with the suffix ``.lock``.
    """

    def __init__(self, path: Path, key: bytes) -> None:
        """Bind the store to ``path`` and ``key``; nothing is read or created yet."""
        if len(key) < 16:
            raise LocalProtocolError("a key store key is at least 16 bytes")
        self._path = Path(path)
        self._key = bytes(key)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        locked = " locked" if self._lock_fd is not None else ""
        return f"<LocalKeyStore {str(self._path)!r}{locked}>"

    @property
    def path(self) -> Path:
        """The store file."""
        return self._path

    @property
    def lock_path(self) -> Path:
        """The advisory lock file beside the store."""
        return self._path.with_suffix(".lock")

    @property
    def locked(self) -> bool:
        """Whether this instance holds the lock."""
        return self._lock_fd is not None

    @classmethod
    def open_or_create(cls, directory: Path, name: str) -> LocalKeyStore:
        """The store ``<directory>/<name>.store`` sealed by the key in ``<name>.key``.

        The key file is created (32 random bytes, hex, mode 0600, atomically) if it does
        not exist yet; the store file itself is only created by the first :meth:`save`.
        Call :meth:`lock` before using the store from a daemon.

        Raises:
            ConfigurationError: the key file exists but is not private (mode & 0o077) or
                does not hold a 32-byte key.
            StoreError: the directory cannot be used.
        """
        if not name or "/" in name or name.startswith("."):
            raise LocalProtocolError(f"bad key store name {name!r}")
        directory = Path(directory)
        key_path = directory / f"{name}.key"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not key_path.exists():
                try:
                    return cls(directory / f"{name}.store", MasterKey.generate(key_path).key)
                except ConfigurationError:
                    # Another process created it between our check and our link: use theirs.
                    if not key_path.exists():
                        raise
        except OSError as exc:
            raise StoreError(f"cannot use key store directory {directory}: {exc}") from None
        return cls(directory / f"{name}.store", MasterKey.load(key_path).key)

    # -- locking ----------------------------------------------------------------------

    def lock(self) -> Self:
        """Take the exclusive advisory lock, without waiting.

        Returns ``self``, so ``with store.lock(): ...`` works.

        Raises:
            StoreError: another process (or another instance) holds the lock, or the lock
                file cannot be opened.
        """
        if self._lock_fd is not None:
            raise LocalProtocolError(f"{self._path} is already locked by this instance")
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open lock file {self.lock_path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise StoreError(
                    f"key store {self._path} is in use by another process "
                    f"(lock {self.lock_path} is held)"
                ) from None
            raise StoreError(f"cannot lock {self.lock_path}: {exc}") from None
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        """Release the lock; does nothing if this instance does not hold it."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # Closing the descriptor releases the flock; the lock file stays (deleting it
            # would race with a process that has just opened it).
            os.close(fd)

    def __enter__(self) -> Self:
        if self._lock_fd is None:
            self.lock()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unlock()

    # -- content ----------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """The stored map, or ``{}`` if the store file does not exist yet.

        Raises:
            StoreError: the file cannot be read, is not a key store, is truncated or
                altered, or was sealed under another key or file name.
        """
        try:
            blob = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"cannot read key store {self._path}: {exc}") from None
        if not blob.startswith(_MAGIC):
            raise StoreError(f"{self._path} is not a CPNS key store (or its header is damaged)")
        try:
            plaintext = open_sealed(
                self._key, blob[len(_MAGIC) :], purpose=_PURPOSE, context=(self._path.name,)
            )
        except AuthenticationFailed:
            raise StoreError(
                f"key store {self._path} does not open: the file is truncated or was altered, "
                "or it was sealed under another key or file name"
            ) from None
        try:
            data = cbor2.loads(plaintext)
        except Exception as exc:  # cbor2 raises several types; none may escape raw
            raise StoreError(f"key store {self._path} holds undecodable data: {exc}") from None
        if not isinstance(data, dict):
            raise StoreError(f"key store {self._path} does not hold a map")
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the stored map with ``data``, atomically and durably.

        ``data`` may hold str, bytes, int, bool, None, lists and dicts with str keys.
        When this returns, the new content is on disk (file and directory fsynced); if it
        raises, the previous content is still there and no temp file is left behind.

        Raises:
            LocalProtocolError: ``data`` holds a value of another type.
            StoreError: the file cannot be written.
        """
        _check_value(data, "data")
        plaintext: bytes = cbor2.dumps(data, canonical=True)
        blob = seal(
            self._key,
            plaintext,
            purpose=_PURPOSE,
            context=(self._path.name,),
            nonce=secrets.token_bytes(NONCE_LEN),
        )
        try:
            write_private_file(self._path, _MAGIC + blob, overwrite=True)
        except OSError as exc:
            raise StoreError(f"cannot write key store {self._path}: {exc}") from None

    # -- records ----------------------------------------------------------------------

    @property
    def records_dir(self) -> Path:
        """The directory of this store's records, ``<name>.d`` beside the store file."""
        return self._path.with_suffix(".d")

    def _record(self, name: str) -> LocalKeyStore:
        if ID_PATTERN.fullmatch(name) is None:
            raise LocalProtocolError(f"bad record name {name!r}")
        return LocalKeyStore(self.records_dir / f"{name}.store", self._key)

    def load_records(self) -> dict[str, dict[str, Any]]:
        """Every record, by name (``{}`` if there are none yet).

        Raises:
            StoreError: the directory cannot be listed, or a record does not open.
        """
        try:
            paths = sorted(self.records_dir.glob("*.store"))
        except OSError as exc:  # pragma: no cover - glob swallows most errors itself
            raise StoreError(f"cannot list {self.records_dir}: {exc}") from None
        return {
            path.stem: self._record(path.stem).load()
            for path in paths
            if ID_PATTERN.fullmatch(path.stem) is not None
        }

    def save_record(self, name: str, data: dict[str, Any]) -> None:
        """Replace (or create) record ``name`` atomically and durably, as :meth:`save`.

        Raises:
            LocalProtocolError: ``name`` is not an Entity ID, or ``data`` holds a value of
                another type.
            StoreError: the record cannot be written.
        """
        record = self._record(name)
        if not self.records_dir.is_dir():
            try:
                self.records_dir.mkdir(mode=0o700, exist_ok=True)
                fsync_directory(self._path.parent)
            except OSError as exc:
                raise StoreError(f"cannot create {self.records_dir}: {exc}") from None
        record.save(data)

    def delete_record(self, name: str) -> None:
        """Remove record ``name`` durably; nothing happens if it does not exist.

        Raises:
            StoreError: the record exists but cannot be removed.
        """
        record = self._record(name)
        try:
            record.path.unlink(missing_ok=True)
            if self.records_dir.is_dir():
                fsync_directory(self.records_dir)
        except OSError as exc:
            raise StoreError(f"cannot remove {record.path}: {exc}") from None
