-- v10: what the operator needs to see.
--
-- checkpoints.writes_after: after an unclean takeover the new owner captures at once but waits
--   crm.request_timeout before its first CRM write (requests the dead owner had in flight may
--   still land). It records when that wait ends, so that `connector status` can say why changes
--   are pending meanwhile. NULL or in the past: no wait.
-- dead_letters.error_details: the CRM's `details` object of the rejection (maximum_length,
--   supported_values, expected_data_type, api_name, …; never the record's values), shown by
--   `connector dead-letters show`.
ALTER TABLE {schema}.checkpoints ADD COLUMN writes_after timestamptz;
ALTER TABLE {schema}.dead_letters ADD COLUMN error_details jsonb;
