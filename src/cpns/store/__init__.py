"""Persistence: the server store (SQL, in-memory), the master key, local key stores.

Only this package knows SQL or file formats (STYLE §2). The contract is
:mod:`cpns.store.base`; :class:`SQLStore` is the real server store (SQLite or
PostgreSQL, group commit, secrets sealed under a :class:`MasterKey`), :class:`MemoryStore`
the one for unit tests, and :class:`LocalKeyStore` the sealed, atomically written file of
a PN GW or a PNE.
"""

from cpns.errors import StoreError
from cpns.store.base import (
    AuditEvent,
    ConflictError,
    EntityRecord,
    NonceReused,
    PendingEntry,
    PendingEstablishment,
    PNMember,
    PNRecord,
    ServerStore,
    StoredReply,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.store.keystore import LocalKeyStore
from cpns.store.masterkey import MasterKey
from cpns.store.memory import MemoryStore
from cpns.store.sql import SQLStore, WriteStats

__all__ = [
    "AuditEvent",
    "ConflictError",
    "EntityRecord",
    "LocalKeyStore",
    "MasterKey",
    "MemoryStore",
    "NonceReused",
    "PNMember",
    "PNRecord",
    "PendingEntry",
    "PendingEstablishment",
    "SQLStore",
    "ServerStore",
    "StoreError",
    "StoredReply",
    "TKRecord",
    "UserRecord",
    "WriteStats",
    "WriteTx",
]
