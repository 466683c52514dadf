"""One exception tree for the whole connector (STYLE.md §7).

Each boundary (database, CRM HTTP, configuration) maps its own failures onto these classes in
one place; callers decide on retry / dead-letter / stop by class, never by message text.
Messages must never contain secrets: build them from names and codes, not from request bodies
or headers.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base class of every error the connector raises on purpose."""


class ConfigError(ConnectorError):
    """Bad configuration: refused at start, exit code 2. The message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class TransientError(ConnectorError):
    """Worth retrying with backoff: 5xx, 429, timeouts, lost connections.

    ``status`` is the HTTP status that caused it (429, 5xx) or ``None`` when no answer came
    (timeout, connection error); ``retry_after`` the seconds the server (or the token budget)
    asks to wait, when known."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        self.retry_after = retry_after
        self.status = status
        super().__init__(message)


class TokenThrottled(TransientError):
    """No new access token for now: Zoho Accounts throttles token creation for this refresh
    token, or the client-side ``crm.token_budget`` is spent. ``retry_after`` says how long."""


class PermanentError(ConnectorError):
    """Retrying will not help and the pipeline cannot go on (e.g. a failed token refresh)."""


class BulkJobGone(ConnectorError):
    """A bulk job (404 on its details) or its result file (403/404 on the download link) is no
    longer on the CRM: Zoho keeps them for a limited time. The outcome of the job's rows is
    unknown; they must be sent again, not failed."""


class DataError(ConnectorError):
    """One record cannot be delivered as it is; it goes to dead_letters, the rest proceeds."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        self.code = code
        self.field = field
        super().__init__(message)

    def detached(self) -> DataError:
        """The same code, message and field in an exception never raised: no traceback, no
        context. Keep this, not the caught exception, in a collection that outlives the
        ``except`` block: a caught exception's traceback holds the catching frame, whose locals
        hold the collection, a reference cycle that keeps the frame's whole batch (row images
        and all) alive until a full collection of the cyclic GC, which the connector's
        thresholds make rare (connector/gcsetup.py). Seen as an RSS growing ~25 MB a minute in
        the 60-minute soak of session 15."""
        return DataError(self.code, str(self), field=self.field)


class SchemaChanged(PermanentError):
    """A mapped column is gone from the source table (dropped or renamed), or changed type so
    that its values no longer convert, while the pipeline runs: the pipeline stops before any
    record is sent without the field, its events stay behind the checkpoint, and it waits for
    the operator to fix the mapping and restart."""

    def __init__(self, pipeline: str, column: str, message: str) -> None:
        self.pipeline = pipeline
        self.column = column
        super().__init__(message)
