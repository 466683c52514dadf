-- v14: the parent record each subform set was last written to (issue 21, question 4).
--
-- A subform pipeline writes an order's complete line set to the order's CRM record. When the
-- order is deleted (delete_mode "delete": Zoho deletes the record's subform rows with it) and
-- inserted again, the orders' pipeline creates a new record, without rows; if the lines
-- outlive their order (no foreign key with ON DELETE CASCADE) and none of them changes, no line
-- event would ever rewrite it. The lines' engine compares this table with the orders'
-- key_state (crm_id) and writes again every set whose record changed
-- (connector.emitter_subform.SubformWrites.rewrite_moved_sets).
CREATE TABLE {schema}.subform_sets (
    pipeline   text        NOT NULL,  -- the subform pipeline
    parent_key text        NOT NULL,  -- the parent's legacy key
    crm_id     text        NOT NULL,  -- the record its set was last written to
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, parent_key)
);
