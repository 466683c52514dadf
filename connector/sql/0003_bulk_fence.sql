-- v3: bulk jobs that may run on the CRM without their id being known, and measured durations.
--
-- fence_until: an abandoned job whose create call may have reached the CRM (status was
--   'uploaded' when the process died, or the create call failed without an answer). The CRM may
--   still run it and write its (older) values; its keys are not sent again before this time, or
--   before the job's callback arrives (the callback URL carries the job row id and its secret,
--   which is stored before the create call). NULL: nothing to fence.
-- duration_seconds: intent to result, measured by the process that ran the job from start to
--   finish (NULL for jobs resumed after a restart): the engine's bulk latency estimate is
--   restored from the latest of these on start.
ALTER TABLE {schema}.bulk_jobs
    ADD COLUMN fence_until      timestamptz,
    ADD COLUMN duration_seconds double precision;

CREATE INDEX bulk_jobs_fenced ON {schema}.bulk_jobs (pipeline) WHERE fence_until IS NOT NULL;
