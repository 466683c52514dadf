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

Token limits (Zoho Accounts "Refresh access token" page: *"Using a refresh token, your app can
create up to ten access tokens in a span of ten minutes. If the limit is reached, the access token
creation will be blocked for the rest of the ten minutes"*):

* access tokens are **shared** through a :class:`TokenStore`: :class:`PgTokenStore` (a row in the
  state schema's ``oauth_tokens`` table, locked while one process refreshes, so HA replicas and
  CLI verbs reuse one token per hour instead of minting one each) or, without a database,
  ``PROCESS_TOKEN_STORE`` (shared by the clients of this process). docs/security.md explains the
  trade-off;
* a **client-side budget** (``crm.token_budget``, default 5 of Zoho's 10 per 10 minutes) counts
  every token created through the store; when it is spent the caller waits for the window;
* a **throttled** refresh (HTTP 400 ``{"error": "Access Denied", "error_description": "You have
  made too many requests continuously…"}``) is a :class:`TransientError` that waits out the
  window (recorded in the store so every process waits) with a message saying so — never a
  credentials error, never a failed pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import orjson
import psycopg
from psycopg import sql
from pydantic import SecretStr

from connector.errors import PermanentError, TokenThrottled, TransientError

log = logging.getLogger(__name__)

_REFRESH_ERRORS = {
    "invalid_code": "the refresh token is invalid, expired or revoked "
    "(or belongs to another data centre's accounts server)",
    "invalid_client": "the client_id is unknown to this accounts server "
    "(wrong client or wrong data centre)",
    "invalid_client_secret": "the client secret does not match the client_id",
}


#: Zoho Accounts: at most 10 access tokens per refresh token per 10 minutes.
ZOHO_TOKENS_PER_WINDOW = 10
TOKEN_WINDOW_SECONDS = 600.0
DEFAULT_TOKEN_BUDGET = 5


@dataclass(slots=True)
class TokenRecord:
    """What a :class:`TokenStore` keeps per (accounts server, client, refresh token).
    Times are wall-clock epoch seconds (shared between processes and hosts)."""

    access_token: str | None = None
    api_domain: str | None = None
    issued_at: float | None = None
    expires_at: float | None = None
    mints: list[float] = field(default_factory=list)  # creation times inside the window
    blocked_until: float | None = None  # Zoho throttled token creation until then

    def __repr__(self) -> str:
        return (
            f"TokenRecord(***, api_domain={self.api_domain!r}, expires_at={self.expires_at}, "
            f"mints={len(self.mints)}, blocked_until={self.blocked_until})"
        )


class TokenStore(Protocol):
    def locked(self, key: str) -> contextlib.AbstractAsyncContextManager[TokenRecord]:
        """The record of ``key``, held exclusively (across processes for a shared store) until
        the context exits; changes made to it are saved on exit, also when it raises."""
        ...


class MemoryTokenStore:
    """Process-local store: every client of this process without a database store shares it
    (one token per refresh token and process, however many clients a verb opens)."""

    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}
        # one lock per event loop (an asyncio.Lock is bound to the loop that first waits on it)
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @contextlib.asynccontextmanager
    async def locked(self, key: str) -> AsyncIterator[TokenRecord]:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            yield self._records.setdefault(key, TokenRecord())


#: The default store of a :class:`TokenManager` without one.
PROCESS_TOKEN_STORE = MemoryTokenStore()


class PgTokenStore:
    """The ``{schema}.oauth_tokens`` table of the state database (migration 0008): one row per
    key, ``SELECT … FOR UPDATE`` while a process decides and refreshes, so two processes never
    mint at once and the second one reuses the first one's token. The refresh token itself is
    never stored (the key is a SHA-256 of accounts URL, client id, client secret and refresh
    token)."""

    def __init__(self, dsn: str, schema: str, *, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._schema = schema
        self._connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"PgTokenStore(schema={self._schema!r})"

    @contextlib.asynccontextmanager
    async def locked(self, key: str) -> AsyncIterator[TokenRecord]:
        table = sql.Identifier(self._schema, "oauth_tokens")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, connect_timeout=int(self._connect_timeout)
            )
        except psycopg.Error as exc:
            raise TransientError(
                f"token store: cannot connect to the state database ({type(exc).__name__})"
            ) from None
        async with conn, conn.transaction():
            await conn.execute(
                sql.SQL("INSERT INTO {} (key) VALUES (%s) ON CONFLICT DO NOTHING").format(table),
                (key,),
            )
            cur = await conn.execute(
                sql.SQL(
                    "SELECT access_token, api_domain, issued_at, expires_at, mints,"
                    " blocked_until FROM {} WHERE key = %s FOR UPDATE"
                ).format(table),
                (key,),
            )
            row = await cur.fetchone()
            assert row is not None
            rec = TokenRecord(
                access_token=row[0],
                api_domain=row[1],
                issued_at=_epoch(row[2]),
                expires_at=_epoch(row[3]),
                mints=[t.timestamp() for t in row[4] or []],
                blocked_until=_epoch(row[5]),
            )
            try:
                yield rec
            finally:
                await conn.execute(
                    sql.SQL(
                        "UPDATE {} SET access_token = %s, api_domain = %s, issued_at = %s,"
                        " expires_at = %s, mints = %s, blocked_until = %s,"
                        " updated_at = now() WHERE key = %s"
                    ).format(table),
                    (
                        rec.access_token,
                        rec.api_domain,
                        _ts(rec.issued_at),
                        _ts(rec.expires_at),
                        [_ts(m) for m in rec.mints],
                        _ts(rec.blocked_until),
                        key,
                    ),
                )


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


class _Throttled(Exception):
    """Zoho Accounts refused to create another access token (the 10-per-10-minutes limit)."""


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
        store: TokenStore | None = None,
        budget: int = DEFAULT_TOKEN_BUDGET,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= budget <= ZOHO_TOKENS_PER_WINDOW:
            raise ValueError(f"token budget must be 1..{ZOHO_TOKENS_PER_WINDOW}")
        self._token_url = accounts_url.rstrip("/") + "/oauth/v2/token"
        self._store: TokenStore = store or PROCESS_TOKEN_STORE
        self._budget = budget
        self._wall = wall_clock
        self._stale: str | None = None
        # the token is shared only with holders of the same credentials: a process with a wrong
        # client secret must not be handed a token it could not have obtained itself
        parts = (
            self._token_url,
            client_id,
            client_secret.get_secret_value(),
            refresh_token.get_secret_value(),
        )
        self._key = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
        self.throttled = 0  # refreshes Zoho refused as throttled, or the budget deferred
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
            self._token = await self._obtain()
            return self._token

    async def token(self) -> str:
        return (await self.get()).value

    def invalidate(self, stale: str | None = None) -> None:
        """Drop the cached token (after a 401 INVALID_TOKEN).

        With ``stale`` given, only drop it if it is still the cached one, so N calls failing
        with the same token cause one refresh, not N.
        """
        if stale is None or (self._token is not None and self._token.value == stale):
            if self._token is not None:
                self._stale = self._token.value  # never take it from the shared store again
            self._token = None

    async def _obtain(self) -> AccessToken:
        """The store's token when still fresh (another process or verb minted it), else a new
        one within the budget and outside a throttled window."""
        async with self._store.locked(self._key) as rec:
            now = self._wall()
            if (
                rec.access_token
                and rec.access_token != self._stale
                and rec.expires_at is not None
                and rec.issued_at is not None
            ):
                margin = min(self._margin, (rec.expires_at - rec.issued_at) / 2)
                left = rec.expires_at - margin - now
                if left > 0:
                    return AccessToken(
                        value=rec.access_token,
                        api_domain=rec.api_domain,
                        expires_at=self._clock() + left,
                    )
            if rec.blocked_until is not None and rec.blocked_until > now:
                self.throttled += 1
                wait = rec.blocked_until - now
                raise TokenThrottled(
                    f"Zoho Accounts is throttling access-token creation for this refresh token "
                    f"(at most {ZOHO_TOKENS_PER_WINDOW} per {TOKEN_WINDOW_SECONDS / 60:.0f} "
                    f"minutes); waiting {wait:.0f}s before asking again. The credentials are "
                    "fine; another process using the same refresh token may be minting tokens",
                    retry_after=wait,
                )
            rec.mints = sorted(m for m in rec.mints if m > now - TOKEN_WINDOW_SECONDS)
            if len(rec.mints) >= self._budget:
                self.throttled += 1
                wait = rec.mints[0] + TOKEN_WINDOW_SECONDS - now
                raise TokenThrottled(
                    f"access-token budget spent: {len(rec.mints)} tokens created in the last "
                    f"{TOKEN_WINDOW_SECONDS / 60:.0f} minutes (crm.token_budget = {self._budget}"
                    f", Zoho allows {ZOHO_TOKENS_PER_WINDOW}); waiting {wait:.0f}s",
                    retry_after=wait,
                )
            rec.mints.append(now)  # an attempt counts: Zoho may have created the token
            try:
                token, lifetime = await self._refresh()
            except _Throttled:
                self.throttled += 1
                # Zoho blocks "for the rest of the ten minutes"; the window's start is unknown,
                # so wait a whole window (fails safe)
                rec.blocked_until = now + TOKEN_WINDOW_SECONDS
                raise TokenThrottled(
                    f"Zoho Accounts refused a new access token as throttled (more than "
                    f"{ZOHO_TOKENS_PER_WINDOW} tokens from this refresh token in "
                    f"{TOKEN_WINDOW_SECONDS / 60:.0f} minutes); waiting "
                    f"{TOKEN_WINDOW_SECONDS:.0f}s. The credentials are fine; look for other "
                    "processes using the same refresh token",
                    retry_after=TOKEN_WINDOW_SECONDS,
                ) from None
            rec.access_token = token.value
            rec.api_domain = token.api_domain
            rec.issued_at = now
            rec.expires_at = now + lifetime
            self._stale = None
            return token

    async def _refresh(self) -> tuple[AccessToken, float]:
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
            raise TransientError(
                f"token refresh failed: the accounts server {self._token_url} did not answer "
                f"within {self._timeout:.0f}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise TransientError(
                f"token refresh failed: cannot reach the accounts server {self._token_url} "
                f"({_describe_os_error(exc)}); check crm.data_centre / crm.accounts_url, DNS, "
                "the network and any proxy"
            ) from None
        if status >= 500 or status == 429:
            raise TransientError(
                f"token refresh failed: accounts server answered HTTP {status}", status=status
            )
        body = _json_object(raw)
        if _is_throttled(body):
            raise _Throttled
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
        token = AccessToken(
            value=value,
            api_domain=api_domain.rstrip("/") if isinstance(api_domain, str) else None,
            expires_at=started + lifetime - margin,
        )
        return token, lifetime


def _is_throttled(body: dict[str, Any]) -> bool:
    """Zoho's throttled answer: ``{"error": "Access Denied", "error_description": "You have made
    too many requests continuously. Please try again after some time.", "status": "failure"}``
    (zoho-crm-api.md §1.2; the wording is reported, not documented: match either part)."""
    error = str(body.get("error") or "").lower()
    description = str(body.get("error_description") or "").lower()
    return error == "access denied" or "too many requests" in description


def _describe_os_error(exc: aiohttp.ClientError) -> str:
    """``ClientConnectorError: errno 111 (Connect call failed …)`` — the errno of the socket
    error when there is one (the URL carries no secret; the form body is never shown)."""
    name = type(exc).__name__
    os_error = getattr(exc, "os_error", None)
    err = os_error if isinstance(os_error, OSError) else exc if isinstance(exc, OSError) else None
    if err is not None and err.errno is not None:
        code = errno.errorcode.get(err.errno, "")
        text = (err.strerror or "")[:120]
        return f"{name}: errno {err.errno}{' ' + code if code else ''} {text}".rstrip()
    return name


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
