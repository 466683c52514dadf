-- v5: what the CRM last acknowledged for a key, as a hash of the mapped record sent.
--
-- sent_hash: blake2b-128 of the JSON record (key field, mapped fields, the delete-mark false)
--   that the upsert API last wrote for the key and the CRM acknowledged. An update whose mapped
--   record hashes the same (only unmapped columns changed) is acknowledged without a CRM call
--   (issue 17 item 8). Cleared before every write of the key (its outcome may be lost), set by
--   the acknowledgement. NULL when unknown: written by a bulk job, a delete or mark, a dead
--   letter's key state, or cleared by a re-capture (verify --repair, replay, dead-letters retry)
--   so that those always send.
ALTER TABLE {schema}.key_state ADD COLUMN sent_hash bytea;
