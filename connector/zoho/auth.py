"""OAuth 2.0 refresh-token grant against Zoho Accounts (zoho-crm-api.md §1).

* ``POST {accounts}/oauth/v2/token`` with a form body (``grant_type=refresh_token``,
  ``client_id``, ``client_secret``, ``refresh_token``).
* A refused refresh comes back as **HTTP 200** with ``{"error": "<code>"}`` (or a 4xx): that is
  fatal (:class:`PermanentError`) with a message built from the error code only; the client
  secret, refresh token and access token never appear in a message or a log record.
* 5xx, timeouts and connection errors are :class:`TransientError` (the caller retries).
* The token is cached and refreshed ``refresh_margin`` seconds before it expires (at most half
  its lifetime, so short test lifetimes still work); concurrent callers share one refresh
  (single flight under a lock); ``invalidate(token)`` after a 401 ``INVALID_TOKEN`` forces the
  next caller to refresh, and only once however many calls saw the same stale token.
* ``expires_in`` is in seconds; the legacy shape with ``expires_in_sec`` carries milliseconds in
  ``expires_in`` (as the official SDK handles it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from connector.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

_REFRESH_ERRORS = {
    "invalid_code": "the refresh token is invalid, expired or revoked "
    "(or belongs to another data centre's accounts server)",
    "invalid_client": "the client_id is unknown to this accounts server "
    "(wrong client or wrong data centre)",
    "invalid_client_secret": "the client secret does not match the client_id",
}


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    api_domain: str | None
    expires_at: float  # on the manager's clock

    def __repr__(self) -> str:
        return f"AccessToken(***, api_domain={self.api_domain!r}, expires_at={self.expires_at})"


class TokenManager:
    """Caches one access token; refreshes it ahead of expiry and after ``invalidate``."""

    def __init__(
        self,
        *,
        accounts_url: str,
        client_id: str,
        client_secret: SecretStr,
        refresh_token: SecretStr,
        refresh_margin: float = 300.0,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token_url = accounts_url.rstrip("/") + "/oauth/v2/token"
        self._client_id = client_id
        self._client_secret = client_secret
        self._refresh_token = refresh_token
        self._margin = refresh_margin
        self._timeout = timeout
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()
        self.refreshes = 0

    def bind(self, session: aiohttp.ClientSession) -> None:
        """Use this HTTP session (owned by the caller) for token requests."""
        self._session = session

    @property
    def api_domain(self) -> str | None:
        """The ``api_domain`` of the last token response (None before the first refresh)."""
        return self._token.api_domain if self._token else None

    def _fresh(self, token: AccessToken | None) -> bool:
        return token is not None and self._clock() < token.expires_at

    async def get(self) -> AccessToken:
        """A valid access token, refreshing first if needed (single flight)."""
        token = self._token
        if self._fresh(token):
            assert token is not None
            return token
        async with self._lock:
            token = self._token
            if self._fresh(token):
                assert token is not None
                return token
            self._token = await self._refresh()
            return self._token

    async def token(self) -> str:
        return (await self.get()).value

    def invalidate(self, stale: str | None = None) -> None:
        """Drop the cached token (after a 401 INVALID_TOKEN).

        With ``stale`` given, only drop it if it is still the cached one, so N calls failing
        with the same token cause one refresh, not N.
        """
        if stale is None or (self._token is not None and self._token.value == stale):
            self._token = None

    async def _refresh(self) -> AccessToken:
        if self._session is None:
            raise RuntimeError("TokenManager.bind(session) was not called (client not opened)")
        form = {
            "grant_type": "refresh_token",
            "client_id": self._client_id,
            "client_secret": self._client_secret.get_secret_value(),
            "refresh_token": self._refresh_token.get_secret_value(),
        }
        started = self._clock()
        try:
            async with self._session.post(
                self._token_url,
                data=form,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError:
            raise TransientError("token refresh timed out") from None
        except aiohttp.ClientError as exc:
            raise TransientError(
                f"token refresh failed: {type(exc).__name__} contacting the accounts server"
            ) from None
        if status >= 500 or status == 429:
            raise TransientError(f"token refresh failed: accounts server answered HTTP {status}")
        body = _json_object(raw)
        if status >= 400 or "access_token" not in body:
            code = body.get("error")
            code_s = str(code) if isinstance(code, str) and len(code) < 100 else "unknown"
            hint = _REFRESH_ERRORS.get(code_s, "check client_id, client secret and refresh token")
            raise PermanentError(
                f"OAuth token refresh refused by {self._token_url} "
                f"(HTTP {status}, error {code_s!r}): {hint}"
            )
        value = body["access_token"]
        if not isinstance(value, str) or not value:
            raise PermanentError("OAuth token refresh returned no usable access_token")
        lifetime = _lifetime_seconds(body)
        margin = min(self._margin, lifetime / 2)
        api_domain = body.get("api_domain")
        self.refreshes += 1
        log.info(
            "obtained a Zoho access token (valid %.0fs, api_domain %s)",
            lifetime,
            api_domain,
        )
        return AccessToken(
            value=value,
            api_domain=api_domain.rstrip("/") if isinstance(api_domain, str) else None,
            expires_at=started + lifetime - margin,
        )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _lifetime_seconds(body: dict[str, Any]) -> float:
    if "expires_in_sec" in body:
        try:
            return float(body["expires_in_sec"])
        except (TypeError, ValueError):
            pass
        try:
            return float(body["expires_in"]) / 1000.0
        except (TypeError, ValueError, KeyError):
            return 3600.0
    try:
        return float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        return 3600.0
