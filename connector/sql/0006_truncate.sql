-- v6: TRUNCATE of a captured table (docs/capture.md, "TRUNCATE").
--
-- The outbox gets a 'truncate' event (key '', no row image) from both capture modes: trigger
-- mode's statement-level AFTER TRUNCATE trigger, logical mode's pgoutput Truncate message.
-- NOT VALID: the rows already there passed the narrower check, and validating would hold an
-- exclusive lock on the outbox (so on every captured write) while the whole table is scanned.
ALTER TABLE {schema}.outbox DROP CONSTRAINT outbox_op_check;
ALTER TABLE {schema}.outbox ADD CONSTRAINT outbox_op_check
    CHECK (op IN ('insert', 'update', 'delete', 'snapshot', 'truncate')) NOT VALID;

-- One row per TRUNCATE the pipeline has seen, with what it did (pipelines.on_truncate):
-- 'held' (the CRM records stay; `status`, a metric and an alert show it until
-- `connector verify --repair` reconciles, which sets resolved_at) or 'propagated' (delete_mode
-- applied to every key known then). crm_keys: the keys known to be in the CRM at that moment.
CREATE TABLE {schema}.truncations (
    pipeline     text        NOT NULL,
    outbox_id    bigint      NOT NULL,
    version      bigint      NOT NULL,
    source_time  timestamptz NOT NULL,
    action       text        NOT NULL CHECK (action IN ('held', 'propagated')),
    crm_keys     bigint      NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    PRIMARY KEY (pipeline, outbox_id)
);
