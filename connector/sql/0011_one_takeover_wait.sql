-- v11: the takeover wait is stored once (issue 20: one owner per concern).
--
-- v9 (crm_quiet_until) and v10 (writes_after) both recorded when an owner that took over after
-- an unclean stop may send its first CRM write. checkpoints.crm_quiet_until stays, with the
-- meaning of v9 (set at that takeover, cleared just before the first write) and is now also
-- what `connector status` reads (see state.takeover / state.writes_wait_left).
-- The data move may only lengthen a running wait, never shorten or start one: where a wait is
-- still recorded the later of the two ends is kept; where crm_quiet_until is NULL the owner
-- already wrote (a successor waits in full) and writes_after is only a past record.
UPDATE {schema}.checkpoints
   SET crm_quiet_until = greatest(crm_quiet_until, writes_after)
 WHERE crm_quiet_until IS NOT NULL AND writes_after IS NOT NULL;
ALTER TABLE {schema}.checkpoints DROP COLUMN writes_after;
