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

Layout: the HTTP calls, retries and failure mapping are in :mod:`connector.zoho.transport`, the
Bulk Write calls in :mod:`connector.zoho.bulk_write`, reply parsing in
:mod:`connector.zoho.records` (mixins and helpers this module re-exports).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp
from pydantic import SecretStr

from connector.costs import CreditCosts
from connector.crm_values import dumps_json
from connector.errors import PermanentError
from connector.zoho.auth import DEFAULT_TOKEN_BUDGET, TokenManager, TokenStore
from connector.zoho.bulk_write import BulkOperation, BulkWrite
from connector.zoho.limiter import AdaptiveLimiter
from connector.zoho.records import (
    FieldMeta,
    RecordResult,
    _coql_limit,
    _data,
    _error_field,
    _field_meta,
    _info,
    _lookup_module,
    _parse_json,
    _record_results,
    _remaining,
    _Reply,
    _retry_after,
)
from connector.zoho.transport import CallHook, RetryPolicy, Transport

MAX_RECORDS_PER_CALL = 100
MAX_FIELDS_PER_READ = 50
COQL_PAGE = 2_000
COQL_MAX_OFFSET = 100_000


class ZohoClient(BulkWrite, Transport):
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


__all__ = [
    "COQL_MAX_OFFSET",
    "COQL_PAGE",
    "MAX_FIELDS_PER_READ",
    "MAX_RECORDS_PER_CALL",
    "BulkOperation",
    "CallHook",
    "FieldMeta",
    "RecordResult",
    "RetryPolicy",
    "ZohoClient",
    "_Reply",
    "_coql_limit",
    "_data",
    "_error_field",
    "_field_meta",
    "_info",
    "_lookup_module",
    "_parse_json",
    "_record_results",
    "_remaining",
    "_retry_after",
]
