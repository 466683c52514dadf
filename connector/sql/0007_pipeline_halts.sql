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
