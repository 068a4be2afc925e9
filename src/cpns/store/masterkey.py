"""The master key of Secure Storage, and the private-file helpers it needs.

002 §3.2 ("Secure Storage") asks that key material at rest be protected. The server seals
every secret column under a 32-byte master key (DESIGN §6), and that key must live
*outside* the database: a copy of ``cpns.db`` alone then reveals no EUKey, TK or password
key. The key comes from a key file or from the environment.

A key file is only trusted if no one but its owner can read it. :meth:`MasterKey.load`
refuses a file whose mode grants any group or other permission (``mode & 0o077``), the
way ``ssh`` refuses a private key with loose permissions: a key that others can read has
already leaked, and failing loudly at start-up is cheaper than finding out later.

:meth:`MasterKey.generate` writes a new key atomically (temp file, fsync, hard link into
place, fsync the directory) and never overwrites: replacing a master key would make every
sealed row unreadable, so a second ``generate`` on the same path is an error, not a reset.

The key never appears in ``repr`` or logs; :attr:`MasterKey.key_id` (8 hex characters of a
labelled SHA-256) names it instead, so two processes can be seen to use the same key.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cpns.crypto.hashing import KEY_LEN, hash_values
from cpns.errors import ConfigurationError

__all__ = ["MasterKey", "fsync_directory", "write_private_file"]

#: Environment variable read by :meth:`MasterKey.from_env` unless told otherwise.
DEFAULT_ENV_VAR = "CPNS_MASTER_KEY"

_KEY_ID_LABEL = "cpns/v1/master-key-id"


def fsync_directory(directory: Path) -> None:
    """fsync a directory so that a rename or link inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(
    path: Path, data: bytes, *, overwrite: bool, sync_directory: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically as a 0600 file.

    The bytes go to a temp file in the same directory (created 0600, so they are never
    readable by others, not even for an instant), which is flushed and fsynced, then moved
    into place and the directory fsynced. A crash leaves either the old file or the new
    one, never half of one.

    With ``overwrite=False`` the temp file is hard-linked to ``path``, which fails if
    ``path`` exists (:class:`FileExistsError`); ``os.replace`` would silently clobber it.

    ``sync_directory=False`` leaves the directory fsync to the caller, who writes several
    files into one directory and then fsyncs it once (until then, a crash may leave the
    old file in place of the new one, never half of either).

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
        OSError: any other I/O failure; no temp file is left behind.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; make the mode exact
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_directory:
        fsync_directory(directory)


def _parse_key(raw: bytes, *, origin: str) -> bytes:
    """Accept 32 raw bytes or 64 hex digits (surrounding whitespace allowed)."""
    if len(raw) == KEY_LEN:
        return raw
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigurationError(
            f"{origin}: a master key is {KEY_LEN} raw bytes or {2 * KEY_LEN} hex digits"
        ) from None
    if len(key) != KEY_LEN:
        raise ConfigurationError(
            f"{origin}: a master key is {KEY_LEN} bytes, this one has {len(key)}"
        )
    return key


class MasterKey:
    """A 32-byte key sealing the secrets of a store at rest.

    Build it with :meth:`load`, :meth:`from_env` or :meth:`generate`; the constructor takes
    the raw bytes (tests, or a key fetched from a KMS by the caller).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        """Wrap ``key``; :class:`ConfigurationError` unless it is exactly 32 bytes."""
        if len(key) != KEY_LEN:
            raise ConfigurationError(f"a master key is {KEY_LEN} bytes, not {len(key)}")
        self._key = bytes(key)

    @property
    def key(self) -> bytes:
        """The raw key bytes. Never log them; log :attr:`key_id`."""
        return self._key

    @property
    def key_id(self) -> str:
        """8 hex characters naming the key in logs: SHA-256 of a label and the key."""
        return hash_values(_KEY_ID_LABEL, self._key).hex()[:8]

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.key_id)

    @classmethod
    def load(cls, path: Path | str) -> MasterKey:
        """Read a key file (32 raw bytes or 64 hex digits).

        Raises:
            ConfigurationError: the file is missing, unreadable, not a regular file,
                readable or writable by group or others (``mode & 0o077``), or does not
                hold a 32-byte key.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ConfigurationError(f"master key file {path} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot open master key file {path}: {exc}") from None
        try:
            # fstat the descriptor we read from, so the file checked is the file used.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigurationError(f"master key file {path} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ConfigurationError(
                    f"master key file {path} has mode {mode:04o}, which lets group or others "
                    f"access it; the key must be private: chmod 600 {path}"
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(4 * KEY_LEN)
        except OSError as exc:
            raise ConfigurationError(f"cannot read master key file {path}: {exc}") from None
        finally:
            os.close(fd)
        return cls(_parse_key(raw, origin=str(path)))

    @classmethod
    def from_env(
        cls, var: str = DEFAULT_ENV_VAR, *, environ: Mapping[str, str] | None = None
    ) -> MasterKey:
        """Read the key as 64 hex digits from an environment variable.

        Args:
            var: the variable name.
            environ: the mapping to read (default ``os.environ``), for tests.

        Raises:
            ConfigurationError: the variable is unset or not a hex 32-byte key.
        """
        env = os.environ if environ is None else environ
        value = env.get(var)
        if not value:
            raise ConfigurationError(f"environment variable {var} (the master key) is not set")
        try:
            key = bytes.fromhex(value.strip())
        except ValueError:
            raise ConfigurationError(f"{var}: the master key must be hex") from None
        if len(key) != KEY_LEN:
            raise ConfigurationError(
                f"{var}: a master key is {KEY_LEN} bytes ({2 * KEY_LEN} hex digits)"
            )
        return cls(key)

    @classmethod
    def generate(cls, path: Path | str) -> MasterKey:
        """Create a new random key in a new 0600 file (hex, one line) and return it.

        Raises:
            ConfigurationError: ``path`` already exists (a master key is never
                overwritten: every row sealed under it would be lost) or cannot be written.
        """
        path = Path(path)
        key = secrets.token_bytes(KEY_LEN)
        try:
            write_private_file(path, key.hex().encode("ascii") + b"\n", overwrite=False)
        except FileExistsError:
            raise ConfigurationError(
                f"master key file {path} already exists; refusing to overwrite it"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot write master key file {path}: {exc}") from None
        return cls(key)
