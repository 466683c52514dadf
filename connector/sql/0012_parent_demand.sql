-- v12: parents pulled forward (issue 21; docs/related-tables.md "Pull-forward").
--
-- A child change waiting for its parent records by when that parent must be in the CRM for
-- the child to leave within its own max_staleness (its deadline less the time it takes to see
-- the parent and send itself). The parent pipeline's engine reads the rows of its pipeline and
-- plans those keys with the earlier deadline; it deletes a row once the parent is in the CRM,
-- or an hour after the moment it named (a parent that never came). A table, not a channel
-- between engines: the parent pipeline may be owned by another process.
CREATE TABLE {schema}.parent_demand (
    pipeline   text        NOT NULL,  -- the parent's pipeline
    key        text        NOT NULL,  -- the parent's key
    needed_by  timestamptz NOT NULL,  -- the earliest moment a waiting child needs it by
    PRIMARY KEY (pipeline, key)
);
