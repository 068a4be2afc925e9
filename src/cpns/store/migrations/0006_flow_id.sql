-- Flow (correlation) ID of each audit row (docs/logging.md): the 16 hex digits carried in
-- the messages of the flow the event belongs to, so an audit row can be matched with the
-- log lines of the three parties (cpns trace). Not a security input; NULL when the
-- message carried none. Indexed for "cpns admin audit --flow".
ALTER TABLE audit ADD COLUMN flow_id TEXT CHECK (flow_id IS NULL OR length(flow_id) = 16);

CREATE INDEX audit_flow_id ON audit (flow_id);
