"""The Zoho CRM v8 HTTP client: records, COQL, field metadata and Bulk Write.

Built from :class:`~connector.config.CrmConfig`-like values; the aiohttp session is created in
:meth:`ZohoClient.open` (no I/O in the constructor) and closed in :meth:`ZohoClient.aclose`.

Failure mapping (DESIGN.md §5, zoho-crm-api.md §5) — one place, :meth:`ZohoClient._attempt`:

==========================================  ===============================================
what the CRM answers                         what the client does
==========================================  ===============================================
429                                          tell the limiter (AIMD decrease), honour
                                             ``Retry-After``/``details.retry_after``, retry
5xx, timeout, connection error               retry: capped exponential backoff, full jitter
401 ``INVALID_TOKEN``                        invalidate the token, refresh once, retry once
401 other / failed refresh                   :class:`PermanentError`
per-record errors (200/201/207/400 ``data``)  returned as :class:`RecordResult` (code, field)
other 4xx                                    :class:`PermanentError` (code and message)
==========================================  ===============================================

Retries are bounded (``RetryPolicy.max_attempts``); after the last one the
:class:`TransientError` propagates and the batch stays pending.

Credits are counted from the cost model (insert/update/upsert ``ceil(n/10)``, bulk job 500,
anything else 1 — bulk upload, job details and result download too: Zoho's limits page charges
every call not listed otherwise 1) for every call the CRM
processed (not for 401, 429 or 5xx answers); ``X-API-CREDITS-REMAINING`` corrects the remaining
count when present.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from pydantic import SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from connector.costs import CreditCosts
from connector.errors import BulkJobGone, PermanentError, TransientError
from connector.mapping import dumps_json
from connector.zoho.auth import DEFAULT_TOKEN_BUDGET, TokenManager, TokenStore
from connector.zoho.bulk import (
    BulkFile,
    BulkJob,
    BulkRowResult,
    match_results,
    parse_job,
    parse_result_zip,
)
from connector.zoho.limiter import AdaptiveLimiter
from connector.zoho.scopes import scope_hint

log = logging.getLogger(__name__)
# hosts of Zoho's own services (download links of bulk results live on e.g. download.zoho.com)
_ZOHO_HOST = re.compile(r"(^|\.)zoho(apis|cloud)?\.(com|eu|in|jp|sa|ca|com\.au|com\.cn)$")

MAX_RECORDS_PER_CALL = 100
MAX_FIELDS_PER_READ = 50
COQL_PAGE = 2_000
COQL_MAX_OFFSET = 100_000

BulkOperation = Literal["insert", "update", "upsert"]


class CallHook(Protocol):
    """Called after every HTTP attempt (also failed ones; ``status`` 0 = no response)."""

    def __call__(  # noqa: PLR0917 (the positional signature is the contract)
        self,
        api: str,
        records: int,
        credits: int,
        latency_s: float,
        status: int,
        remaining: int | None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    backoff_base: float = 0.5  # seconds; wait is uniform in [0, min(max, base * 2**n)]
    backoff_max: float = 30.0
    retry_after_max: float = 120.0


@dataclass(frozen=True, slots=True)
class RecordResult:
    """The CRM's answer for one record of a write call, in input order."""

    index: int
    status: Literal["success", "error"]
    code: str
    message: str
    field: str | None = None  # api_name from details (the field the error is about)
    id: str | None = None  # CRM record id
    action: Literal["insert", "update"] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass(frozen=True, slots=True)
class FieldMeta:
    """One field of ``GET /crm/v8/settings/fields?module=``."""

    api_name: str
    data_type: str
    json_type: str | None = None
    unique: bool = False
    mandatory: bool = False
    read_only: bool = False
    length: int | None = None
    picklist_values: tuple[str, ...] = ()
    lookup_module: str | None = None  # data_type "lookup": the target module (``lookup.module``)


@dataclass(slots=True)
class _Reply:
    status: int
    body: Any  # parsed JSON (dict/list) or None
    raw: bytes
    headers: Mapping[str, str]

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict):
            code = self.body.get("code")
            return str(code) if code is not None else None
        return None

    def describe(self) -> str:
        if isinstance(self.body, dict):
            code = self.body.get("code") or self.body.get("ERROR_CODE") or self.body.get("error")
            message = (
                self.body.get("message")
                or self.body.get("ERROR_MESSAGE")
                or self.body.get("x-error")
                or ""
            )
            return f"HTTP {self.status} {code}: {str(message)[:200]}"
        return f"HTTP {self.status}"


class ZohoClient:
    def __init__(
        self,
        *,
        accounts_url: str,
        client_id: str,
        client_secret: SecretStr,
        refresh_token: SecretStr,
        api_url: str | None = None,
        upload_url: str | None = None,
        default_api_url: str | None = None,
        org_id: str | None = None,
        concurrency: int = 20,
        complex_concurrency: int = 10,
        request_timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        costs: CreditCosts | None = None,
        on_call: CallHook | None = None,
        limiter: AdaptiveLimiter | None = None,
        token_refresh_margin: float = 300.0,
        token_store: TokenStore | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> None:
        """``api_url`` overrides the token's ``api_domain``; ``default_api_url`` is used only when
        neither is known. ``upload_url`` defaults to the API base URL."""
        self._api_url = api_url.rstrip("/") if api_url else None
        self._default_api_url = default_api_url.rstrip("/") if default_api_url else None
        self._upload_url = upload_url.rstrip("/") if upload_url else None
        self._org_id = org_id
        self._timeout = request_timeout
        self._retry = retry or RetryPolicy()
        self._costs = costs or CreditCosts()
        self.on_call = on_call
        self.limiter = limiter or AdaptiveLimiter(concurrency)
        self._complex_limit = complex_concurrency
        self._complex: asyncio.Semaphore | None = None
        self.tokens = TokenManager(
            accounts_url=accounts_url,
            client_id=client_id,
            client_secret=client_secret,
            refresh_token=refresh_token,
            refresh_margin=token_refresh_margin,
            timeout=request_timeout,
            store=token_store,
            budget=token_budget,
        )
        self._session: aiohttp.ClientSession | None = None
        self.credits_spent = 0
        self.credits_remaining: int | None = None
        self.calls = 0
        self.retries = 0

    @classmethod
    def from_config(
        cls,
        crm: Any,
        *,
        client_secret: SecretStr,
        refresh_token: SecretStr,
        **kwargs: Any,
    ) -> ZohoClient:
        """From a :class:`~connector.config.CrmConfig` and the resolved secrets."""
        timeout = crm.request_timeout
        return cls(
            accounts_url=crm.resolved_accounts_url,
            api_url=crm.api_url,
            upload_url=crm.resolved_upload_url,
            default_api_url=crm.resolved_api_url,
            client_id=crm.client_id,
            client_secret=client_secret,
            refresh_token=refresh_token,
            org_id=crm.org_id,
            concurrency=crm.concurrency,
            token_budget=crm.token_budget,
            request_timeout=timeout.total_seconds()
            if hasattr(timeout, "total_seconds")
            else timeout,
            **kwargs,
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"Accept": "application/json"},
        )
        self._complex = asyncio.Semaphore(self._complex_limit)
        self.tokens.bind(self._session)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> ZohoClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"ZohoClient(api={self._api_url or self.tokens.api_domain!r}, ***)"

    # ---- record writes -----------------------------------------------------------------------

    async def upsert(
        self,
        module: str,
        records: Sequence[Mapping[str, Any]],
        duplicate_check_fields: Sequence[str],
        *,
        trigger: Sequence[str] | None = None,
    ) -> list[RecordResult]:
        """``POST /crm/v8/{module}/upsert``: ≤ 100 records, results in input order."""
        body: dict[str, Any] = {"duplicate_check_fields": list(duplicate_check_fields)}
        return await self._write(
            "upsert", "POST", f"/crm/v8/{module}/upsert", records, body=body, trigger=trigger
        )

    async def insert(
        self,
        module: str,
        records: Sequence[Mapping[str, Any]],
        *,
        trigger: Sequence[str] | None = None,
    ) -> list[RecordResult]:
        """``POST /crm/v8/{module}``."""
        return await self._write(
            "insert", "POST", f"/crm/v8/{module}", records, body={}, trigger=trigger
        )

    async def update(
        self,
        module: str,
        records: Sequence[Mapping[str, Any]],
        *,
        trigger: Sequence[str] | None = None,
    ) -> list[RecordResult]:
        """``PUT /crm/v8/{module}``; every record carries its ``id``."""
        for r in records:
            if not r.get("id"):
                raise ValueError("update needs an 'id' in every record")
        return await self._write(
            "update", "PUT", f"/crm/v8/{module}", records, body={}, trigger=trigger
        )

    async def delete(
        self, module: str, ids: Sequence[str], *, wf_trigger: bool | None = None
    ) -> list[RecordResult]:
        """``DELETE /crm/v8/{module}?ids=…`` (≤ 100 ids); ``wf_trigger`` whether workflow
        rules run (omitted: Zoho's default)."""
        if not ids:
            return []
        if len(ids) > MAX_RECORDS_PER_CALL:
            raise ValueError(f"at most {MAX_RECORDS_PER_CALL} ids per delete call")
        reply = await self._request(
            "DELETE",
            "api",
            f"/crm/v8/{module}",
            api="delete",
            records=len(ids),
            cost=self._costs.default,
            params={"ids": ",".join(ids)}
            | ({} if wf_trigger is None else {"wf_trigger": str(wf_trigger).lower()}),
            record_errors=True,
        )
        return _record_results(reply, len(ids), "delete")

    async def _write(
        self,
        api: str,
        method: str,
        path: str,
        records: Sequence[Mapping[str, Any]],
        *,
        body: dict[str, Any],
        trigger: Sequence[str] | None,
    ) -> list[RecordResult]:
        if not records:
            return []
        if len(records) > MAX_RECORDS_PER_CALL:
            raise ValueError(f"at most {MAX_RECORDS_PER_CALL} records per {api} call")
        body = {"data": list(records), **body}
        if trigger is not None:
            body["trigger"] = list(trigger)
        payload = dumps_json(body)
        reply = await self._request(
            method,
            "api",
            path,
            api=api,
            records=len(records),
            cost=self._costs.records(len(records)),
            content=payload,
            record_errors=True,
            complex_call=len(records) > 10,
        )
        return _record_results(reply, len(records), api)

    # ---- reads ---------------------------------------------------------------------------------

    async def get_records(
        self,
        module: str,
        fields: Sequence[str],
        *,
        ids: Sequence[str] | None = None,
        per_page: int = 200,
        page_token: str | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """``GET /crm/v8/{module}``, one list of records per page (``page`` then
        ``page_token``); with ``ids``, chunks of 100 ids. Numbers come back as ``Decimal``."""
        if not fields or len(fields) > MAX_FIELDS_PER_READ:
            raise ValueError(f"get_records needs 1..{MAX_FIELDS_PER_READ} fields")
        base: dict[str, str] = {"fields": ",".join(fields), "per_page": str(per_page)}
        if ids is not None:
            id_list = list(ids)
            for i in range(0, len(id_list), MAX_RECORDS_PER_CALL):
                chunk = id_list[i : i + MAX_RECORDS_PER_CALL]
                reply = await self._request(
                    "GET",
                    "api",
                    f"/crm/v8/{module}",
                    api="get_records",
                    cost=self._costs.default,
                    params={**base, "ids": ",".join(chunk)},
                )
                data = _data(reply)
                if data:
                    yield data
            return
        page = 1
        token = page_token
        while True:
            params = dict(base)
            if token:
                params["page_token"] = token
            else:
                params["page"] = str(page)
            reply = await self._request(
                "GET",
                "api",
                f"/crm/v8/{module}",
                api="get_records",
                cost=self._costs.default,
                params=params,
            )
            data = _data(reply)
            if data:
                yield data
            info = _info(reply)
            if not data or not info.get("more_records"):
                return
            token = info.get("next_page_token") or None
            page += 1

    async def coql(self, query: str, *, page_size: int = COQL_PAGE) -> list[dict[str, Any]]:
        """``POST /crm/v8/coql``. A query without ``LIMIT`` is paged with
        ``LIMIT offset, page_size`` until ``more_records`` is false (up to offset 100,000)."""
        query = query.strip().rstrip(";")
        if re.search(r"\blimit\b", query, re.IGNORECASE):
            return _data(await self._coql_call(query))
        rows: list[dict[str, Any]] = []
        offset = 0
        while offset < COQL_MAX_OFFSET:
            # Zoho refuses offset + limit beyond 100,000: the last page is cut to fit
            size = min(page_size, COQL_MAX_OFFSET - offset)
            reply = await self._coql_call(f"{query} limit {offset}, {size}")
            data = _data(reply)
            rows.extend(data)
            info = _info(reply)
            if not data or not info.get("more_records"):
                break
            offset += len(data)
        return rows

    async def coql_pages(
        self,
        module: str,
        fields: Sequence[str],
        *,
        where: str | None = None,
        page_size: int = COQL_PAGE,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every record of ``module`` (matching ``where``), one list per COQL call, in id order.

        Keyset paging on the record id, Zoho's way past the 100,000-record reach of LIMIT/OFFSET
        (COQL Limitations page): ``select … from {module} where id > {last id} [and (where)]
        order by id asc limit {page_size}``, until a page is empty or ``more_records`` is false.
        ``id`` is always selected. Each call costs ``CreditCosts.coql(page_size)`` (3 credits
        for 2,000 rows)."""
        if not fields or len(fields) > MAX_FIELDS_PER_READ:
            raise ValueError(f"coql_pages needs 1..{MAX_FIELDS_PER_READ} fields")
        if not 1 <= page_size <= COQL_PAGE:
            raise ValueError(f"coql_pages page_size must be 1..{COQL_PAGE}")
        select = ", ".join(dict.fromkeys(["id", *fields]))
        if select.count(",") + 1 > MAX_FIELDS_PER_READ:
            raise ValueError(f"coql_pages selects at most {MAX_FIELDS_PER_READ} columns (id too)")
        last: int | None = None
        while True:
            # older COQL versions require a WHERE clause: the first page uses `id is not null`
            conds = ["id is not null" if last is None else f"id > {last}"]
            if where:
                conds.append(f"({where})")
            reply = await self._coql_call(
                f"select {select} from {module} where {' and '.join(conds)}"
                f" order by id asc limit {page_size}"
            )
            data = _data(reply)
            if data:
                yield data
            info = _info(reply)
            if not data or not info.get("more_records"):
                return
            ids = [int(str(r["id"])) for r in data if str(r.get("id", "")).isdigit()]
            if not ids or (last is not None and max(ids) <= last):
                raise PermanentError(f"zoho coql {module}: page without increasing record ids")
            last = max(ids)

    async def _coql_call(self, query: str) -> _Reply:
        return await self._request(
            "POST",
            "api",
            "/crm/v8/coql",
            api="coql",
            cost=self._costs.coql(_coql_limit(query)),
            content=dumps_json({"select_query": query}),
            complex_call=True,
        )

    async def fields(self, module: str) -> list[FieldMeta]:
        """Field metadata of ``module`` (``GET /crm/v8/settings/fields?module=``)."""
        reply = await self._request(
            "GET",
            "api",
            "/crm/v8/settings/fields",
            api="fields",
            cost=self._costs.default,
            params={"module": module},
        )
        items = reply.body.get("fields") if isinstance(reply.body, dict) else None
        if not isinstance(items, list):
            raise PermanentError(f"field metadata of module {module!r}: no 'fields' in answer")
        return [_field_meta(f) for f in items if isinstance(f, dict) and f.get("api_name")]

    async def modules(self) -> list[str]:
        """API names of the org's modules (``GET /crm/v8/settings/modules``; Zoho's answer is
        ``{"modules": [{"api_name": …}, …]}``; /work/shared/zoho-crm-api.md, metadata calls)."""
        reply = await self._request(
            "GET", "api", "/crm/v8/settings/modules", api="modules", cost=self._costs.default
        )
        items = reply.body.get("modules") if isinstance(reply.body, dict) else None
        if not isinstance(items, list):
            raise PermanentError("module metadata: no 'modules' in answer")
        return [str(m["api_name"]) for m in items if isinstance(m, dict) and m.get("api_name")]

    async def current_user(self) -> dict[str, Any]:
        """``GET /crm/v8/users?type=CurrentUser`` (also a cheap credentials check)."""
        reply = await self._request(
            "GET",
            "api",
            "/crm/v8/users",
            api="users",
            cost=self._costs.default,
            params={"type": "CurrentUser"},
        )
        users = reply.body.get("users") if isinstance(reply.body, dict) else None
        if not users:
            raise PermanentError("the CRM returned no current user")
        return dict(users[0])

    async def org(self) -> dict[str, Any]:
        """``GET /crm/v8/org``: the organisation (zgid, time zone, licence); needs
        ``ZohoCRM.org.READ``."""
        reply = await self._request(
            "GET", "api", "/crm/v8/org", api="org", cost=self._costs.default
        )
        orgs = reply.body.get("org") if isinstance(reply.body, dict) else None
        if not orgs or not isinstance(orgs[0], dict):
            raise PermanentError("the CRM returned no organisation; set crm.org_id")
        return dict(orgs[0])

    async def org_id(self) -> str:
        """The org id for ``X-CRM-ORG``: the configured one, else ``GET /crm/v8/org``."""
        if self._org_id:
            return self._org_id
        org = await self.org()
        value = org.get("zgid") or org.get("id")
        if not value:
            raise PermanentError("the CRM organisation has no zgid; set crm.org_id")
        self._org_id = str(value)
        return self._org_id

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

    # ---- the one place that talks HTTP ----------------------------------------------------------

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
    ) -> _Reply:
        if self._session is None:
            raise RuntimeError("ZohoClient.open() was not called")
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self._retry.max_attempts),
            wait=self._wait,
            before_sleep=lambda state: self._before_sleep(api, state),
            reraise=True,
        )

        async def attempt() -> _Reply:
            return await self._attempt(
                method,
                base,
                path,
                api=api,
                cost=cost,
                records=records,
                params=params,
                content=content,
                form=form,
                headers=headers,
                record_errors=record_errors,
                expect_json=expect_json,
            )

        async for try_ in retrying:
            with try_:
                if complex_call and self._complex is not None:
                    async with self._complex:
                        reply = await attempt()
                else:
                    reply = await attempt()
        return reply

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), self._retry.retry_after_max)
        backoff = wait_random_exponential(
            multiplier=self._retry.backoff_base, max=self._retry.backoff_max
        )
        return float(backoff(state))

    def _before_sleep(self, api: str, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "zoho %s attempt %d failed (%s); retrying in %.2fs",
            api,
            state.attempt_number,
            exc,
            wait,
        )

    async def _attempt(
        self,
        method: str,
        base: Literal["api", "upload", "absolute"],
        path: str,
        *,
        api: str,
        cost: int,
        records: int,
        params: Mapping[str, str] | None,
        content: bytes | None,
        form: Callable[[], aiohttp.FormData] | None,
        headers: Mapping[str, str] | None,
        record_errors: bool,
        expect_json: bool,
    ) -> _Reply:
        token = await self.tokens.get()
        reply: _Reply | None = None
        for auth_try in range(2):
            url = self._url(base, path)
            reply = await self._send(
                method,
                url,
                token.value,
                api=api,
                cost=cost,
                records=records,
                params=params,
                content=content,
                form=form,
                headers=headers,
                expect_json=expect_json,
            )
            if reply.status == 401 and reply.code == "INVALID_TOKEN" and auth_try == 0:
                log.info("zoho %s: access token rejected (INVALID_TOKEN); refreshing once", api)
                self.tokens.invalidate(token.value)
                token = await self.tokens.get()
                continue
            break
        assert reply is not None
        return self._check(api, path if base != "absolute" else "download", reply, record_errors)

    def _trusted_download_host(self, url: str, api_base: str | None) -> bool:
        host = (urlsplit(url).hostname or "").lower()
        known = {
            (urlsplit(u).hostname or "").lower()
            for u in (api_base, self._upload_url, self._default_api_url)
            if u
        }
        return host in known or _ZOHO_HOST.search(host) is not None

    def _url(self, base: Literal["api", "upload", "absolute"], path: str) -> str:
        api_base = self._api_url or self.tokens.api_domain or self._default_api_url
        if base == "absolute":
            if re.match(r"^https?://", path):
                if not self._trusted_download_host(path, api_base):
                    # the access token travels with this request: never to a foreign host
                    raise PermanentError(
                        f"refusing to download a bulk result from untrusted host "
                        f"{urlsplit(path).hostname!r}"
                    )
                return path
            if api_base is None:
                raise PermanentError("no API base URL known for a relative download_url")
            return urljoin(api_base + "/", path.lstrip("/"))
        root = (self._upload_url or api_base) if base == "upload" else api_base
        if root is None:
            raise PermanentError("no CRM API URL: the token had no api_domain; set crm.api_url")
        return root + path

    async def _send(
        self,
        method: str,
        url: str,
        token: str,
        *,
        api: str,
        cost: int,
        records: int,
        params: Mapping[str, str] | None,
        content: bytes | None,
        form: Callable[[], aiohttp.FormData] | None,
        headers: Mapping[str, str] | None,
        expect_json: bool,
    ) -> _Reply:
        assert self._session is not None
        hdrs = {"Authorization": f"Zoho-oauthtoken {token}"}
        if content is not None:
            hdrs["Content-Type"] = "application/json"
        if headers:
            hdrs.update(headers)
        body: Any = form() if form is not None else content
        status = 0
        charged = 0
        async with self.limiter.slot() as ticket:
            started = time.monotonic()  # the HTTP call only, not the wait for a slot
            try:
                async with self._session.request(
                    method, url, params=params, data=body, headers=hdrs
                ) as resp:
                    status = resp.status
                    raw = await resp.read()
                    resp_headers = dict(resp.headers)
            except TimeoutError:
                self._report(api, records, 0, started, 0)
                raise TransientError(f"zoho {api}: request timed out") from None
            except aiohttp.ClientError as exc:
                self._report(api, records, 0, started, 0)
                raise TransientError(
                    f"zoho {api}: connection failed ({type(exc).__name__})"
                ) from None
            self.calls += 1
            if status == 429:
                self.limiter.on_overload(ticket)
            else:
                self.limiter.on_success(ticket)
        parsed = _parse_json(raw) if (expect_json or status >= 400) else None
        reply = _Reply(status, parsed, raw, resp_headers)
        if status < 500 and status not in (401, 429):
            charged = cost
            self.credits_spent += cost
        remaining = _remaining(resp_headers)
        if remaining is not None:
            self.credits_remaining = remaining
        elif charged and self.credits_remaining is not None:
            self.credits_remaining = max(0, self.credits_remaining - charged)
        self._report(api, records, charged, started, status)
        if status == 429:
            raise TransientError(f"zoho {api}: {reply.describe()}", retry_after=_retry_after(reply))
        if status >= 500:
            raise TransientError(f"zoho {api}: {reply.describe()}")
        return reply

    def _report(self, api: str, records: int, credits: int, started: float, status: int) -> None:
        if self.on_call is None:
            return
        try:
            self.on_call(
                api, records, credits, time.monotonic() - started, status, self.credits_remaining
            )
        except Exception:  # a metrics hook must not break a CRM call
            log.exception("on_call hook failed")

    def _check(self, api: str, what: str, reply: _Reply, record_errors: bool) -> _Reply:
        status = reply.status
        if status < 400 or (
            record_errors
            and status in (400, 412)
            and isinstance(reply.body, dict)
            and isinstance(reply.body.get("data"), list)
        ):
            return reply
        if status == 401 and reply.code == "OAUTH_SCOPE_MISMATCH":
            raise PermanentError(f"zoho {api}: {reply.describe()}: {scope_hint(api)}")
        if status == 401:
            raise PermanentError(
                f"zoho {api}: the CRM refused the access token ({reply.describe()}); "
                "check the OAuth client, scopes and refresh token"
            )
        if (api == "bulk_job" and status == 404 and reply.code != "INVALID_URL_PATTERN") or (
            api == "bulk_download" and status in (403, 404)
        ):
            # an expired job / result link (Zoho keeps results for a limited time, §3.4):
            # the caller sends the job's rows again
            raise BulkJobGone(f"zoho {api} {what}: {reply.describe()}")
        raise PermanentError(f"zoho {api} {what}: {reply.describe()}")


# ---- parsing helpers -----------------------------------------------------------------------


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        return None


def _coql_limit(query: str) -> int:
    """The row limit of a COQL query: ``limit n``, ``limit offset, n``, ``limit n offset m``;
    200 when absent (Zoho's default)."""
    m = re.search(r"\blimit\s+(\d+)(?:\s*,\s*(\d+))?", query, re.IGNORECASE)
    if not m:
        return 200
    return int(m.group(2) or m.group(1))


def _data(reply: _Reply) -> list[dict[str, Any]]:
    if reply.status == 204 or not isinstance(reply.body, dict):
        return []
    data = reply.body.get("data")
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _info(reply: _Reply) -> dict[str, Any]:
    """The ``info`` object of a paged read (``more_records``, ``next_page_token``…)."""
    info = reply.body.get("info") if isinstance(reply.body, dict) else None
    return info if isinstance(info, dict) else {}


def _remaining(headers: Mapping[str, str]) -> int | None:
    for name, value in headers.items():
        if name.lower() == "x-api-credits-remaining":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _retry_after(reply: _Reply) -> float | None:
    for name, value in reply.headers.items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    if isinstance(reply.body, dict):
        details = reply.body.get("details")
        if isinstance(details, dict) and details.get("retry_after") is not None:
            try:
                return float(details["retry_after"])
            except (TypeError, ValueError):
                return None
    return None


def _error_field(details: Mapping[str, Any]) -> str | None:
    name = details.get("api_name")
    if isinstance(name, str) and name:
        return name
    errors = details.get("errors")
    if isinstance(errors, list):
        for e in errors:
            inner = e.get("details") if isinstance(e, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("api_name"), str):
                return str(inner["api_name"])
    path = details.get("json_path")
    if isinstance(path, str):
        m = re.search(r"\.([A-Za-z0-9_]+)$", path)
        if m and not m.group(1).isdigit():
            return m.group(1)
    return None


def _record_results(reply: _Reply, n: int, api: str) -> list[RecordResult]:
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else "no"
        raise PermanentError(
            f"zoho {api}: expected {n} per-record results, got {got} ({reply.describe()})"
        )
    out: list[RecordResult] = []
    for i, item in enumerate(data):
        item = item if isinstance(item, dict) else {}
        raw_details = item.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        ok = str(item.get("status", "")).lower() == "success"
        action = item.get("action")
        record_id = details.get("id") if ok else None
        out.append(
            RecordResult(
                index=i,
                status="success" if ok else "error",
                code=str(item.get("code") or ("SUCCESS" if ok else "UNKNOWN")),
                message=str(item.get("message") or ""),
                field=None if ok else _error_field(details),
                id=str(record_id) if record_id is not None else None,
                action=action if action in ("insert", "update") else None,
                details=details,
            )
        )
    return out


def _lookup_module(lookup: Any) -> str | None:
    module = lookup.get("module") if isinstance(lookup, dict) else None
    name = module.get("api_name") if isinstance(module, dict) else None
    return str(name) if name else None


def _field_meta(f: Mapping[str, Any]) -> FieldMeta:
    unique = f.get("unique")
    picklist = f.get("pick_list_values") or []
    length = f.get("length")
    return FieldMeta(
        api_name=str(f["api_name"]),
        data_type=str(f.get("data_type") or ""),
        json_type=f.get("json_type"),
        unique=bool(unique),  # {} / null / false = not unique
        mandatory=bool(f.get("system_mandatory") or f.get("required")),
        read_only=bool(f.get("read_only") or f.get("field_read_only")),
        length=int(length) if isinstance(length, int | str) and str(length).isdigit() else None,
        picklist_values=tuple(
            str(p.get("actual_value") or p.get("display_value"))
            for p in picklist
            if isinstance(p, dict)
        ),
        lookup_module=_lookup_module(f.get("lookup")),
    )
