-- PN Establishment (002 §7.5.4, 000): the server's pending establishments, the PN
-- inventory, and the ratchet step of each TK.
--
-- Pending state between the server's AUTHENTICATE Request and the PN GW's AUTHENTICATE
-- Response, one row per establishment, so any server process (or one restarted) takes
-- the second half. state_sealed: rand_server and the per-PNE entries (PNE ID, rand_PNE,
-- flow, TK step, EUKey index, LocalEUKey) as one CBOR value sealed under the master key
-- (purpose store/pn_establishments.state, associated data (gateway_id, est_id)). Purged
-- after expires_at.
CREATE TABLE pn_establishments (
    gateway_id TEXT NOT NULL,
    est_id BLOB NOT NULL CHECK (length(est_id) = 16),
    pn_id TEXT NOT NULL,
    state_sealed BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, est_id)
);

CREATE INDEX pn_establishments_expires_at ON pn_establishments (expires_at);

-- The PN inventory (002 definitions): each PN, its PN GW and owner, and the outcome of
-- the latest attempt of every PNE its establishments listed. status is 'member' for a PNE
-- that joined, else the ErrorCode name of its failure (not a member). flow is 'rand-hash',
-- 'tk', or '' when the PNE was refused before a flow was chosen.
CREATE TABLE pns (
    pn_id TEXT PRIMARY KEY,
    gateway_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE INDEX pns_owner ON pns (owner, pn_id);
CREATE INDEX pns_gateway ON pns (gateway_id, pn_id);

CREATE TABLE pn_members (
    pn_id TEXT NOT NULL REFERENCES pns (pn_id) ON DELETE CASCADE,
    pne_id TEXT NOT NULL,
    flow TEXT NOT NULL CHECK (flow IN ('rand-hash', 'tk', '')),
    status TEXT NOT NULL CHECK (length(status) > 0),
    at INTEGER NOT NULL,
    PRIMARY KEY (pn_id, pne_id)
);

CREATE INDEX pn_members_pne ON pn_members (pne_id);

-- The TK stored is TK_{tk_step} (000 TK ratchet); advanced by compare and set.
ALTER TABLE tk_records ADD COLUMN tk_step INTEGER NOT NULL DEFAULT 0 CHECK (tk_step >= 0);
