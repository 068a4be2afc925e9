-- 0007: PostgreSQL variant of ../0007_pn_establishment.sql (pending PN establishments, the
-- PN inventory, the TK ratchet step).
CREATE TABLE pn_establishments (
    gateway_id TEXT NOT NULL,
    est_id BYTEA NOT NULL CHECK (length(est_id) = 16),
    pn_id TEXT NOT NULL,
    state_sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (gateway_id, est_id)
);

CREATE INDEX pn_establishments_expires_at ON pn_establishments (expires_at);

CREATE TABLE pns (
    pn_id TEXT PRIMARY KEY,
    gateway_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX pns_owner ON pns (owner, pn_id);
CREATE INDEX pns_gateway ON pns (gateway_id, pn_id);

CREATE TABLE pn_members (
    pn_id TEXT NOT NULL REFERENCES pns (pn_id) ON DELETE CASCADE,
    pne_id TEXT NOT NULL,
    flow TEXT NOT NULL CHECK (flow IN ('rand-hash', 'tk', '')),
    status TEXT NOT NULL CHECK (length(status) > 0),
    at BIGINT NOT NULL,
    PRIMARY KEY (pn_id, pne_id)
);

CREATE INDEX pn_members_pne ON pn_members (pne_id);

ALTER TABLE tk_records ADD COLUMN tk_step BIGINT NOT NULL DEFAULT 0 CHECK (tk_step >= 0);
