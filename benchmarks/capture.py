"""Capture cost on the legacy database (issue 8, item 2), both measurements in one run.

* **Trigger mode**: single-row ``UPDATE``s (one transaction each, autocommit) on a 10,000-row
  orders table from ``--writers`` connections for ``--seconds`` per round; rounds alternate
  without / with the capture trigger (``benchmarks/capture_trigger.py``'s rounds), the medians
  give the ratio. Then the same for 100-row ``UPDATE`` statements (a legacy batch job) from
  ``--batch-writers`` connections (issue 19).
* **Logical mode**: N row changes committed (1 row per transaction, then 100 rows per
  transaction) into a table captured by a fresh slot; ``LogicalCapture`` decodes them and
  commits them into the outbox, then ``pg_recvlogical`` reads the same changes from a second
  slot to /dev/null (``benchmarks/capture_logical.py``'s measurement); the ratio is
  recvlogical time / capture time (1.0 = as fast as PostgreSQL's own client).

Embedded PostgreSQL 16 (fsync off, synchronous_commit off: the commit path is CPU, not disk,
so the trigger's share of it is the largest it can be).

``python -m benchmarks capture [--scale S] [--seconds 8] [--rounds 3] [--writers 4]
[--events 50000]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c
from benchmarks import capture_logical as logical_bench
from benchmarks import capture_trigger as trigger_bench

NAME = "capture"


def _trigger(
    dsn: str, writers: int, seconds: float, rounds: int, rows: int = 1, prepare: bool = True
) -> dict[str, Any]:
    """Rounds without / with the trigger; ``rows`` rows per UPDATE statement."""
    if prepare:
        asyncio.run(trigger_bench._prepare(dsn))
    trigger_bench._round(dsn, writers, min(2.0, seconds), seed=0, rows=rows)  # warm-up
    without: list[float] = []
    with_trigger: list[float] = []
    unit = "updates/s" if rows == 1 else f"{rows}-row statements/s"
    for r in range(rounds):
        for on in (False, True):
            asyncio.run(trigger_bench._set_trigger(dsn, on))
            rate = trigger_bench._round(dsn, writers, seconds, seed=1000 * r + on, rows=rows)
            (with_trigger if on else without).append(rate)
            print(f"  round {r + 1} trigger {'on ' if on else 'off'}: {rate:,.0f} {unit}")
    asyncio.run(trigger_bench._set_trigger(dsn, False))
    base = statistics.median(without)
    trig = statistics.median(with_trigger)
    print(f"  {unit}: ratio with/without trigger ×{trig / base:.3f}")
    return {
        "writers": writers,
        "rows_per_statement": rows,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "table_rows": trigger_bench.ROWS,
        "updates_per_s_without_trigger": round(base),
        "updates_per_s_with_trigger": round(trig),
        "ratio_with_over_without": round(trig / base, 3),
        "rounds_without": [round(x) for x in without],
        "rounds_with": [round(x) for x in with_trigger],
    }


async def _logical(dsn: str, events: int, postmaster: int | None) -> list[dict[str, Any]]:
    import inspect

    import psycopg

    from connector import db

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await db.migrate(conn, logical_bench.SCHEMA)
    out = []
    for per_txn in (1, 100):
        extra = (
            (postmaster,)
            if "postmaster" in inspect.signature(logical_bench._bench).parameters
            else ()
        )
        # the default (own writes decoded too) and `filter_own_writes = true`, side by side
        for origin in (False, True):
            r = await logical_bench._bench(dsn, events, per_txn, *extra, origin=origin)
            print(
                f"  logical, {per_txn} row(s)/txn, filter_own_writes={origin}: capture "
                f"{r['capture_events_per_s']:,}/s, pg_recvlogical "
                f"{r['pg_recvlogical_events_per_s']:,}/s"
            )
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks capture", description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply round length and events")
    ap.add_argument("--seconds", type=float, default=None, help="one round (default 8 × scale)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--batch-writers", type=int, default=2, help="100-row UPDATE statements")
    ap.add_argument("--events", type=int, default=None, help="logical mode (default 50,000×scale)")
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    args, _unknown = ap.parse_known_args(args_in)
    seconds = args.seconds if args.seconds is not None else max(1.0, 8.0 * args.scale)
    events = args.events if args.events is not None else c.scaled(50_000, args.scale, 1_000)
    events -= events % 100
    t0 = time.perf_counter()
    with c.postgres("capture") as pg:
        dsn = pg.dsn()
        version = c.pg_version(dsn)
        print(f"trigger mode: {args.writers} writers, {args.rounds} × {seconds:g} s per config")
        trig = _trigger(dsn, args.writers, seconds, args.rounds)
        print(f"trigger mode, 100-row UPDATE statements: {args.batch_writers} writers")
        batch = _trigger(dsn, args.batch_writers, seconds, args.rounds, rows=100, prepare=False)
        print(f"logical mode: {events:,} events per shape")
        logi = asyncio.run(_logical(dsn, events, c.postmaster_pid(pg)))
    shown = [f"--scale {args.scale:g}"] if args.scale != 1 else []
    for flag, val, default in (
        ("--seconds", args.seconds, None),
        ("--rounds", args.rounds, 3),
        ("--writers", args.writers, 4),
        ("--batch-writers", args.batch_writers, 2),
        ("--events", args.events, None),
    ):
        if val != default:
            shown.append(f"{flag} {val:g}" if isinstance(val, float) else f"{flag} {val}")
    result: dict[str, Any] = {
        "benchmark": NAME,
        "title": "Capture cost on the legacy database (trigger and logical mode)",
        "command": c.command(NAME, shown),
        "generated_at": c.now_iso(),
        "machine": c.machine(),
        "versions": c.versions(version),
        "parameters": {
            "writers": args.writers,
            "batch_writers": args.batch_writers,
            "seconds_per_round": seconds,
            "rounds": args.rounds,
            "logical_events_per_shape": events,
            "postgres": "embedded 16, fsync off, synchronous_commit off",
        },
        "trigger": trig,
        "trigger_batch": batch,
        "logical": logi,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    result["tables"] = [
        {
            "title": "Trigger mode: UPDATE throughput, same run, alternating rounds",
            "columns": [
                "rows/statement",
                "writers",
                "statements/s without trigger",
                "statements/s with trigger",
                "ratio with/without",
                "rounds without",
                "rounds with",
            ],
            "rows": [
                [
                    t["rows_per_statement"],
                    t["writers"],
                    t["updates_per_s_without_trigger"],
                    t["updates_per_s_with_trigger"],
                    t["ratio_with_over_without"],
                    ", ".join(f"{x:,}" for x in t["rounds_without"]),
                    ", ".join(f"{x:,}" for x in t["rounds_with"]),
                ]
                for t in (trig, batch)
            ],
            "note": (
                "Medians of the rounds; one transaction per UPDATE statement (autocommit). "
                "100 rows/statement: each writer updates 100 consecutive rows of its own part "
                "of the table (a legacy batch job)."
            ),
        },
        {
            "title": "Logical mode: decode into the outbox vs pg_recvlogical on the same changes",
            "columns": [
                "rows/txn",
                "filter_own_writes",
                "events",
                "capture → outbox events/s",
                "pg_recvlogical events/s",
                "ratio capture/recvlogical",
                "capture CPU µs/event",
                "PostgreSQL CPU µs/event",
            ],
            "rows": [
                [
                    r["rows_per_transaction"],
                    "on" if r.get("origin_filter") else "off",
                    r["events"],
                    r["capture_events_per_s"],
                    r["pg_recvlogical_events_per_s"],
                    r["ratio_capture_to_recvlogical"],
                    r.get("capture_cpu_us_per_event"),
                    r.get("postgres_cpu_us_per_event"),
                ]
                for r in logi
            ],
            "note": (
                "Capture: from start until the last event is committed in the outbox (decode, "
                "convert, COPY, commit, confirm). pg_recvlogical: the same changes, pgoutput "
                "proto 1, written to /dev/null (no decoding to rows, no database writes). "
                "filter_own_writes (pipeline option, off by default): the capture's own outbox "
                "writes carry a replication origin the walsender skips (docs/capture-logical.md)."
            ),
        },
    ]
    c.write_result(NAME, result, args.out)
    print(f"wall {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
