-- v4: outbox retention (connector/outbox.py ``prune``, the ``outbox-retention`` task of
-- `connector run`). One row per pipeline that retention has pruned: the highest offset and the
-- latest capture time among the rows deleted, so that `connector replay` can tell a range that
-- was pruned from one in which nothing was captured.
CREATE TABLE {schema}.outbox_pruned (
    pipeline          text PRIMARY KEY,
    max_id            bigint      NOT NULL,   -- highest outbox offset pruned
    max_captured_at   timestamptz NOT NULL,   -- latest captured_at pruned
    rows_pruned       bigint      NOT NULL DEFAULT 0,
    pruned_at         timestamptz NOT NULL DEFAULT now()
);
