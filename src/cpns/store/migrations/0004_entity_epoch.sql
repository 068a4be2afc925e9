-- Assignment epoch of each entity (deviations D-003-11): 0 before the first assignment,
-- +1 at each one. The 003 Notification carries it so a PNE refuses a superseded one, and
-- an assignment is written only if the row is still at the epoch its checks saw (compare
-- and set: racing claims of one Entity ID have exactly one winner).
ALTER TABLE entities ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0);
