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

Why a journal. Even one file per record costs a temp file, two fsyncs and a rename per
change, and a PN GW changes a PNE's record two or three times per assignment, each time
before it may answer. Record changes therefore go first to an append-only *journal*
(:meth:`LocalKeyStore.commit_records`): several records in one *frame*, appended with one
synchronous ``write`` (the file is opened ``O_DSYNC``: the call returns once the frame is
on disk), so concurrent writers share one flush (group commit) and none returns before
its frame is durable. A frame is sealed under the store key, bound to
the journal file's name and to its sequence number in the file, so frames cannot be
reordered, dropped from the middle or moved between files without the journal failing to
open. A crash can only tear the *last* frame of a journal file (each append waits for the
previous one's flush), leaving a prefix of it, or zeros where its end should be; such a
torn last frame was never acknowledged and is ignored on reading, while a frame that does
not open anywhere else is a :class:`~cpns.errors.StoreError`.

The journal comes in *generations*, ``<name>.journal-<n>``: a process appends only to the
generation it created, and closes it once it holds :attr:`LocalKeyStore.journal_limit`
bytes; :meth:`LocalKeyStore.compact_records` then folds the closed generations into the
record files (each record touched written once, atomically as above, the directory
fsynced once) and only then deletes them, oldest first. Reading is "record files, then
every generation oldest first", so a crash at any point of a compaction reads the same
records as before it: a file already rewritten holds exactly the state that what is left
of the journal replays on top of it.

The sealing key comes from ``<name>.key`` beside the store (a 0600 file, created with the
OS CSPRNG on first use by :meth:`LocalKeyStore.open_or_create`) or from the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import struct
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import cbor2

from cpns.crypto.keywrap import NONCE_LEN, Sealer
from cpns.errors import AuthenticationFailed, ConfigurationError, LocalProtocolError, StoreError
from cpns.messages.constants import ID_PATTERN
from cpns.store.masterkey import MasterKey, fsync_directory, write_private_file

__all__ = ["LocalKeyStore"]

#: First bytes of every store file: says what the file is before any crypto runs.
_MAGIC: Final = b"CPNS-KS1"
_PURPOSE: Final = "local-keystore"
#: Nesting bound for :func:`_check_value`; a key store is a few levels deep at most.
_MAX_DEPTH: Final = 32
#: First bytes of every journal generation file.
_JOURNAL_MAGIC: Final = b"CPNS-KJ1"
#: Seal purpose of journal frames (never confused with a store file's content).
_JOURNAL_PURPOSE: Final = "local-keystore-journal"
#: Each frame: its sealed length (4 bytes, big-endian), then the sealed CBOR map
#: ``{record name: record map, or None for a deletion}``.
_FRAME_HEADER: Final = struct.Struct(">I")
#: Default size at which a journal generation is closed (and then compacted).
DEFAULT_JOURNAL_LIMIT: Final = 1024 * 1024

#: Record name -> record map, or None: the record is deleted.
type RecordChanges = Mapping[str, dict[str, Any] | None]


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(slots=True)
class _Generation:
    """The journal generation this instance appends to."""

    number: int
    path: Path
    fd: int
    #: Bytes written and flushed so far (the magic included).
    size: int
    #: Sequence number of the next frame.
    seq: int


class LocalKeyStore:
    """One sealed key-store file, its records and their journal.

    ``path`` is the store file; ``key`` (at least 16 bytes) seals it. The lock file is
    ``path`` with the suffix ``.lock``. Record writes (:meth:`commit_records`) and
    :meth:`compact_records` may be called from several threads; a store's journal is
    written by one process only (the one holding the lock, for a daemon).
    """

    #: A journal generation is closed once it holds this many bytes (see compact_records).
    journal_limit: int = DEFAULT_JOURNAL_LIMIT

    def __init__(
        self, path: Path, key: bytes, *, _sealers: tuple[Sealer, Sealer] | None = None
    ) -> None:
        """Bind the store to ``path`` and ``key``; nothing is read or created yet."""
        if len(key) < 16:
            raise LocalProtocolError("a key store key is at least 16 bytes")
        self._path = Path(path)
        self._key = bytes(key)
        # The sealing keys, derived once (a record store shares its parent's).
        self._sealer, self._journal_sealer = _sealers or (
            Sealer(self._key, _PURPOSE),
            Sealer(self._key, _JOURNAL_PURPOSE),
        )
        self._lock_fd: int | None = None
        #: Serialises appends to the journal (and choosing which generations are closed).
        self._journal_lock = threading.Lock()
        #: Serialises compactions (they must fold generations strictly oldest first).
        self._compact_lock = threading.Lock()
        self._journal: _Generation | None = None
        self._journal_closer: weakref.finalize[Any, Any] | None = None
        #: Highest generation number this instance has used.
        self._last_generation = 0
        #: Whether this instance closed a generation that is not compacted yet.
        self._compaction_due = False

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
        """Close the journal generation in use (the next writer starts a new one) and
        release the lock; does nothing more if this instance does not hold it."""
        self.close_journal()
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
            plaintext = self._sealer.open(blob[len(_MAGIC) :], context=(self._path.name,))
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
        self._write(data, sync_directory=True)

    def _write(self, data: dict[str, Any], *, sync_directory: bool) -> None:
        blob = self._seal(data)
        try:
            write_private_file(
                self._path, _MAGIC + blob, overwrite=True, sync_directory=sync_directory
            )
        except OSError as exc:
            raise StoreError(f"cannot write key store {self._path}: {exc}") from None

    def _seal(self, data: dict[str, Any]) -> bytes:
        """The sealed content of this store file holding ``data`` (without the magic)."""
        _check_value(data, "data")
        plaintext: bytes = cbor2.dumps(data, canonical=True)
        return self._sealer.seal(
            plaintext, context=(self._path.name,), nonce=secrets.token_bytes(NONCE_LEN)
        )

    # -- records ----------------------------------------------------------------------

    @property
    def records_dir(self) -> Path:
        """The directory of this store's records, ``<name>.d`` beside the store file."""
        return self._path.with_suffix(".d")

    def _record(self, name: str) -> LocalKeyStore:
        if ID_PATTERN.fullmatch(name) is None:
            raise LocalProtocolError(f"bad record name {name!r}")
        return LocalKeyStore(
            self.records_dir / f"{name}.store",
            self._key,
            _sealers=(self._sealer, self._journal_sealer),
        )

    def load_records(self) -> dict[str, dict[str, Any]]:
        """Every record, by name (``{}`` if there are none yet): the record files, then
        every journal generation replayed on top, oldest first.

        Raises:
            StoreError: the directory cannot be listed, a record does not open, or a
                journal is damaged (anywhere but in a torn last frame).
        """
        try:
            paths = sorted(self.records_dir.glob("*.store"))
        except OSError as exc:  # pragma: no cover - glob swallows most errors itself
            raise StoreError(f"cannot list {self.records_dir}: {exc}") from None
        records = {
            path.stem: self._record(path.stem).load()
            for path in paths
            if ID_PATTERN.fullmatch(path.stem) is not None
        }
        for generation in self._generations():
            for frame in self._read_generation(generation):
                for name, data in frame.items():
                    if data is None:
                        records.pop(name, None)
                    else:
                        records[name] = data
        return dict(sorted(records.items()))

    def save_record(self, name: str, data: dict[str, Any]) -> None:
        """Replace (or create) record ``name`` durably: :meth:`commit_records` of one.

        Raises:
            LocalProtocolError: ``name`` is not an Entity ID, or ``data`` holds a value of
                another type.
            StoreError: the record cannot be written.
        """
        self.commit_records({name: data})

    def delete_record(self, name: str) -> None:
        """Remove record ``name`` durably; nothing happens if it does not exist.

        Raises:
            LocalProtocolError: ``name`` is not an Entity ID.
            StoreError: the deletion cannot be written.
        """
        self.commit_records({name: None})

    def commit_records(self, changes: RecordChanges) -> None:
        """Write several records at once (``None`` deletes one): one frame appended to the
        journal with one synchronous ``write`` (data and size on disk when it returns).

        When this returns, every change is durable; if it raises, none was acknowledged
        (the frame is cut off again where possible; at worst a crash right then finds it
        whole, as a file whose fsync failed may still be found). Calls from several
        threads are serialised, so frames are appended in call order.

        Raises:
            LocalProtocolError: a name is not an Entity ID, or a record holds a value of
                another type.
            StoreError: the journal cannot be written.
        """
        for name, data in changes.items():
            if ID_PATTERN.fullmatch(name) is None:
                raise LocalProtocolError(f"bad record name {name!r}")
            if data is not None:
                _check_value(data, f"record {name}")
        if not changes:
            return
        plaintext = cbor2.dumps(dict(changes))
        with self._journal_lock:
            self._append(plaintext)

    @property
    def compaction_due(self) -> bool:
        """Whether this instance closed a journal generation that is not compacted yet."""
        return self._compaction_due

    def compact_records(self) -> int:
        """Fold every closed journal generation into the record files and delete them;
        return the number of records written or removed.

        A generation is closed when it is not the one this instance appends to (at
        start-up: every generation on disk). Each record touched is written once, with
        its newest state in those generations (atomic files, the directory fsynced once);
        only then are the generations deleted, oldest first, so a crash at any point
        reads the same records (what is left of the journal replays the very states the
        files already hold). Safe to run while another thread commits.

        Raises:
            StoreError: a generation cannot be read or a record file cannot be written;
                what is not compacted stays in the journal (nothing is lost).
        """
        with self._compact_lock:
            with self._journal_lock:
                current = self._journal.number if self._journal is not None else None
                closed = [g for g in self._generations() if current is None or g < current]
                self._compaction_due = False
            try:
                folded: dict[str, dict[str, Any] | None] = {}
                for generation in closed:
                    for frame in self._read_generation(generation):
                        folded.update(frame)
                written = self._write_record_files(folded)
                for generation in closed:
                    path = self._journal_path(generation)
                    try:
                        path.unlink(missing_ok=True)
                        fsync_directory(path.parent)
                    except OSError as exc:
                        raise StoreError(f"cannot remove journal {path}: {exc}") from None
            except BaseException:
                self._compaction_due = True
                raise
            return written

    def close_journal(self) -> None:
        """Close the journal generation this instance appends to (the next commit starts
        a new one). Nothing is lost: every acknowledged frame is already durable."""
        with self._journal_lock:
            self._close_generation()

    # -- journal internals --------------------------------------------------------------

    def _journal_path(self, generation: int) -> Path:
        return self._path.with_name(f"{self._path.stem}.journal-{generation:08d}")

    def _generations(self) -> list[int]:
        """Numbers of the journal generations on disk, oldest first."""
        prefix = f"{self._path.stem}.journal-"
        try:
            names = os.listdir(self._path.parent)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {self._path.parent}: {exc}") from None
        numbers = []
        for name in names:
            digits = name.removeprefix(prefix)
            if digits != name and len(digits) == 8 and digits.isascii() and digits.isdigit():
                numbers.append(int(digits))
        return sorted(numbers)

    def _read_generation(self, generation: int) -> list[dict[str, dict[str, Any] | None]]:
        """The frames of one journal generation, oldest first, without a torn last frame.

        Raises StoreError: not a journal, or a frame other than the last does not open
        (the file was altered, truncated in the middle, or sealed under another key or
        file name), or a frame that opens is not a map of records."""
        path = self._journal_path(generation)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return []  # compacted meanwhile (a concurrent reader)
        except OSError as exc:
            raise StoreError(f"cannot read key store journal {path}: {exc}") from None
        if not blob.startswith(_JOURNAL_MAGIC):
            if _JOURNAL_MAGIC.startswith(blob):
                return []  # created, and the crash came before its magic was written
            raise StoreError(f"{path} is not a CPNS key store journal")
        frames = []
        pos = len(_JOURNAL_MAGIC)
        seq = 0
        header = _FRAME_HEADER.size
        while pos < len(blob):
            if len(blob) - pos < header:
                break  # a torn last frame: never acknowledged
            (size,) = _FRAME_HEADER.unpack_from(blob, pos)
            end = pos + header + size
            if end > len(blob):
                break  # a torn last frame
            try:
                plaintext = self._journal_sealer.open(
                    blob[pos + header : end], context=(path.name, seq)
                )
            except AuthenticationFailed:
                if not any(blob[end:]) and (end < len(blob) or blob[-1] == 0):
                    break  # the last frame, torn: its zero-filled tail never reached the disk
                raise StoreError(
                    f"key store journal {path} is damaged at byte {pos}: a frame does not "
                    "open (altered, cut in the middle, or sealed under another key or name)"
                ) from None
            frames.append(_decode_frame(plaintext, path))
            pos = end
            seq += 1
        return frames

    def _append(self, plaintext: bytes) -> None:
        """Seal and append one frame, durably (the caller holds the journal lock)."""
        journal = self._journal
        if journal is None:
            journal = self._journal = self._new_generation()
        blob = self._journal_sealer.seal(
            plaintext,
            context=(journal.path.name, journal.seq),
            nonce=secrets.token_bytes(NONCE_LEN),
        )
        frame = _FRAME_HEADER.pack(len(blob)) + blob
        try:
            # O_DSYNC: the write returns once the frame (and the file size) is on disk,
            # one system call where write + fdatasync would be two.
            _write_all(journal.fd, frame)
        except OSError as exc:
            # Not acknowledged: cut the frame off again if we can, and never append to
            # this file again (its tail is in doubt); the next commit opens a new one.
            with contextlib.suppress(OSError):
                os.ftruncate(journal.fd, journal.size)
                os.fdatasync(journal.fd)
            self._close_generation()
            raise StoreError(f"cannot write key store journal {journal.path}: {exc}") from None
        journal.size += len(frame)
        journal.seq += 1
        if journal.size >= self.journal_limit:
            self._close_generation()

    def _new_generation(self) -> _Generation:
        """Create the next journal generation (0600, magic written, file and directory
        fsynced)."""
        number = max([self._last_generation, *self._generations()]) + 1
        path = self._journal_path(number)
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                path,
                os.O_WRONLY
                | os.O_CREAT
                | os.O_EXCL
                | os.O_APPEND
                | os.O_DSYNC
                | os.O_NOFOLLOW
                | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise StoreError(f"cannot create key store journal {path}: {exc}") from None
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; make the mode exact
            _write_all(fd, _JOURNAL_MAGIC)
            os.fsync(fd)
            fsync_directory(path.parent)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise StoreError(f"cannot create key store journal {path}: {exc}") from None
        self._last_generation = number
        self._journal_closer = weakref.finalize(self, os.close, fd)
        return _Generation(number=number, path=path, fd=fd, size=len(_JOURNAL_MAGIC), seq=0)

    def _close_generation(self) -> None:
        """Stop appending to the current generation (the caller holds the journal lock)."""
        journal, self._journal = self._journal, None
        if journal is None:
            return
        if self._journal_closer is not None:
            self._journal_closer()  # closes the descriptor, once
            self._journal_closer = None
        if journal.seq:
            self._compaction_due = True
        else:  # nothing in it: nothing to fold
            with contextlib.suppress(OSError):
                journal.path.unlink()

    def _write_record_files(self, folded: dict[str, dict[str, Any] | None]) -> int:
        """Write (or remove) one record file per entry, durably.

        Every new file goes to a 0600 temp file first; once all of their bytes are on disk
        (one ``syncfs`` of the file system where Linux has it, else an fsync per file)
        they are renamed into place, and the directory is fsynced once. A crash leaves each
        record file old or new, never half written (the journal still replays it)."""
        if not folded:
            return 0
        directory = self.records_dir
        flush_all = _SYNCFS is not None
        temps: list[tuple[Path, Path]] = []
        try:
            if not directory.is_dir():
                directory.mkdir(mode=0o700, exist_ok=True)
                fsync_directory(self._path.parent)
            for name, data in folded.items():
                if data is None:
                    continue
                record = self._record(name)
                tmp = directory / f".{record.path.name}.{secrets.token_hex(8)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                temps.append((tmp, record.path))
                try:
                    os.fchmod(fd, 0o600)  # the umask can only remove bits; make it exact
                    _write_all(fd, _MAGIC + record._seal(data))
                    if not flush_all:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            if flush_all:
                _syncfs(directory)  # every temp file's bytes on disk before any rename
            for tmp, path in temps:
                os.replace(tmp, path)
            for name, data in folded.items():
                if data is None:
                    self._record(name).path.unlink(missing_ok=True)
            fsync_directory(directory)
        except OSError as exc:
            raise StoreError(f"cannot write records in {directory}: {exc}") from None
        finally:
            for tmp, _ in temps:  # those not renamed (a failure half way)
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        return len(folded)


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(2)`` (flush one file system), or None where libc has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS: Final = _load_syncfs()


def _syncfs(directory: Path) -> None:
    """Flush the file system holding ``directory`` (:data:`_SYNCFS` is not None): every
    file written there so far is on disk when this returns.

    Raises OSError: the flush failed."""
    assert _SYNCFS is not None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(fd)


def _decode_frame(plaintext: bytes, path: Path) -> dict[str, dict[str, Any] | None]:
    """One journal frame's map of record changes; StoreError if it is not one."""
    try:
        frame = cbor2.loads(plaintext)
    except Exception as exc:  # cbor2 raises several types; none may escape raw
        raise StoreError(f"key store journal {path} holds undecodable data: {exc}") from None
    if not isinstance(frame, dict) or not all(
        isinstance(name, str)
        and ID_PATTERN.fullmatch(name) is not None
        and (data is None or isinstance(data, dict))
        for name, data in frame.items()
    ):
        raise StoreError(f"key store journal {path} holds a frame that is not a map of records")
    return frame
