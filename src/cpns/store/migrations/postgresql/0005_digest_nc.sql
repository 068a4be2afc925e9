-- 0005: PostgreSQL variant of ../0005_digest_nc.sql (Digest nc replay guard).
CREATE TABLE digest_nc (
    nonce TEXT PRIMARY KEY,
    highest BIGINT NOT NULL CHECK (highest > 0),
    seen BYTEA NOT NULL,
    keep_until BIGINT NOT NULL
);

CREATE INDEX digest_nc_keep_until ON digest_nc (keep_until);
