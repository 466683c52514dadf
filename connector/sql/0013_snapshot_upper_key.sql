-- v13: an initial sync reads the rows that were in the table when it started, and ends.
--
-- Until v12 a snapshot read chunks (key > cursor) until a chunk came back empty. Under a steady
-- stream of inserts at growing keys (new orders), each chunk found the rows inserted while the
-- previous one was being sent, so the snapshot never ended: the 60-minute soak of session 20
-- saw the orders' initial sync still running after 22 minutes, with the lines' initial sync
-- waiting for it (parents first). Rows inserted after the first chunk's snapshot are captured
-- live (capture is installed before a snapshot starts: Snapshotter.prepare refuses otherwise),
-- so reading them again only sent them twice. upper_key is the largest key in the first
-- chunk's snapshot (JSON, as cursor); later chunks read key > cursor AND key <= upper_key.
-- NULL: not known yet (before the first chunk), or a snapshot started before v13 (unbounded,
-- as then).
ALTER TABLE {schema}.snapshots ADD COLUMN upper_key jsonb;
ALTER TABLE {schema}.snapshots ADD COLUMN upper_known boolean NOT NULL DEFAULT false;
