-- Digest nc replay guard shared by every server process (RFC 7616 §5.4): per nonce in
-- use, the highest nc accepted and the bitmap of the nc_window values below it (bit i:
-- highest - i was seen; big-endian bytes). Updated by compare and set; a row is purged
-- once keep_until has passed, when its nonce is stale by age on every process.
CREATE TABLE digest_nc (
    nonce TEXT PRIMARY KEY,
    highest INTEGER NOT NULL CHECK (highest > 0),
    seen BLOB NOT NULL,
    keep_until INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX digest_nc_keep_until ON digest_nc (keep_until);
