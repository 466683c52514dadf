"""The Bulk Write API calls of the client: upload the file, create the job, poll it, download
and match its results (the file formats are in :mod:`connector.zoho.bulk`).

``BulkWrite`` is a mixin of :class:`connector.zoho.client.ZohoClient`, which holds the state it
uses (declared below for the type checker) and re-exports this module's public names."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import aiohttp

from connector.costs import CreditCosts
from connector.crm_values import dumps_json
from connector.errors import PermanentError, TransientError
from connector.zoho.bulk import (
    BulkFile,
    BulkJob,
    BulkRowResult,
    match_results,
    parse_job,
    parse_result_zip,
)
from connector.zoho.records import _Reply

BulkOperation = Literal["insert", "update", "upsert"]


class BulkWrite:
    """Bulk Write jobs over HTTP: a mixin of ``ZohoClient``."""

    _costs: CreditCosts

    if TYPE_CHECKING:  # defined by ZohoClient and its Transport mixin

        async def org_id(self) -> str: ...
        async def _request(
            self,
            method: str,
            base: Literal["api", "upload", "absolute"],
            path: str,
            *,
            api: str,
            cost: int,
            records: int = 0,
            params: Mapping[str, str] | None = None,
            content: bytes | None = None,
            form: Callable[[], aiohttp.FormData] | None = None,
            headers: Mapping[str, str] | None = None,
            record_errors: bool = False,
            expect_json: bool = True,
            complex_call: bool = False,
        ) -> _Reply: ...

    # ---- bulk write ----------------------------------------------------------------------------

    async def upload_bulk_file(
        self, file: BulkFile | bytes, *, filename: str = "records.zip"
    ) -> str:
        """``POST {upload}/crm/v8/upload`` (``feature: bulk-write``, ``X-CRM-ORG``) → file id."""
        data = file.data if isinstance(file, BulkFile) else file
        org = await self.org_id()

        def form() -> aiohttp.FormData:
            fd = aiohttp.FormData()
            fd.add_field("file", data, filename=filename, content_type="application/zip")
            return fd

        reply = await self._request(
            "POST",
            "upload",
            "/crm/v8/upload",
            api="bulk_upload",
            cost=self._costs.bulk_upload,
            form=form,
            headers={"feature": "bulk-write", "X-CRM-ORG": org},
        )
        details = reply.body.get("details") if isinstance(reply.body, dict) else None
        file_id = details.get("file_id") if isinstance(details, dict) else None
        if file_id is None:
            raise PermanentError(f"bulk upload answered without a file_id ({reply.describe()})")
        return str(file_id)

    async def create_bulk_job(
        self,
        module: str,
        file_id: str,
        *,
        operation: BulkOperation,
        find_by: str | None,
        field_mappings: Sequence[Mapping[str, Any]],
        ignore_empty: bool = False,
        callback_url: str | None = None,
    ) -> str:
        """``POST /crm/bulk/v8/write`` → job id (costs 500 credits)."""
        if operation in ("update", "upsert") and not find_by:
            raise ValueError(f"a bulk {operation} needs find_by")
        resource: dict[str, Any] = {
            "type": "data",
            "module": {"api_name": module},
            "file_id": file_id,
            "ignore_empty": ignore_empty,
            "field_mappings": [dict(m) for m in field_mappings],
        }
        if find_by:
            resource["find_by"] = find_by
        body: dict[str, Any] = {
            "operation": operation,
            "ignore_empty": ignore_empty,
            "character_encoding": "UTF-8",
            "resource": [resource],
        }
        if callback_url:
            body["callback"] = {"url": callback_url, "method": "post"}
        reply = await self._request(
            "POST",
            "api",
            "/crm/bulk/v8/write",
            api="bulk_create",
            cost=self._costs.bulk_job,
            records=0,
            content=dumps_json(body),
        )
        details = reply.body.get("details") if isinstance(reply.body, dict) else None
        job_id = details.get("id") if isinstance(details, dict) else None
        if job_id is None:
            raise PermanentError(f"bulk job creation answered without an id ({reply.describe()})")
        return str(job_id)

    async def get_bulk_job(self, job_id: str) -> BulkJob:
        """``GET /crm/bulk/v8/write/{job_id}``."""
        reply = await self._request(
            "GET",
            "api",
            f"/crm/bulk/v8/write/{job_id}",
            api="bulk_job",
            cost=self._costs.bulk_job_details,
        )
        if not isinstance(reply.body, dict):
            raise PermanentError(f"bulk job {job_id}: details are not a JSON object")
        return parse_job(reply.body)

    async def wait_bulk_job(
        self,
        job_id: str,
        *,
        wake: asyncio.Event | None = None,
        poll_initial: float = 2.0,
        poll_max: float = 60.0,
        timeout: float | None = None,
    ) -> BulkJob:
        """Poll until COMPLETED or FAILED, with backoff (×1.5 up to ``poll_max``). Setting
        ``wake`` (the callback endpoint does) ends the current wait at once; it is cleared
        before each poll. ``timeout`` → :class:`TransientError` (the job is still known)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_initial
        while True:
            if wake is not None:
                wake.clear()
            job = await self.get_bulk_job(job_id)
            if job.status.done:
                return job
            wait = delay
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"bulk job {job_id} still {job.status} after {timeout}s")
                wait = min(wait, left)
            if wake is None:
                await asyncio.sleep(wait)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except TimeoutError:
                    pass
            delay = min(poll_max, delay * 1.5)

    async def download_bulk_result(self, job: BulkJob | str) -> bytes:
        """The result zip of a finished job (absolute or API-relative ``download_url``)."""
        if isinstance(job, str):
            job = await self.get_bulk_job(job)
        if not job.download_url:
            raise PermanentError(f"bulk job {job.id} ({job.status}) has no download_url")
        reply = await self._request(
            "GET",
            "absolute",
            job.download_url,
            api="bulk_download",
            cost=self._costs.bulk_download,
            expect_json=False,
        )
        return reply.raw

    async def bulk_results(
        self, job: BulkJob, keys: Sequence[str], key_column: str | None = None
    ) -> dict[str, BulkRowResult]:
        """Download and parse the result file; one result per key sent."""
        data = await self.download_bulk_result(job)
        return match_results(keys, parse_result_zip(data, key_column))
