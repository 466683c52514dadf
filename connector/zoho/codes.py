"""Per-record error codes the connector retries instead of dead-lettering.

Zoho answers these for one record (inside ``data`` of a record write, or in a Bulk Write result
row's ``ERRORS``) when the record cannot be written *now*, not because its values are wrong:

* ``RECORD_LOCKED`` — the record is locked by an approval process (or another lock) until the
  approval ends; record APIs' error enum (crm-oas v8.0 ``record.json``, SDK ``json_details``
  ``record.APIException``; zoho-crm-api.md §2.4, §5.3).
* ``CANNOT_PROCESS`` — listed among the Bulk Write result-file codes (zoho-crm-api.md §3.4,
  v7 download-result page) and the record APIs' error enum; Zoho gives no cause, and a retry is
  the safe reading (the emulator's ``skip_rows`` fault produces it).
* ``LIMIT_EXCEEDED`` — at record level a limit of the org was hit (bulk result-file code,
  zoho-crm-api.md §3.4); the request-level ``LIMIT_EXCEEDED`` (over 100 records) never reaches
  a per-record result because the client sends at most 100.

Which of these clear by themselves is not documented per code (UNCONFIRMED); the emitter
retries them with backoff for at most the pipeline's ``max_staleness`` and then dead-letters
them with the code and the number of attempts, so a lasting condition still ends visibly.
"""

from __future__ import annotations

TRANSIENT_RECORD_CODES = frozenset({"RECORD_LOCKED", "CANNOT_PROCESS", "LIMIT_EXCEEDED"})
