-- 0001: initial schema of the CPNS Server store (DESIGN §6).
--
-- Applied by cpns.store.sql inside one write transaction, after which PRAGMA user_version
-- is set to 1. Columns named *_sealed hold values sealed with cpns.crypto.keywrap.seal under
-- the master key (002 §3.2 Secure Storage): purpose "store/<table>.<column>", associated
-- data the row's primary key. Times are integer epoch seconds.

-- One row: a value sealed under the master key, so opening the database with another key
-- fails at start-up rather than at the first read of a secret.
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    password_key_sealed BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
);

-- eukeys_sealed: the EUKey (set) as ONE sealed blob of concatenated 32-byte keys.
CREATE TABLE entities (
    entity_id TEXT PRIMARY KEY,
    kind INTEGER NOT NULL,
    owner TEXT NOT NULL REFERENCES users (user_id),
    eukeys_sealed BLOB NOT NULL,
    key_index INTEGER NOT NULL DEFAULT 0 CHECK (key_index >= 0),
    assigned_via TEXT,
    assigned_at INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
);

CREATE INDEX entities_owner ON entities (owner, entity_id);

-- Manufacturer Temporary Keys (003 §7.4.2.2). No foreign key: TKs are imported before the
-- entity exists on the server.
CREATE TABLE tk_records (
    entity_id TEXT PRIMARY KEY,
    tk_sealed BLOB NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    imported_at INTEGER NOT NULL DEFAULT 0
);

-- Used random values (RANDPNGW, rand): SHA-256 of the value, never the value itself.
CREATE TABLE nonces (
    nonce_hash BLOB PRIMARY KEY,
    expires_at INTEGER NOT NULL
);

CREATE INDEX nonces_expires_at ON nonces (expires_at);

-- Replies already sent, so a retried transaction gets the same bytes (DESIGN §5).
CREATE TABLE replies (
    requester TEXT NOT NULL,
    txid BLOB NOT NULL,
    request_digest BLOB NOT NULL,
    reply_sealed BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (requester, txid)
);

CREATE INDEX replies_created_at ON replies (created_at);

-- Audit trail of security events (DESIGN §7). Never holds a secret.
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    procedure TEXT NOT NULL,
    outcome TEXT NOT NULL,
    entity_id TEXT,
    user_id TEXT,
    hop TEXT NOT NULL,
    correlation_id TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
