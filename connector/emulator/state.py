"""Mutable state of one emulator instance: tokens, records, credits, concurrency, faults, bulk
uploads and jobs, callbacks. Handlers in `app.py` are thin layers over this object; tests reach
it in-process through `emu.state`."""

from __future__ import annotations

import random
import secrets
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from connector.emulator.clock import Clock
from connector.emulator.config import EDITIONS, EmulatorConfig, FaultConfig
from connector.emulator.records import CompiledModule, ModuleStore


class ApiError(Exception):
    """A request-level error, answered with Zoho's ``{code, details, message, status}``."""

    def __init__(
        self,
        http_status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code)
        self.http_status = http_status
        self.code = code
        self.message = message
        self.details = details or {}
        self.body = body

    def payload(self) -> dict[str, Any]:
        if self.body is not None:
            return self.body
        return {
            "code": self.code,
            "details": self.details,
            "message": self.message,
            "status": "error",
        }


def too_many_requests(limit_type: str) -> ApiError:
    messages = {
        "credits": "You have exceeded the API credits allowed for the past 24 hours.",
        "concurrency": "The concurrency limit of the user for the app is exceeded",
        "sub_concurrency": "The sub-concurrency limit of the user for the app is exceeded",
        "fault": "Too many requests",
    }
    return ApiError(429, "TOO_MANY_REQUESTS", messages[limit_type], {"limit_type": limit_type})


@dataclass
class AccessToken:
    token: str
    refresh_token: str
    client_id: str
    scopes: list[str]
    expires_at: float


class TokenStore:
    def __init__(self, config: EmulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.refresh: dict[str, list[str]] = {
            t.refresh_token: list(t.scopes) for t in config.auth.refresh_tokens
        }
        self.grant_codes: set[str] = set(config.auth.grant_codes)
        self.access: dict[str, AccessToken] = {}
        self.issued: dict[str, deque[float]] = {}
        self.ttl = config.auth.access_token_ttl
        self.issued_count = 0

    def issue(self, refresh_token: str, client_id: str) -> AccessToken:
        now = self.clock.now()
        token = f"1000.{secrets.token_hex(16)}.{secrets.token_hex(8)}"
        at = AccessToken(
            token, refresh_token, client_id, self.refresh[refresh_token], now + self.ttl
        )
        self.access[token] = at
        self.issued.setdefault(refresh_token, deque()).append(now)
        self.issued_count += 1
        return at

    def throttled(self, refresh_token: str) -> bool:
        auth = self.config.auth
        if not auth.throttle:
            return False
        times = self.issued.get(refresh_token)
        if not times:
            return False
        horizon = self.clock.now() - auth.throttle_window
        while times and times[0] < horizon:
            times.popleft()
        return len(times) >= auth.throttle_max_tokens

    def lookup(self, token: str) -> AccessToken | None:
        at = self.access.get(token)
        if at is None:
            return None
        if at.expires_at <= self.clock.now():
            return None
        return at

    def expire_all(self) -> int:
        n = len(self.access)
        self.access.clear()
        return n

    def revoke(self, token: str) -> bool:
        if token in self.refresh:
            del self.refresh[token]
            for t in [k for k, v in self.access.items() if v.refresh_token == token]:
                del self.access[t]
            return True
        return self.access.pop(token, None) is not None


class CreditLedger:
    """A rolling-window ledger: each call's credits come back `window` seconds after it."""

    def __init__(self, config: EmulatorConfig, clock: Clock) -> None:
        self.clock = clock
        c = config.credits
        ed = EDITIONS[c.edition]
        base = int(ed["base"] or 0)
        per_user = int(ed["per_user"] or 0)
        cap = ed["cap"]
        allowance = base + c.users * per_user + c.addon_credits
        if cap is not None:
            allowance = min(allowance, int(cap))
        self.allowance = allowance
        self.window = c.window_seconds
        self.entries: deque[tuple[float, int]] = deque()
        self.used_sum = 0

    def _expire(self) -> None:
        horizon = self.clock.now() - self.window
        entries = self.entries
        while entries and entries[0][0] <= horizon:
            self.used_sum -= entries.popleft()[1]

    def used(self) -> int:
        self._expire()
        return self.used_sum

    def remaining(self) -> int:
        return max(0, self.allowance - self.used())

    def charge(self, credits: int) -> None:
        if credits <= 0:
            return
        self.entries.append((self.clock.now(), credits))
        self.used_sum += credits

    def reset(self) -> None:
        self.entries.clear()
        self.used_sum = 0

    def set_used(self, used: int) -> None:
        self.reset()
        self.charge(used)

    def snapshot(self) -> dict[str, Any]:
        used = self.used()
        return {
            "allowance": self.allowance,
            "used": used,
            "remaining": max(0, self.allowance - used),
            "window_seconds": self.window,
        }


class Faults:
    """Runtime fault switches (initially the config's `[faults]`), with their counters."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config.model_copy()
        self.rng = random.Random(config.seed)
        self.calls_until_expiry = config.expire_tokens_after_calls
        self.bulk_fail_next = config.bulk_fail_next
        self.burst_429 = config.burst_429
        self.unprocessed_rows_next = config.unprocessed_rows_next

    def update(self, changes: dict[str, Any]) -> None:
        merged = {**self.config.model_dump(), **changes}
        if changes.get("latency") == "none":  # switching latency off clears its figures
            merged.setdefault("latency_ms", 0.0)
            for k in ("latency_ms", "latency_max_ms"):
                if k not in changes:
                    merged[k] = 0.0
        new = FaultConfig.model_validate(merged)
        self.config = new
        if "seed" in changes:
            self.rng = random.Random(new.seed)
        if "expire_tokens_after_calls" in changes:
            self.calls_until_expiry = new.expire_tokens_after_calls
        if "bulk_fail_next" in changes:
            self.bulk_fail_next = new.bulk_fail_next
        if "burst_429" in changes:
            self.burst_429 = new.burst_429
        if "unprocessed_rows_next" in changes:
            self.unprocessed_rows_next = new.unprocessed_rows_next

    def snapshot(self) -> dict[str, Any]:
        d = self.config.model_dump()
        d["burst_429"] = self.burst_429
        d["bulk_fail_next"] = self.bulk_fail_next
        d["unprocessed_rows_next"] = self.unprocessed_rows_next
        d["expire_tokens_after_calls"] = self.calls_until_expiry
        return d

    def latency_seconds(self) -> float:
        c = self.config
        if c.latency == "none":
            return 0.0
        if c.latency == "fixed":
            return c.latency_ms / 1000.0
        if c.latency == "uniform":
            hi = max(c.latency_ms, c.latency_max_ms)
            return self.rng.uniform(c.latency_ms, hi) / 1000.0
        value = self.rng.expovariate(1.0 / c.latency_ms) if c.latency_ms > 0 else 0.0
        if c.latency_max_ms > 0:
            value = min(value, c.latency_max_ms)
        return value / 1000.0


@dataclass
class UsageCounter:
    calls: int = 0
    credits: int = 0
    records: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "credits": self.credits, "records": self.records}


@dataclass
class Upload:
    file_id: str
    zip_name: str
    csv_name: str
    header: list[str]
    rows: list[list[str]]
    created_at: float
    created_time: str


@dataclass
class BulkJob:
    id: str
    operation: str
    module: str
    file_id: str
    file_name: str
    find_by: str | None
    mappings: list[dict[str, Any]]
    ignore_empty: bool
    callback: dict[str, str] | None
    character_encoding: str
    created_at: float
    created_time: str
    rows: list[list[str]]
    header: list[str]
    will_fail: bool
    status: str = "ADDED"
    processed: int = 0
    added: int = 0
    updated: int = 0
    skipped: int = 0
    results: list[tuple[str, str, str]] = field(default_factory=list)
    completed_at: float | None = None
    result_zip: bytes | None = None
    callback_sent: bool = False

    @property
    def done(self) -> bool:
        return self.status in ("COMPLETED", "FAILED")


class EmulatorState:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.clock = Clock(tz_offset=config.timezone_offset)
        self.tokens = TokenStore(config, self.clock)
        self.compiled: dict[str, CompiledModule] = {
            m.api_name: CompiledModule.build(
                m, config.strict_picklists, config.maximum_length_as_string
            )
            for m in config.modules
        }
        self.base_url = ""  # set by the server once it is listening
        self.reset()

    def reset(self) -> None:
        """Forget records, history, uploads, jobs, callbacks, credits and usage; faults go back
        to the configured ones. Issued tokens stay valid."""
        self.ids = count(4876876000001000001)
        user = {"id": self.config.user.id, "name": self.config.user.name}
        self.stores: dict[str, ModuleStore] = {
            name: ModuleStore(c, self.clock, self.ids, user) for name, c in self.compiled.items()
        }
        for store in self.stores.values():
            store.peers = self.stores
        self.ledger = CreditLedger(self.config, self.clock)
        # record writes and the automations each asked for (admin ``triggers``)
        self.trigger_log: list[dict[str, Any]] = []
        self.faults = Faults(self.config.faults)
        self.usage: dict[str, UsageCounter] = {}
        self.rejected: dict[str, int] = {}
        self.uploads: dict[str, Upload] = {}
        self.jobs: dict[str, BulkJob] = {}
        self.callbacks: list[dict[str, Any]] = []
        self.in_flight: dict[tuple[str, str], int] = {}
        self.heavy_in_flight: dict[tuple[str, str], int] = {}
        self.file_ids = count(4876876000001900001)
        self.job_ids = count(4876876000001905001)

    # -- urls ------------------------------------------------------------------------------
    @property
    def api_domain(self) -> str:
        return self.config.api_domain or self.base_url

    @property
    def accounts_url(self) -> str:
        return self.config.accounts_url or self.base_url

    @property
    def upload_url(self) -> str:
        return self.config.upload_url or self.base_url

    @property
    def download_url(self) -> str:
        return self.config.download_url or self.base_url

    # -- limits ----------------------------------------------------------------------------
    @property
    def concurrency_limit(self) -> int:
        c = self.config.credits
        if c.concurrency is not None:
            return c.concurrency
        return int(EDITIONS[c.edition]["concurrency"] or 0)

    def record_cost(self, n: int) -> int:
        per = self.config.credits.records_per_credit
        return max(1, -(-n // per))

    def cost(self, api: str) -> int:
        costs = self.config.credits.costs
        return costs.get(api, costs.get("default", 1))

    def count_call(self, api: str, credits: int, records: int = 0) -> None:
        u = self.usage.get(api)
        if u is None:
            u = self.usage[api] = UsageCounter()
        u.calls += 1
        u.credits += credits
        u.records += records

    def count_rejection(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def usage_snapshot(self) -> dict[str, Any]:
        by_api = {k: v.as_dict() for k, v in sorted(self.usage.items())}
        return {
            "credits": self.ledger.snapshot(),
            "by_api": by_api,
            "totals": {
                "calls": sum(v.calls for v in self.usage.values()),
                "credits": sum(v.credits for v in self.usage.values()),
                "records": sum(v.records for v in self.usage.values()),
            },
            "bulk_jobs": len(self.jobs),
            "rejected": dict(self.rejected),
            "tokens_issued": self.tokens.issued_count,
            "clock": {"now": self.clock.now(), "offset": self.clock.offset},
        }

    # -- records ---------------------------------------------------------------------------
    def store(self, module: str) -> ModuleStore:
        s = self.stores.get(module)
        if s is None:
            raise ApiError(
                400,
                "INVALID_MODULE",
                "the module name given seems to be invalid",
                {"resource_path_index": 0},
            )
        return s

    def records_of(self, module: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store(module).records.values()]

    def history_of(self, module: str, record_id: str) -> list[dict[str, Any]]:
        return [dict(h) for h in self.store(module).history.get(record_id, [])]
