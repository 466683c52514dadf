-- v9: how long a new owner must wait before its first CRM write (issue 14 §1, the stall).
--
-- crm_quiet_until: set by an owner that took over from one that did not stop cleanly: requests
--   sent by an earlier owner may still be applied by the CRM until this time (its takeover time
--   + crm.request_timeout). Cleared (NULL) by the owner just before its engine's first CRM
--   write. An owner that finds it set knows its predecessor never wrote (it was killed during
--   its own wait) and waits only until the same time instead of a full request_timeout again:
--   kills 10 s apart no longer keep the pipeline from writing for good.
ALTER TABLE {schema}.checkpoints ADD COLUMN crm_quiet_until timestamptz;
