-- 0003: PostgreSQL variant of ../0003_audit_aggregates.sql (aggregated audit rows, retention).
ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1 CHECK (count > 0);
ALTER TABLE audit ADD COLUMN source TEXT;

CREATE INDEX audit_at ON audit (at);
