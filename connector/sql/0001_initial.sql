-- State schema v1. The schema name is substituted as a quoted identifier by db.py
-- (psycopg.sql), written here as {schema}. See DESIGN.md §4 and docs/architecture.md.

CREATE TABLE {schema}.outbox (
    id            bigserial PRIMARY KEY,                      -- offset in the log
    pipeline      text        NOT NULL,
    op            text        NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'snapshot')),
    key           text        NOT NULL,                       -- parent_id, as text
    version       bigint      NOT NULL,                       -- per-key order (see events.py)
    txid          xid8        NOT NULL DEFAULT pg_current_xact_id(),  -- writer of this row
    source_xid    xid8        NOT NULL DEFAULT pg_current_xact_id(),  -- legacy transaction
    source_lsn    pg_lsn,                                     -- commit LSN (logical mode)
    chunk_id      bigint,                                     -- snapshot chunk (op = snapshot)
    row           jsonb,                                      -- full row image
    captured_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_pipeline_id ON {schema}.outbox (pipeline, id);
CREATE INDEX outbox_txid ON {schema}.outbox (txid);
CREATE INDEX outbox_pipeline_key ON {schema}.outbox (pipeline, key, id);
CREATE INDEX outbox_captured_at ON {schema}.outbox (captured_at);

-- The reader's position per pipeline: every outbox row with id <= last_id is delivered, except
-- those written by the transactions in pending_txids (in progress when the position was taken).
CREATE TABLE {schema}.checkpoints (
    pipeline       text PRIMARY KEY,
    last_id        bigint      NOT NULL DEFAULT 0,
    pending_txids  xid8[]      NOT NULL DEFAULT ARRAY[]::xid8[],
    events_passed  bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.key_state (
    pipeline       text        NOT NULL,
    key            text        NOT NULL,
    crm_id         text,
    version        bigint,                -- last acknowledged (or dead-lettered) version
    source_xid     xid8,
    snapshot       pg_snapshot,           -- set when that version was a snapshot row
    deleted        boolean     NOT NULL DEFAULT false,
    status         text        NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('synced', 'pending', 'failed')),
    last_error     text,
    synced_at      timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, key)
);
CREATE INDEX key_state_status ON {schema}.key_state (pipeline, status);

CREATE TABLE {schema}.dead_letters (
    id             bigserial PRIMARY KEY,
    pipeline       text        NOT NULL,
    key            text        NOT NULL,
    version        bigint      NOT NULL,
    source_xid     xid8,
    outbox_id      bigint,
    payload        jsonb,
    error_code     text        NOT NULL,
    error_field    text,
    error_message  text        NOT NULL,
    api            text,
    attempts       integer     NOT NULL DEFAULT 1,
    status         text        NOT NULL DEFAULT 'open'
                   CHECK (status IN ('open', 'retried', 'discarded', 'resolved')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_open ON {schema}.dead_letters (pipeline, status, key);

CREATE TABLE {schema}.bulk_jobs (
    id             bigserial PRIMARY KEY,
    pipeline       text        NOT NULL,
    status         text        NOT NULL DEFAULT 'intent'
                   CHECK (status IN ('intent', 'uploaded', 'created', 'running',
                                     'completed', 'failed', 'applied', 'abandoned')),
    operation      text        NOT NULL DEFAULT 'upsert',
    file_id        text,
    job_id         text,
    callback_secret text,
    entries        jsonb       NOT NULL,   -- list of (key, version, source_xid, snapshot, op, outbox_id) objects
    record_count   integer     NOT NULL,
    added_count    integer,
    updated_count  integer,
    skipped_count  integer,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bulk_jobs_open ON {schema}.bulk_jobs (pipeline, status);

CREATE TABLE {schema}.snapshots (
    pipeline       text PRIMARY KEY,
    status         text        NOT NULL DEFAULT 'running'
                   CHECK (status IN ('running', 'done', 'failed')),
    cursor         jsonb,                  -- last key read, in key order
    chunks_done    integer     NOT NULL DEFAULT 0,
    rows_read      bigint      NOT NULL DEFAULT 0,
    estimated_rows bigint,
    report         jsonb,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

CREATE TABLE {schema}.snapshot_chunks (
    id             bigserial PRIMARY KEY,
    pipeline       text        NOT NULL,
    chunk_no       integer     NOT NULL,
    snapshot       pg_snapshot NOT NULL,   -- the snapshot the chunk was read in
    first_key      jsonb,
    last_key       jsonb,
    rows           integer     NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pipeline, chunk_no)
);

-- Credits spent, per call, so `status` and the planner can see the rolling 24 h window.
CREATE TABLE {schema}.credit_ledger (
    id             bigserial PRIMARY KEY,
    pipeline       text,
    api            text        NOT NULL,
    credits        integer     NOT NULL,
    records        integer     NOT NULL DEFAULT 0,
    remaining      bigint,                 -- X-API-CREDITS-REMAINING when the CRM sent it
    spent_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_ledger_time ON {schema}.credit_ledger (spent_at);
