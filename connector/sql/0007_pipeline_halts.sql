-- v7: a pipeline stopped by a schema change of its source table (a mapped column dropped or
-- renamed while it ran: connector.errors.SchemaChanged). Written by the process that stopped it,
-- shown by `connector status`, cleared when the pipeline starts again.
CREATE TABLE {schema}.pipeline_halts (
    pipeline      text PRIMARY KEY,
    reason        text        NOT NULL,      -- 'schema_changed'
    column_name   text,
    message       text        NOT NULL,
    halted_at     timestamptz NOT NULL DEFAULT now()
);

-- The source types of each pipeline's mapped columns, as first seen when the pipeline started
-- (connector/emitter.py, ``load_source_types``): an unconvertible value of a column whose type
-- is no longer this one stops the pipeline (a schema change) instead of being a dead letter.
-- Kept across restarts and owners; a column's row is removed when a schema change stops the
-- pipeline on it, so that restarting takes the new type (the operator's decision).
CREATE TABLE {schema}.source_column_types (
    pipeline      text NOT NULL,
    column_name   text NOT NULL,
    source_type   text NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, column_name)
);
