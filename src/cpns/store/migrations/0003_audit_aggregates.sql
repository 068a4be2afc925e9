-- Aggregated audit rows and audit retention (deviations D-SRV-2): one row may stand for
-- many unauthenticated refusals with the same procedure, outcome, source and User ID
-- (count), the source is the client address, and rows older than the retention are
-- purged by time (index on at).
ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1 CHECK (count > 0);
ALTER TABLE audit ADD COLUMN source TEXT;

CREATE INDEX audit_at ON audit (at);
