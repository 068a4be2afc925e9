-- 0006: PostgreSQL variant of ../0006_flow_id.sql (flow ID of each audit row).
ALTER TABLE audit ADD COLUMN flow_id TEXT CHECK (flow_id IS NULL OR length(flow_id) = 16);

CREATE INDEX audit_flow_id ON audit (flow_id);
