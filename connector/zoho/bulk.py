"""Bulk Write files and results (zoho-crm-api.md §3): pure, no I/O.

* :func:`build_bulk_zip` streams rows into one CSV inside a zip (key column first, so the
  result file — which repeats the first three mapped columns — carries the key), enforcing the
  documented limits: ≤ 25,000 rows, ≤ 200 columns, zip ≤ 25 MB.
* :func:`normalise_job_status` accepts every documented spelling of a job status.
* :func:`parse_job` reads a job-details body; :func:`parse_result_zip` reads the result file
  (``STATUS``, ``RECORD_ID``, ``ERRORS`` per row) and :func:`match_results` matches rows back to
  the keys that were sent (a key absent from the result file is reported as unprocessed).
"""

from __future__ import annotations

import csv
import enum
import io
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector.errors import PermanentError

MAX_ROWS = 25_000
MAX_COLUMNS = 200
MAX_ZIP_BYTES = 25 * 1024 * 1024


class BulkLimitError(ValueError):
    """The rows do not fit in one bulk file (a planning bug: split the batch)."""


@dataclass(frozen=True, slots=True)
class BulkFile:
    data: bytes  # the zip
    csv_name: str
    rows: int
    keys: tuple[str, ...]  # first column of every row, in file order

    def __repr__(self) -> str:
        return f"BulkFile({self.csv_name!r}, rows={self.rows}, bytes={len(self.data)})"


def build_bulk_zip(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    csv_name: str = "records.csv",
    max_rows: int = MAX_ROWS,
    max_bytes: int = MAX_ZIP_BYTES,
) -> BulkFile:
    """Write ``header`` + ``rows`` as one UTF-8 CSV (RFC 4180 quoting) inside a deflated zip.

    The first column must be the key (``RecordMapper.csv_header()`` puts it there).
    """
    if not header:
        raise BulkLimitError("a bulk file needs at least one column")
    if len(header) > MAX_COLUMNS:
        raise BulkLimitError(f"{len(header)} columns; a bulk file allows {MAX_COLUMNS}")
    buf = io.BytesIO()
    keys: list[str] = []
    width = len(header)
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open(csv_name, "w", force_zip64=False) as raw,
    ):
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\r\n")
        writer.writerow(header)
        for row in rows:
            if len(row) != width:
                raise BulkLimitError(f"row has {len(row)} values, header has {width}")
            if len(keys) >= max_rows:
                raise BulkLimitError(f"more than {max_rows} rows for one bulk file")
            writer.writerow(row)
            keys.append(row[0])
        text.flush()
        text.detach()
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise BulkLimitError(f"zip is {len(data)} bytes; a bulk file allows {max_bytes}")
    return BulkFile(data=data, csv_name=csv_name, rows=len(keys), keys=tuple(keys))


# ---- job status --------------------------------------------------------------------------------


class JobStatus(enum.StrEnum):
    ADDED = "ADDED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def done(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


_STATUS_ALIASES = {
    "ADDED": JobStatus.ADDED,
    "INPROGRESS": JobStatus.IN_PROGRESS,
    "COMPLETED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "FAILURE": JobStatus.FAILED,
}


def normalise_job_status(value: object) -> JobStatus:
    """``ADDED``, ``INPROGRESS``, ``IN PROGRESS``, ``IN_PROGRESS``, ``COMPLETED``, ``FAILED``,
    in any case (zoho-crm-api.md §3.3: the sources disagree on the spelling)."""
    if isinstance(value, str):
        squashed = "".join(ch for ch in value.upper() if ch not in " _-")
        status = _STATUS_ALIASES.get(squashed)
        if status is not None:
            return status
    raise PermanentError(f"unknown bulk job status {str(value)[:40]!r}")


@dataclass(frozen=True, slots=True)
class BulkJob:
    id: str
    status: JobStatus
    operation: str | None
    added: int
    updated: int
    skipped: int
    total: int
    download_url: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


def parse_job(body: dict[str, Any]) -> BulkJob:
    """A job-details body (``GET /crm/bulk/v8/write/{id}``); also accepts a callback body or a
    ``{"data": [job]}`` wrapper."""
    if "data" in body and isinstance(body["data"], list) and body["data"]:
        body = body["data"][0]
    job_id = body.get("id", body.get("job_id"))
    if job_id is None:
        raise PermanentError("bulk job details without an id")
    status = normalise_job_status(body.get("status", body.get("state")))
    added = updated = skipped = total = 0
    for res in body.get("resource") or []:
        f = (res or {}).get("file") or {}
        added += _int(f.get("added_count"))
        updated += _int(f.get("updated_count"))
        skipped += _int(f.get("skipped_count"))
        total += _int(f.get("total_count"))
    result = body.get("result") or {}
    url = result.get("download_url") if isinstance(result, dict) else None
    return BulkJob(
        id=str(job_id),
        status=status,
        operation=body.get("operation"),
        added=added,
        updated=updated,
        skipped=skipped,
        total=total,
        download_url=str(url) if url else None,
        raw=body,
    )


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# ---- result file -------------------------------------------------------------------------------


class RowOutcome(enum.StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    SKIPPED = "skipped"
    UNPROCESSED = "unprocessed"


# STATUS spellings, compared upper-case without spaces, "_" or "-". Zoho documents the meanings
# (added / updated / skipped / left unprocessed: bulk-write download-result page) but not the
# literals, so any case and separator is accepted; a spelling not listed here is decided by the
# row's RECORD_ID and ERRORS columns (:func:`_outcome`).
_OUTCOMES = {
    "ADDED": RowOutcome.ADDED,
    "INSERTED": RowOutcome.ADDED,
    "CREATED": RowOutcome.ADDED,
    "UPDATED": RowOutcome.UPDATED,
    "SKIPPED": RowOutcome.SKIPPED,
    "FAILED": RowOutcome.SKIPPED,
    "ERROR": RowOutcome.SKIPPED,
    "UNPROCESSED": RowOutcome.UNPROCESSED,
    "NOTPROCESSED": RowOutcome.UNPROCESSED,
}


def _listed(status: str) -> RowOutcome | None:
    """The outcome of a listed STATUS spelling (None: not listed, :func:`_outcome` decides)."""
    return _OUTCOMES.get("".join(ch for ch in status.upper() if ch not in " _-"))


_UNSEEN: Any = object()


def _outcome(
    status: str, record_id: str, errors: tuple[tuple[str, tuple[str, ...]], ...]
) -> RowOutcome:
    """The row's outcome from its STATUS cell; an unknown or empty STATUS is decided by the
    other columns: a RECORD_ID and no ERRORS is a write (counted as updated), ERRORS make it
    skipped (dead-lettered with the codes), neither means unprocessed (sent again)."""
    known = _listed(status)
    if known is not None:
        return known
    if record_id and not errors:
        return RowOutcome.UPDATED
    if errors:
        return RowOutcome.SKIPPED
    return RowOutcome.UNPROCESSED


@dataclass(frozen=True, slots=True)
class BulkRowResult:
    key: str
    outcome: RowOutcome
    record_id: str | None
    errors: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (code, fields)

    @property
    def ok(self) -> bool:
        return self.outcome in (RowOutcome.ADDED, RowOutcome.UPDATED) and bool(self.record_id)

    @property
    def code(self) -> str | None:
        return self.errors[0][0] if self.errors else None

    @property
    def field(self) -> str | None:
        if self.errors and self.errors[0][1]:
            return self.errors[0][1][0]
        return None

    @property
    def message(self) -> str:
        if not self.errors:
            return self.outcome.value
        return "; ".join(f"{c} ({', '.join(f)})" if f else c for c, f in self.errors)


def parse_errors(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``MANDATORY_NOT_FOUND-Company,Last_Name:DUPLICATE_DATA-Email`` →
    ``(("MANDATORY_NOT_FOUND", ("Company", "Last_Name")), ("DUPLICATE_DATA", ("Email",)))``."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for part in text.strip().split(":"):
        part = part.strip()
        if not part:
            continue
        code, _, fields = part.partition("-")
        out.append((code.strip(), tuple(f.strip() for f in fields.split(",") if f.strip())))
    return tuple(out)


def parse_result_zip(data: bytes, key_column: str | None = None) -> list[BulkRowResult]:
    """Rows of the result file in file order. The key is the ``key_column`` column when the
    header has it, else the first column."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise PermanentError("bulk result download is not a zip file") from None
    with zf:
        names = [n for n in zf.namelist() if n.lower().endswith(".csv")]
        if not names:
            raise PermanentError("bulk result zip holds no CSV file")
        results: list[BulkRowResult] = []
        for name in names:
            text = zf.read(name).decode("utf-8-sig")
            results.extend(parse_result_csv(text, key_column))
        return results


def parse_result_csv(text: str, key_column: str | None = None) -> list[BulkRowResult]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    upper = [h.strip().upper() for h in header]
    try:
        i_status = upper.index("STATUS")
    except ValueError:
        raise PermanentError("bulk result CSV has no STATUS column") from None
    i_id = upper.index("RECORD_ID") if "RECORD_ID" in upper else None
    i_err = upper.index("ERRORS") if "ERRORS" in upper else None
    i_key = header.index(key_column) if key_column and key_column in header else 0
    out: list[BulkRowResult] = []
    width = len(header)
    known_of: dict[str, RowOutcome | None] = {}  # STATUS cell -> its listed spelling's outcome
    for row in reader:
        if not row:
            continue
        cell = row if len(row) >= width else row + [""] * (width - len(row))
        record_id = cell[i_id].strip() if i_id is not None else ""
        # an empty ERRORS cell parses to () (the usual row; skips parse_errors)
        errors = parse_errors(cell[i_err]) if i_err is not None and cell[i_err].strip() else ()
        status = cell[i_status].strip()
        known = known_of.get(status, _UNSEEN)
        if known is _UNSEEN:
            known = known_of[status] = _listed(status)
        outcome = known if known is not None else _outcome(status, record_id, errors)
        if outcome in (RowOutcome.ADDED, RowOutcome.UPDATED) and not record_id:
            outcome = RowOutcome.UNPROCESSED
        out.append(BulkRowResult(cell[i_key], outcome, record_id or None, errors))
    return out


def match_results(
    keys: Iterable[str], results: Iterable[BulkRowResult]
) -> dict[str, BulkRowResult]:
    """Result per key that was sent. Keys missing from the result file come back
    ``UNPROCESSED`` with code ``NOT_IN_RESULT`` (retry them)."""
    by_key = {r.key: r for r in results}
    out: dict[str, BulkRowResult] = {}
    for key in keys:
        out[key] = by_key.get(key) or BulkRowResult(
            key, RowOutcome.UNPROCESSED, None, (("NOT_IN_RESULT", ()),)
        )
    return out
