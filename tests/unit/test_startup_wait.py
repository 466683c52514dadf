"""connector.startup_wait: classification of transient start-up failures, the delays
(exponential with jitter, capped; Retry-After honoured), the /readyz line, the gauge, the log
line, and the stop during a wait. No network: the check is a plain coroutine."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from connector.errors import ConfigError, PermanentError, TokenThrottled, TransientError
from connector.metrics import Metrics
from connector.startup_wait import StartupBackoff, StartupWait, classify, summary


def test_classify_by_status() -> None:
    assert classify(TransientError("zoho fields: HTTP 429 TOO_MANY_REQUESTS", status=429)) == (
        "http_429"
    )
    assert classify(TransientError("zoho fields: HTTP 503", status=503)) == "http_5xx"
    assert classify(TransientError("zoho fields: HTTP 500", status=500)) == "http_5xx"
    assert classify(TransientError("zoho fields: request timed out")) == "unreachable"
    assert classify(TransientError("token refresh failed: cannot reach")) == "unreachable"
    assert classify(TokenThrottled("budget spent", retry_after=30)) == "token_throttled"


def test_summary_names_the_server_and_no_secret() -> None:
    s = summary(TransientError("zoho fields: HTTP 429 TOO_MANY_REQUESTS: x", status=429))
    assert s.startswith("HTTP 429 from the CRM")
    assert "credits" in s
    s = summary(
        TransientError("token refresh failed: accounts server answered HTTP 502", status=502)
    )
    assert s == "HTTP 502 from Zoho Accounts (server error)"
    assert summary(TransientError("zoho fields: request timed out")) == "the CRM timed out"
    s = summary(TransientError("token refresh failed: cannot reach the accounts server x (y)"))
    assert s == "Zoho Accounts unreachable"
    s = summary(TransientError("token refresh failed: the accounts server x did not answer"))
    assert s == "Zoho Accounts timed out"
    s = summary(
        TransientError("token refresh failed: accounts server answered HTTP 429", status=429)
    )
    assert s == "HTTP 429 from Zoho Accounts (too many requests)"
    s = summary(TransientError("token store: cannot connect to the state database (E)"))
    assert s == "the state database (token store) unreachable"
    # a CRM message that happens to mention a token is still the CRM
    s = summary(TransientError("zoho fields: HTTP 503 X: token service busy", status=503))
    assert s == "HTTP 503 from the CRM (server error)"
    assert summary(TransientError("zoho fields: connection failed (X)")) == "the CRM unreachable"


def test_delays_exponential_capped_with_jitter() -> None:
    b = StartupBackoff()
    rng = random.Random(1)
    delays = [b.delay(n, None, rng) for n in range(1, 10)]
    for n, d in enumerate(delays, start=1):
        base = min(5.0 * 2 ** (n - 1), 300.0)
        assert base <= d <= min(base + 5.0, 300.0), (n, d)
    assert delays[-1] == 300.0  # the cap holds with jitter too
    assert StartupBackoff(jitter=0).delay(1, None, rng) == 5.0


def test_retry_after_is_honoured_and_bounded() -> None:
    b = StartupBackoff()
    rng = random.Random(1)
    assert b.delay(1, 37.0, rng) == 37.0
    assert b.delay(6, 2.0, rng) == 2.0  # shorter than the exponential step: the server's word
    assert b.delay(1, 10_000.0, rng) == b.retry_after_max
    assert b.delay(1, -3.0, rng) == 0.0


FAST = StartupBackoff(initial=0.05, maximum=0.2, jitter=0)


async def test_waits_on_transient_then_passes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    metrics = Metrics()
    wait = StartupWait(metrics, StartupBackoff(initial=0.3, maximum=1.0, jitter=0))
    assert wait.readiness_line() == "checking (attempt 1)"
    calls = 0
    lines: list[str | None] = []

    async def check() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise TransientError(
                "zoho fields: HTTP 429 TOO_MANY_REQUESTS: credits", status=429, retry_after=None
            )

    async def watch() -> None:
        while not wait.done:
            lines.append(wait.readiness_line())
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    assert await wait.run(check, asyncio.Event()) is True
    await watcher
    assert calls == 3
    assert wait.readiness_line() is None
    waiting = [x for x in lines if x and x.startswith("waiting")]
    assert waiting, lines
    assert "HTTP 429 from the CRM" in waiting[0]
    assert "next try in" in waiting[0]
    # the gauge moved while waiting and is 0 once passed
    assert (
        metrics.registry.get_sample_value("connector_startup_wait_seconds", {"reason": "http_429"})
        == 0.0
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "attempt 1 failed (http_429" in warnings[0].getMessage()
    assert "next try in" in warnings[0].getMessage()
    assert "passed at attempt 3" in caplog.text


async def test_gauge_counts_seconds_waited() -> None:
    metrics = Metrics()
    wait = StartupWait(metrics, StartupBackoff(initial=2.5, maximum=5, jitter=0))
    stop = asyncio.Event()

    async def check() -> None:
        raise TransientError("zoho fields: HTTP 503", status=503)

    task = asyncio.create_task(wait.run(check, stop))
    await asyncio.sleep(1.6)
    value = metrics.registry.get_sample_value(
        "connector_startup_wait_seconds", {"reason": "http_5xx"}
    )
    assert value is not None and value >= 0.9
    line = wait.readiness_line()
    assert line is not None and line.startswith("waiting — HTTP 503 from the CRM")
    stop.set()
    assert await asyncio.wait_for(task, 2) is False


@pytest.mark.parametrize(
    "exc", [ConfigError("pipelines['x'].module", "no module"), PermanentError("refused")]
)
async def test_permanent_errors_are_not_retried(exc: Exception) -> None:
    calls = 0

    async def check() -> None:
        nonlocal calls
        calls += 1
        raise exc

    with pytest.raises(type(exc)):
        await StartupWait(Metrics(), FAST).run(check, asyncio.Event())
    assert calls == 1


async def test_stop_during_a_long_wait_returns_promptly() -> None:
    wait = StartupWait(Metrics(), StartupBackoff(initial=60, maximum=300))
    stop = asyncio.Event()

    async def check() -> None:
        raise TransientError("zoho fields: request timed out")

    task = asyncio.create_task(wait.run(check, stop))
    await asyncio.sleep(0.2)
    assert wait.reason == "unreachable"
    stop.set()
    assert await asyncio.wait_for(task, 2) is False


async def test_stop_during_a_hanging_attempt_cancels_it() -> None:
    wait = StartupWait(Metrics(), FAST)
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def check() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(wait.run(check, stop))
    await asyncio.sleep(0.1)
    stop.set()
    assert await asyncio.wait_for(task, 2) is False
    assert cancelled.is_set()


async def test_single_attempt_on_the_client_during_each_try() -> None:
    entered: list[bool] = []

    class Client:
        def __init__(self) -> None:
            self.inside = False

        def single_attempt(self) -> object:
            import contextlib

            @contextlib.contextmanager
            def cm():  # type: ignore[no-untyped-def]
                self.inside = True
                try:
                    yield
                finally:
                    self.inside = False

            return cm()

    client = Client()

    async def check() -> None:
        entered.append(client.inside)

    assert await StartupWait(Metrics(), FAST).run(check, asyncio.Event(), client=client)
    assert entered == [True]
    assert not client.inside
