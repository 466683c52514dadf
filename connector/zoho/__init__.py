"""Zoho CRM client: OAuth (auth.py), records and bulk APIs (client.py, with its HTTP layer in
transport.py, the Bulk Write calls in bulk_write.py and reply parsing in records.py), bulk files
(bulk.py), adaptive concurrency (limiter.py). See docs/zoho-client.md."""

from __future__ import annotations

from connector.costs import CreditCosts
from connector.zoho.auth import MemoryTokenStore, PgTokenStore, TokenManager, TokenStore
from connector.zoho.bulk import (
    BulkFile,
    BulkJob,
    BulkRowResult,
    JobStatus,
    RowOutcome,
    build_bulk_zip,
    match_results,
    normalise_job_status,
    parse_result_zip,
)
from connector.zoho.client import (
    CallHook,
    FieldMeta,
    RecordResult,
    RetryPolicy,
    ZohoClient,
)
from connector.zoho.limiter import AdaptiveLimiter

__all__ = [
    "AdaptiveLimiter",
    "BulkFile",
    "BulkJob",
    "BulkRowResult",
    "CallHook",
    "CreditCosts",
    "FieldMeta",
    "JobStatus",
    "MemoryTokenStore",
    "PgTokenStore",
    "RecordResult",
    "RetryPolicy",
    "RowOutcome",
    "TokenManager",
    "TokenStore",
    "ZohoClient",
    "build_bulk_zip",
    "match_results",
    "normalise_job_status",
    "parse_result_zip",
]
