"""Freshness under load (issue 8, item 5): commit-to-CRM latency p50 / p99 at 10, 100 and
1,000 changes/s, with the emulator at a realistic latency.

Set-up: a fresh embedded PostgreSQL with the demo's ``orders`` table (10,000 rows, trigger
capture, ``snapshot = "never"``), the CRM emulator in its own process with every API call taking
a uniform 150–350 ms (and bulk jobs at 10,000 rows/s after a 2 s queue), and the connector as
the real CLI in a child process: ``python -m connector run --config …`` (stopped by SIGTERM).
``max_staleness = 5s``, so the planner sends within seconds and the latency measures the
pipeline, not the credit-saving wait (with the default 10 minutes, most changes would wait on
purpose).

Workload: for each rate, ``--seconds`` of single-row ``UPDATE``s, one transaction each, paced
across 1 (≤ 100/s) or 4 connections; each writer owns the keys ``id % writers = i`` and stamps
the row's ``notes`` (mapped to the CRM field ``Notes``) with ``<level>:<sequence>``, increasing
per key; its commit time is ``time.time()`` when the COMMIT returned. After each rate the
workload waits until the connector's checkpoint has passed the whole outbox.

Latency of a change = the first time the emulator's write history (its own clock,
``time.time()`` on the same machine) shows that record at that stamp or a newer one − the
commit time. A newer stamp counts because the coalescer sends only the newest version of a key.

``python -m benchmarks freshness [--scale S] [--seconds 60] [--rates 10,100,1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "freshness"
RATES = (10, 100, 1000)
ROWS = 10_000
MAX_STALENESS = "5s"
LATENCY_MS = (150.0, 350.0)
BULK_ROWS_PER_S = 10_000.0
BULK_QUEUE_S = 2.0


def _writer(
    dsn: str,
    level: int,
    idx: int,
    writers: int,
    rate: float,
    seconds: float,
    out: list[tuple[str, int, int, float]],
) -> None:
    import psycopg

    keys = [k for k in range(1, ROWS + 1) if k % writers == idx]
    interval = writers / rate
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        start = time.monotonic()
        j = 0
        while True:
            due = start + j * interval
            if due - start >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            key = keys[(j * 7919) % len(keys)]
            j += 1
            cur.execute(
                "UPDATE public.orders SET notes = %s, updated_at = now() WHERE id = %s",
                (f"{level}:{j:09d}", key),
                prepare=True,
            )
            out.append((str(key), level, j, time.time()))


def _workload(dsn: str, level: int, rate: float, seconds: float) -> tuple[list[Any], float]:
    writers = 1 if rate <= 100 else 4
    outs: list[list[tuple[str, int, int, float]]] = [[] for _ in range(writers)]
    threads = [
        threading.Thread(target=_writer, args=(dsn, level, i, writers, rate, seconds, outs[i]))
        for i in range(writers)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    changes = [x for o in outs for x in o]
    return changes, len(changes) / elapsed


async def _wait_caught_up(dsn: str, timeout: float) -> float:
    import psycopg

    t0 = time.monotonic()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while time.monotonic() - t0 < timeout:
            cur = await conn.execute(
                "SELECT coalesce((SELECT max(id) FROM connector.outbox), 0)"
                " <= coalesce((SELECT last_id FROM connector.checkpoints"
                "              WHERE pipeline = 'orders'), 0)"
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the connector did not catch up within {timeout:.0f} s")


async def _wait_running(dsn: str, proc: Any, timeout: float = 60) -> None:
    import psycopg

    t0 = time.monotonic()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError("the connector exited at start")
            cur = await conn.execute(
                "SELECT owner IS NOT NULL FROM connector.checkpoints WHERE pipeline = 'orders'"
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError("the connector did not start")


def _parse(v: Any) -> tuple[int, int] | None:
    if not isinstance(v, str) or ":" not in v:
        return None
    a, b = v.split(":", 1)
    try:
        return int(a), int(b)
    except ValueError:
        return None


def latencies(
    changes: list[tuple[str, int, int, float]], history: dict[str, list[list[Any]]]
) -> tuple[list[float], int]:
    """Per change: first CRM write showing that stamp or a newer one, minus the commit time;
    and the number of changes never seen."""
    per_key: dict[str, tuple[list[tuple[int, int]], list[float]]] = {}
    for key, writes in history.items():
        stamps: list[tuple[int, int]] = []
        times: list[float] = []
        best = (-1, -1)
        for ts, value in sorted(writes, key=lambda w: float(w[0])):
            s = _parse(value)
            if s is None or s <= best:
                continue  # a write that shows nothing newer than what was already there
            best = s
            stamps.append(s)
            times.append(float(ts))
        per_key[key] = (stamps, times)
    out: list[float] = []
    missing = 0
    for key, level, j, committed in changes:
        stamps, times = per_key.get(key, ([], []))
        i = bisect.bisect_left(stamps, (level, j))
        if i >= len(stamps):
            missing += 1
            continue
        out.append(times[i] - committed)
    return out, missing


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks freshness", description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the seconds per rate")
    ap.add_argument("--seconds", type=float, help="seconds of load per rate (default 60 × scale)")
    ap.add_argument("--rates", default=",".join(str(r) for r in RATES))
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    args, _unknown = ap.parse_known_args(args_in)
    seconds = args.seconds if args.seconds else max(5.0, 60.0 * args.scale)
    rates = [float(x) for x in args.rates.split(",")]
    t0 = time.perf_counter()
    emu_cfg = c.emulator_config(
        latency_ms=LATENCY_MS, bulk_rows_per_second=BULK_ROWS_PER_S, bulk_queue_seconds=BULK_QUEUE_S
    )
    levels: list[dict[str, Any]] = []
    all_changes: list[list[Any]] = []
    with c.postgres("freshness") as pg:
        dsn = pg.dsn()
        version = c.pg_version(dsn)
        work = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
        emu = c.EmulatorProcess(emu_cfg, dump_field="Notes")
        with emu:
            config = asyncio.run(
                c.prepare_connector(
                    dsn, emu.url, work, rows=ROWS, max_staleness=MAX_STALENESS, snapshot="never"
                )
            )
            started = time.perf_counter()
            proc, log = c.spawn(
                [sys.executable, "-m", "connector", "run", "--config", str(config)],
                c.connector_env(),
            )
            try:
                asyncio.run(_wait_running(dsn, proc))
                for level, rate in enumerate(rates, start=1):
                    print(f"freshness at {rate:g} changes/s for {seconds:g} s …", flush=True)
                    changes, achieved = _workload(dsn, level, rate, seconds)
                    catch_up = asyncio.run(_wait_caught_up(dsn, 120 + 5 * seconds))
                    levels.append(
                        {"rate": rate, "achieved": achieved, "catch_up_s": catch_up, "n": 0}
                    )
                    all_changes.append(changes)
                    levels[-1]["n"] = len(changes)
                    print(f"  {len(changes):,} changes ({achieved:,.1f}/s), caught up", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                connector = c.reap(proc, log, started)
        usage = emu.dump.get("usage", {}).get("by_api", {})
        history = emu.dump.get("history", {})
    if connector.returncode != 0:
        raise RuntimeError(f"connector exited {connector.returncode}:\n{connector.stderr_tail}")
    rows = []
    for lv, changes in zip(levels, all_changes, strict=True):
        lat, missing = latencies(changes, history)
        lv.update(
            {
                "p50_s": round(c.pct(lat, 0.5) or 0.0, 3),
                "p99_s": round(c.pct(lat, 0.99) or 0.0, 3),
                "max_s": round(max(lat), 3) if lat else None,
                "missing": missing,
                "achieved": round(lv["achieved"], 1),
                "catch_up_s": round(lv["catch_up_s"], 1),
            }
        )
        rows.append(
            [
                lv["rate"],
                lv["achieved"],
                lv["n"],
                lv["p50_s"],
                lv["p99_s"],
                lv["max_s"],
                lv["missing"],
            ]
        )
    assert emu.result is not None
    shown = [f"--scale {args.scale:g}"] if args.scale != 1 else []
    if args.seconds:
        shown.append(f"--seconds {args.seconds:g}")
    if args.rates != ",".join(str(r) for r in RATES):
        shown.append(f"--rates {args.rates}")
    result: dict[str, Any] = {
        "benchmark": NAME,
        "title": "Freshness under load: commit-to-CRM latency, emulator at realistic latency",
        "command": c.command(NAME, shown),
        "generated_at": c.now_iso(),
        "machine": c.machine(),
        "versions": c.versions(version),
        "parameters": {
            "seconds_per_rate": seconds,
            "rates": rates,
            "table_rows": ROWS,
            "max_staleness": MAX_STALENESS,
            "emulator_latency_ms": f"uniform {LATENCY_MS[0]:g}–{LATENCY_MS[1]:g}",
            "emulator_bulk": f"{BULK_ROWS_PER_S:g} rows/s after {BULK_QUEUE_S:g} s queue",
            "connector": "python -m connector run (child process), trigger capture",
        },
        "levels": levels,
        "connector_cpu_s": round(connector.cpu_s, 2),
        "connector_peak_rss_mib": round(connector.max_rss_mib, 1),
        "emulator_cpu_s": round(emu.result.cpu_s, 2),
        "crm_usage": {
            k: v for k, v in usage.items() if k in ("upsert", "bulk_write_job", "delete")
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    calls = usage.get("upsert", {}).get("calls", 0)
    jobs = usage.get("bulk_write_job", {}).get("calls", 0)
    result["tables"] = [
        {
            "title": f"Commit → visible in the CRM, max_staleness {MAX_STALENESS}",
            "columns": [
                "target changes/s",
                "achieved/s",
                "changes",
                "p50 s",
                "p99 s",
                "max s",
                "never seen",
            ],
            "rows": rows,
            "note": (
                f"Emulator: every call {LATENCY_MS[0]:g}–{LATENCY_MS[1]:g} ms. Whole run: "
                f"{calls:,} upsert calls, {jobs:,} bulk jobs; connector CPU "
                f"{result['connector_cpu_s']} s, peak RSS {result['connector_peak_rss_mib']} MiB."
            ),
        }
    ]
    c.write_result(NAME, result, args.out)
    for r in rows:
        print("   ", r)
    print(f"wall {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
