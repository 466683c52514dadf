"""The start-up CRM checks wait out transient failures in the process instead of exiting.

``connector run`` checks each pipeline's mapping against the CRM's field metadata before it
starts the pipelines (:meth:`connector.runtime.Runtime.check_mappings`). When that fails for a
reason that goes away by itself — HTTP 429 (API credits spent or a concurrency limit), a 5xx,
a timeout or a connection error to the CRM or to Zoho Accounts, a throttled token refresh — an
exit would only make the supervisor restart the process in a loop, with no /healthz or /readyz
to say why. Instead the checks are tried again here (tenacity): exponential waits from
``StartupBackoff.initial`` (5 s) doubling to ``maximum`` (5 min), plus up to ``initial`` of
random jitter; a wait the failure carries (``TransientError.retry_after``: a 429's
``Retry-After`` header or ``details.retry_after`` — neither documented by Zoho,
/work/shared/zoho-crm-api.md §4.4, so used when present only; the token budget's or Accounts
throttle's own wait) is used instead, within ``retry_after_max``. Meanwhile:

* ``/healthz`` answers 200 (the process is alive) and ``/readyz`` 503 with a check line
  ``crm_fields: waiting — HTTP 429 (API credits spent or concurrency limit), next try in 37 s``
  (:meth:`StartupWait.readiness_line`);
* ``connector_startup_wait_seconds{reason}`` holds the seconds waited so far under the latest
  reason (``http_429``, ``http_5xx``, ``unreachable``, ``token_throttled``); 0 once passed;
* each failed attempt logs one WARNING (reason, attempt number, next delay, the error's
  secret-free message);
* SIGTERM / SIGINT end the wait at once: :meth:`StartupWait.run` returns ``False`` and the
  process exits 0.

Permanent problems (an unknown module, a field that does not fit, refused credentials, a
missing scope: ``ConfigError`` / ``PermanentError``) are not retried: they propagate and the
process exits 2 (or 1) as before. Every CRM call inside an attempt is made once
(``ZohoClient.single_attempt``): the retrying is done here, where it is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
)

from connector.errors import TokenThrottled, TransientError
from connector.metrics import STARTUP_WAIT_REASONS, Metrics

log = logging.getLogger("connector.runtime")

CHECK_NAME = "crm_fields"  # the /readyz check line
GAUGE_STEP = 1.0  # seconds between updates of connector_startup_wait_seconds while waiting


@dataclass(frozen=True, slots=True)
class StartupBackoff:
    """Waits between attempts of the start-up checks (``Runtime(startup_backoff=…)``)."""

    initial: float = 5.0
    maximum: float = 300.0
    retry_after_max: float = 900.0  # a Retry-After longer than this is cut to it
    jitter: float | None = None  # up to this many seconds added at random; None = ``initial``

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max)
        base = min(self.initial * 2.0 ** max(attempt - 1, 0), self.maximum)
        jitter = self.initial if self.jitter is None else self.jitter
        return min(base + rng.uniform(0.0, jitter), self.maximum)


def classify(exc: TransientError) -> str:
    """The ``reason`` label of a transient failure (one of ``STARTUP_WAIT_REASONS``)."""
    if isinstance(exc, TokenThrottled):
        return "token_throttled"
    if exc.status == 429:
        return "http_429"
    if exc.status is not None and exc.status >= 500:
        return "http_5xx"
    return "unreachable"  # no answer: a timeout or a connection error (CRM or Accounts)


def summary(exc: TransientError) -> str:
    """A short, secret-free phrase for the /readyz line."""
    reason = classify(exc)
    text = str(exc)
    # the messages' prefixes (connector.zoho.auth / transport): who did not answer
    if text.startswith("token store"):
        server = "the state database (token store)"
    elif text.startswith("token refresh"):
        server = "Zoho Accounts"
    else:
        server = "the CRM"
    if reason == "http_429":
        # Zoho answers TOO_MANY_REQUESTS both for spent credits and for concurrency
        # (/work/shared/zoho-crm-api.md §4.4): the two are not told apart here
        if server != "the CRM":
            return f"HTTP 429 from {server} (too many requests)"
        return f"HTTP 429 from {server} (API credits spent or concurrency limit)"
    if reason == "http_5xx":
        return f"HTTP {exc.status} from {server} (server error)"
    if reason == "token_throttled":
        return "access-token creation throttled (Zoho Accounts limit or crm.token_budget)"
    what = "timed out" if "timed out" in text or "did not answer" in text else "unreachable"
    return f"{server} {what}"


class StartupWait:
    """State of the start-up checks: what /readyz says, the gauge, the retry loop."""

    def __init__(
        self, metrics: Metrics, backoff: StartupBackoff | None = None, *, seed: int | None = None
    ) -> None:
        self.metrics = metrics
        self.backoff = backoff or StartupBackoff()
        self.rng = random.Random(seed)  # jitter, not cryptography
        self.done = False
        self.attempt = 0
        self.reason: str | None = None
        self.what: str | None = None
        self.next_try_at: float | None = None  # monotonic; set while waiting
        self.waiting_since: float | None = None

    # ---------------------------------------------------------------- /readyz
    def readiness_line(self) -> str | None:
        """The ``crm_fields`` check of /readyz while the checks have not passed, else None."""
        if self.done:
            return None
        if self.next_try_at is None:
            if self.what is None:
                return f"checking (attempt {max(self.attempt, 1)})"
            return f"retrying — last failure {self.what} (attempt {self.attempt})"
        left = max(self.next_try_at - time.monotonic(), 0.0)
        return f"waiting — {self.what}, next try in {left:.0f} s"

    # ---------------------------------------------------------------- the loop
    async def run(
        self,
        check: Callable[[], Awaitable[None]],
        stopping: asyncio.Event,
        *,
        client: Any = None,
    ) -> bool:
        """Run ``check`` until it passes (True) or ``stopping`` is set (False). Transient
        failures wait; anything else propagates. ``client``: a ``ZohoClient`` whose calls are
        made once per attempt."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_never,
            wait=self._wait,
            before_sleep=self._before_sleep,
            sleep=_interruptible_sleep(self, stopping),
            reraise=True,
        )
        try:
            async for try_ in retrying:
                with try_:
                    if stopping.is_set():
                        raise _Stopped
                    self.attempt = try_.retry_state.attempt_number
                    self.next_try_at = None
                    with _single_attempt(client):
                        if not await _until_stopped(check(), stopping):
                            raise _Stopped
        except _Stopped:
            log.info("stop requested while waiting for the start-up CRM checks")
            return False
        finally:
            self.next_try_at = None
        waited = time.monotonic() - self.waiting_since if self.waiting_since else 0.0
        if self.attempt > 1:
            log.info(
                "start-up CRM checks passed at attempt %d after waiting %.0f s",
                self.attempt,
                waited,
            )
        self.done = True
        for reason in STARTUP_WAIT_REASONS:
            self.metrics.startup_wait_seconds.labels(reason=reason).set(0)
        return True

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        return self.backoff.delay(state.attempt_number, retry_after, self.rng)

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        assert isinstance(exc, TransientError)
        delay = state.next_action.sleep if state.next_action else 0.0
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
        reason = classify(exc)
        if self.reason is not None and self.reason != reason:
            self.metrics.startup_wait_seconds.labels(reason=self.reason).set(0)
        self.reason = reason
        self.what = summary(exc)
        self.next_try_at = now + delay
        self._set_gauge()
        log.warning(
            "start-up CRM checks: attempt %d failed (%s: %s); not exiting, next try in %.0f s"
            " (/readyz says why; SIGTERM stops the wait)",
            state.attempt_number,
            reason,
            exc,
            delay,
            extra={"reason": reason, "attempt": state.attempt_number, "next_delay_s": delay},
        )

    def _set_gauge(self) -> None:
        if self.reason is not None and self.waiting_since is not None:
            self.metrics.startup_wait_seconds.labels(reason=self.reason).set(
                round(time.monotonic() - self.waiting_since, 1)
            )


class _Stopped(Exception):
    """SIGTERM / SIGINT during the start-up checks (not a TransientError: ends the loop)."""


def _interruptible_sleep(
    wait: StartupWait, stopping: asyncio.Event
) -> Callable[[float], Awaitable[None]]:
    """tenacity's sleep: returns early when ``stopping`` is set; keeps the gauge current."""

    async def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), min(left, GAUGE_STEP))
            wait._set_gauge()

    return sleep


@contextlib.contextmanager
def _single_attempt(client: Any) -> Iterator[None]:
    single = getattr(client, "single_attempt", None)
    if single is None:
        yield
        return
    with single():
        yield


async def _until_stopped(work: Awaitable[None], stopping: asyncio.Event) -> bool:
    """Await ``work``; False (``work`` cancelled) when ``stopping`` is set first."""
    task = asyncio.ensure_future(work)
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stop.cancel()
    if task.done():
        task.result()  # raises the check's exception
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False
