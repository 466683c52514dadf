"""The one place that talks HTTP to the CRM: retries with backoff, the token refresh on
``INVALID_TOKEN``, the limiter slot, credit counting and the failure mapping (the table in
:mod:`connector.zoho.client`).

``Transport`` is a mixin of :class:`connector.zoho.client.ZohoClient`, which holds the state it
uses (declared below for the type checker) and re-exports this module's public names."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from connector.errors import BulkJobGone, PermanentError, TransientError
from connector.zoho.auth import TokenManager
from connector.zoho.limiter import AdaptiveLimiter
from connector.zoho.records import _parse_json, _remaining, _Reply, _retry_after
from connector.zoho.scopes import scope_hint

# the client's logger: records keep the name they had before the split
log = logging.getLogger("connector.zoho.client")
# hosts of Zoho's own services (download links of bulk results live on e.g. download.zoho.com)
_ZOHO_HOST = re.compile(r"(^|\.)zoho(apis|cloud)?\.(com|eu|in|jp|sa|ca|com\.au|com\.cn)$")


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


class Transport:
    """HTTP calls with retries, auth and accounting: a mixin of ``ZohoClient``."""

    _api_url: str | None
    _default_api_url: str | None
    _upload_url: str | None
    _retry: RetryPolicy
    _complex: asyncio.Semaphore | None
    _session: aiohttp.ClientSession | None
    on_call: CallHook | None
    limiter: AdaptiveLimiter
    tokens: TokenManager
    credits_spent: int
    credits_remaining: int | None
    calls: int
    retries: int

    @contextlib.contextmanager
    def single_attempt(self) -> Iterator[None]:
        """Calls made inside the block try once: a :class:`TransientError` reaches the caller at
        once (the start-up checks, :mod:`connector.startup_wait`, wait and retry themselves and
        say so on /readyz)."""
        saved = self._retry
        self._retry = dataclasses.replace(saved, max_attempts=1)
        try:
            yield
        finally:
            self._retry = saved

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
            raise TransientError(
                f"zoho {api}: {reply.describe()}", retry_after=_retry_after(reply), status=status
            )
        if status >= 500:
            raise TransientError(f"zoho {api}: {reply.describe()}", status=status)
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
