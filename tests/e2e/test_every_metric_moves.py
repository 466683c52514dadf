"""Every metric that docs/operations.md or the Grafana dashboard names moves in a real run.

The real runtime (in-process), real PostgreSQL (logical capture) and the emulator: an initial
sync, a burst of updates sent by bulk write, a CRM rejection, 429s and slow answers; then a
second owner after an unclean stop (its takeover wait) with a credit reserve above what is left.
Each value a metric ever holds is recorded (a recording ``ValueClass``), so a gauge that was
non-zero only for a moment counts, and a metric nothing drives (a dead metric) fails the test.

To cover a new metric: name it in docs/operations.md (the test reads the names from there and
from deploy/grafana/dashboard.json) and make sure the scenario below drives it; if it needs a
situation of its own, add a phase and list the metric in ``DRIVEN_BY``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import values

from connector import probes, state, status
from connector.config import load_settings, resolve_secrets
from connector.demo import DEMO_ENV
from connector.metrics import Metrics
from connector.runtime import Runtime
from connector.startup_wait import StartupBackoff
from tests.e2e.helpers import emulator, prepare

ROOT = Path(__file__).resolve().parents[2]

# how the scenario drives each metric (documentation for the reader; every documented metric
# must be here, so adding a metric to the docs without saying how it moves fails the test)
DRIVEN_BY: dict[str, str] = {
    "connector_events_captured_total": "snapshot rows, then updates read from the outbox",
    "connector_outbox_lag_events": "6,000 updates not yet acknowledged",
    "connector_outbox_lag_seconds": "6,000 updates not yet acknowledged",
    "connector_oldest_pending_change_age_seconds": "changes waiting in the coalescer",
    "connector_pending_keys": "changes waiting in the coalescer",
    "connector_max_staleness_seconds": "configured",
    "connector_records_emitted_total": "upserts and the bulk job",
    "connector_api_calls_total": "every CRM call",
    "connector_api_credits_spent_total": "every CRM call",
    "connector_api_credits_remaining": "X-API-CREDITS-REMAINING",
    "connector_api_credits_budget": "configured",
    "connector_api_credit_reserve": "configured",
    "connector_api_credits_below_reserve": "phase 2: the CRM has fewer credits than the reserve",
    "connector_api_request_duration_seconds": "every CRM call",
    "connector_api_retries_total": "the emulator answers 429 now and then",
    "connector_api_concurrency_limit": "configured, lowered on 429",
    "connector_api_in_flight_requests": "the emulator answers slowly",
    "connector_token_refreshes_total": "the first access token",
    "connector_bulk_jobs_in_flight": "the bulk job of the 6,000 updates",
    "connector_bulk_job_oldest_age_seconds": "the bulk job of the 6,000 updates",
    "connector_bulk_jobs_total": "the bulk job completes",
    "connector_dead_letters_total": "a picklist value the CRM rejects",
    "connector_dead_letters_open": "a picklist value the CRM rejects",
    "connector_checkpoint_offset": "acknowledged events",
    "connector_replication_slot_lag_bytes": "WAL written after the slot's confirmed position",
    "connector_pipeline_up": "owning the pipeline",
    "connector_ready": "ready",
    "connector_snapshot_rows_total": "the initial sync",
    "connector_snapshot_progress_ratio": "the initial sync; phase 2 after the restart",
    "connector_build_info": "always 1",
    "connector_takeover_wait_seconds": "phase 2: the previous owner did not stop cleanly",
    "connector_capture_missing": "phase 2, at the end: the publication is dropped",
    "connector_outbox_events": "outbox rows",
    "connector_outbox_bytes": "outbox rows",
    "connector_outbox_oldest_event_age_seconds": "outbox rows",
    "connector_outbox_pruned_events_total": "retention = 2s prunes acknowledged rows",
    "connector_outbox_retention_seconds": "configured (2s)",
    "connector_truncates_total": "phase 2, at the end: TRUNCATE of the table (held)",
    "connector_truncates_open": "phase 2, at the end: TRUNCATE of the table (held)",
    "connector_schema_change_stops_total": "phase 2, last: a mapped column is dropped",
    "connector_startup_wait_seconds": "phase 2, at start: the CRM is out of credits (429)",
}

_HISTOGRAM_SUFFIXES = ("_sum", "_count", "_bucket")


def documented_metrics() -> set[str]:
    """Metric names in docs/operations.md and the Grafana dashboard (histogram samples folded
    into their family)."""
    text = (ROOT / "docs/operations.md").read_text() + (
        ROOT / "deploy/grafana/dashboard.json"
    ).read_text()
    names = set(re.findall(r"\bconnector_[a-z_]*[a-z]\b", text))
    out = set()
    for n in names:
        for suffix in _HISTOGRAM_SUFFIXES:
            if n.endswith(suffix) and n.removesuffix(suffix) in names | {n.removesuffix(suffix)}:
                n = n.removesuffix(suffix)
        out.add(n)
    return {n for n in out if n.count("_") >= 2}


class _Seen:
    """Sample name -> the largest absolute value any series of it ever held."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.max: dict[str, float] = {}

    def note(self, name: str, value: float) -> None:
        with self.lock:
            if abs(value) > self.max.get(name, 0.0):
                self.max[name] = abs(value)

    def moved(self, metric: str) -> bool:
        names = {metric, *(metric + s for s in _HISTOGRAM_SUFFIXES)}
        return any(self.max.get(n, 0.0) > 0 for n in names)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Seen]:
    record = _Seen()
    base = values.MutexValue

    class Recording(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._sample = args[2]

        def inc(self, amount: float) -> None:
            super().inc(amount)
            record.note(self._sample, self.get())

        def set(self, value: float, timestamp: Any = None) -> None:
            super().set(value, timestamp)
            record.note(self._sample, value)

    monkeypatch.setattr(values, "ValueClass", Recording)
    monkeypatch.setattr(probes, "GAUGE_INTERVAL", 0.2)  # read by the gauge loop
    yield record


async def _wait(cond: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


async def _keep_changing(dsn: str) -> None:
    """A live change every 0.3 s: calls keep going (some in flight), WAL keeps moving."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        n = 0
        while True:
            n += 1
            await c.execute("UPDATE public.orders SET quantity = %s WHERE id = 1", (n,))
            await asyncio.sleep(0.3)


def _settings(path: Path, **replace: str) -> Any:
    text = path.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    out = path.with_name(f"phase-{len(replace)}.toml")
    out.write_text(text)
    return load_settings(out)


async def test_every_documented_metric_moves_in_a_real_run(
    database: str, tmp_path: Path, seen: _Seen, caplog: pytest.LogCaptureFixture
) -> None:
    documented = documented_metrics()
    assert documented - DRIVEN_BY.keys() == set(), "say in DRIVEN_BY how the test drives it"
    caplog.set_level(logging.INFO, logger="connector")
    async with emulator(rate_429=0.05, seed=7) as emu:
        # 6,000 rows: the initial sync goes by bulk write (cheaper than 60 upsert calls)
        setup = await prepare(database, tmp_path, emu.url, rows=6000, capture="logical")
        text = setup.config.read_text()
        assert 'max_staleness = "2s"\n' in text
        setup.config.write_text(
            text.replace('max_staleness = "2s"\n', 'max_staleness = "2s"\nretention = "2s"\n')
        )
        settings = load_settings(setup.config)
        secrets = resolve_secrets(settings, dict(DEMO_ENV))

        # phase 1: initial sync, a bulk-sized burst of updates, a rejection
        rt = Runtime(settings, secrets, metrics=Metrics(), serve_http=False, handle_signals=False)
        task = asyncio.create_task(rt.run())
        try:

            async def snapshot_done() -> bool:
                async with await psycopg.AsyncConnection.connect(database) as c:
                    snap = await state.get_snapshot(c, "connector", "orders")
                return snap is not None and snap.status == "done"

            await _wait(snapshot_done, "initial sync done")
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                await c.execute("UPDATE public.orders SET status = 'Lost' WHERE id = 7")
                await c.execute("DELETE FROM public.orders WHERE id = 8")
                await c.execute(
                    "INSERT INTO public.orders (id, order_number, customer_email, amount,"
                    " quantity, order_date, placed_at) SELECT 90001, 'SO-90001',"
                    " 'n@example.com', 1, 1, current_date, now()"
                )
            # slow answers from here: a request is in flight most of the time, so the sampled
            # connector_api_in_flight_requests sees one (0.2 s refresh in this test)
            emu.set_faults(latency="fixed", latency_ms=1000.0)
            writer = asyncio.create_task(_keep_changing(database))
            phase1 = [m for m in DRIVEN_BY if m not in PHASE2]

            async def phase1_moved() -> bool:
                assert not task.done(), task
                return all(seen.moved(m) for m in phase1)

            t0 = time.monotonic()
            try:
                await _wait(phase1_moved, "phase 1 metrics moved", timeout=180)
                print(f"phase 1 took {time.monotonic() - t0:.1f}s")
            except AssertionError:
                dead = sorted(m for m in phase1 if not seen.moved(m))
                raise AssertionError(f"metrics that never moved: {dead}") from None
            finally:
                writer.cancel()
                emu.set_faults(latency="none")
        finally:
            rt.request_stop()
            assert await task == 0

        # phase 2: the previous owner "died" (it did not clear its owner row); the CRM's credits
        # fall below the reserve. The new owner waits, says why, is not ready; then it writes.
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
            await c.execute("UPDATE connector.checkpoints SET owner = 'gone-host:4242'")
            # the CRM has 500 credits left (reserve 1000): the next call's answer says so
            await c.execute("UPDATE public.orders SET quantity = 5 WHERE id = 2")
        # first no credits at all: the start-up checks wait (HTTP 429) until some are back
        emu.state.ledger.set_used(emu.state.ledger.allowance)
        settings2 = _settings(setup.config, **{'request_timeout = "15s"': 'request_timeout = "8s"'})
        metrics2 = Metrics()
        rt2 = Runtime(
            settings2,
            secrets,
            metrics=metrics2,
            serve_http=False,
            handle_signals=False,
            startup_backoff=StartupBackoff(initial=0.3, maximum=1.0, jitter=0),
        )
        task2 = asyncio.create_task(rt2.run())
        try:

            async def startup_waited() -> bool:
                assert not task2.done(), task2
                return seen.moved("connector_startup_wait_seconds")

            await _wait(startup_waited, "the start-up wait on 429", timeout=30)

            async def waiting_line() -> bool:
                # between two waits an attempt runs and the line says "retrying — last failure
                # HTTP 429 …": poll for the waiting line rather than read it once
                line = (await rt2.readiness()).detail["checks"]["crm_fields"]
                assert "HTTP 429" in line, line
                return str(line).startswith("waiting — HTTP 429")

            await _wait(waiting_line, "/readyz's waiting line", timeout=30)
            emu.state.ledger.set_used(emu.state.ledger.allowance - 500)

            async def waiting() -> bool:
                runner = rt2.runners.get("orders")
                return runner is not None and runner.wait_until is not None

            await _wait(waiting, "takeover wait began", timeout=60)
            ready = await rt2.readiness()
            assert not ready.ok
            assert "orders" in ready.detail["checks"]["waiting_for_previous_owner_seconds"]
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                doc = await status.pipeline_status(c, settings2, settings2.pipelines[0])
            assert doc["takeover_wait_seconds_left"] is not None
            assert "the previous owner did not stop cleanly" in status.format_status(doc)

            async def phase2_moved() -> bool:
                assert not task2.done(), task2
                return all(seen.moved(m) for m in PHASE2[:2]) and waiting_over()

            def waiting_over() -> bool:
                return "the wait for the previous owner's requests is over" in caplog.text

            await _wait(phase2_moved, "phase 2 metrics moved and the wait ended", timeout=60)

            async def ratio_one() -> bool:
                ratio = metrics2.registry.get_sample_value(
                    "connector_snapshot_progress_ratio", {"pipeline": "orders"}
                )
                return ratio == 1.0

            await _wait(ratio_one, "snapshot_progress_ratio 1 after a restart", timeout=30)
            assert (await rt2.readiness()).ok  # the wait is over: ready again

            # a TRUNCATE of the source table: held (on_truncate = "hold", the default)
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                await c.execute("TRUNCATE public.orders")

            async def truncate_held() -> bool:
                return seen.moved("connector_truncates_total") and seen.moved(
                    "connector_truncates_open"
                )

            await _wait(truncate_held, "the TRUNCATE held")

            # last: the capture is removed under the running owner (a DBA, uninstall --force)
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                cur = await c.execute("SELECT pubname FROM pg_publication")
                for (pub,) in await cur.fetchall():
                    await c.execute(f'DROP PUBLICATION "{pub}"')

            async def capture_missing() -> bool:
                return seen.moved("connector_capture_missing")

            await _wait(capture_missing, "capture_missing after the publication was dropped")

            # `connector init` puts the capture back; then a mapped column is dropped: the
            # pipeline stops on the schema change (the last thing it does here)
            from connector import admin

            await admin.init(settings2, secrets)
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                await c.execute("ALTER TABLE public.orders DROP COLUMN notes")
                await c.execute(
                    "INSERT INTO public.orders (id, order_number, customer_email, amount,"
                    " quantity, order_date, placed_at) SELECT 90002, 'SO-90002',"
                    " 'm@example.com', 1, 1, current_date, now()"
                )

            async def schema_stop() -> bool:
                return seen.moved("connector_schema_change_stops_total")

            await _wait(schema_stop, "the schema-change stop", timeout=60)
            assert (
                metrics2.registry.get_sample_value(
                    "connector_takeover_wait_seconds", {"pipeline": "orders"}
                )
                == 0.0
            )
        finally:
            rt2.request_stop()
            assert await task2 == 0


PHASE2 = (
    "connector_api_credits_below_reserve",
    "connector_takeover_wait_seconds",
    "connector_capture_missing",
    "connector_truncates_total",
    "connector_truncates_open",
    "connector_schema_change_stops_total",
    "connector_startup_wait_seconds",
)
