-- v2: per-pipeline capture state (logical mode's last stored commit, slot and publication
-- names; trigger mode's installed trigger) and run ownership.

CREATE TABLE {schema}.capture_state (
    pipeline          text PRIMARY KEY,
    mode              text        NOT NULL CHECK (mode IN ('triggers', 'logical')),
    slot_name         text,
    publication_name  text,
    last_commit_lsn   pg_lsn,     -- the last source commit whose events are in the outbox
    last_source_xid   xid8,
    installed_at      timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE {schema}.checkpoints
    ADD COLUMN owner text;        -- the run holding the pipeline's advisory lock (informative)
