-- Recent failed password proofs per User ID (online guessing guard, deviations D-SRV-1).
-- Keyed by the User ID as sent, whether or not such a user exists, so a refusal for too
-- many attempts says nothing about which users exist.
CREATE TABLE auth_failures (
    user_id TEXT PRIMARY KEY,
    failures INTEGER NOT NULL CHECK (failures > 0),
    expires_at INTEGER NOT NULL
);

CREATE INDEX auth_failures_expires_at ON auth_failures (expires_at);
