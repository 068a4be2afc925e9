-- 0004: PostgreSQL variant of ../0004_entity_epoch.sql (assignment epoch, compare and set).
ALTER TABLE entities ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0);
