-- 0002: PostgreSQL variant of ../0002_auth_failures.sql (recent failed password proofs).
CREATE TABLE auth_failures (
    user_id TEXT PRIMARY KEY,
    failures INTEGER NOT NULL CHECK (failures > 0),
    expires_at BIGINT NOT NULL
);

CREATE INDEX auth_failures_expires_at ON auth_failures (expires_at);
