"""UPDATE throughput on an orders table, with and without the capture trigger.

``--writers`` connections (threads, sync psycopg, autocommit: one transaction per UPDATE) update
rows of a 10,000-row table for ``--seconds`` per round; rounds alternate without / with the
trigger so that both see the same warm-up and the same growing table. ``--rows-per-statement 1``
(default) updates one random row per statement; ``--rows-per-statement 100`` is a legacy batch
job: each statement updates 100 consecutive rows (each writer in its own part of the table, so
the writers do not wait on each other's row locks). Runs an embedded PostgreSQL 16
(connector/pgembed.py) in a temporary directory. Prints JSON.

    .venv/bin/python benchmarks/capture_trigger.py [--seconds 8] [--rounds 3] [--writers 4]
        [--rows-per-statement 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from connector import db
from connector.capture import triggers
from connector.config import PipelineConfig
from connector.pgembed import EmbeddedPostgres

SCHEMA = "connector"
ROWS = 10_000
PIPELINE = PipelineConfig(
    name="orders",
    source_table="orders",
    key_column="id",
    module="Orders",
    fields={"status": "Status", "amount": "Amount", "updated_at": "Updated"},
)


def _writer(
    dsn: str,
    stop: threading.Event,
    counts: list[int],
    idx: int,
    seed: int,
    rows: int = 1,
    writers: int = 1,
) -> None:
    rng = random.Random(seed)
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        if rows == 1:
            while not stop.is_set():
                cur.execute(
                    "UPDATE orders SET amount = amount + 1, updated_at = now() WHERE id = %s",
                    (rng.randrange(1, ROWS + 1),),
                    prepare=True,
                )
                n += 1
        else:
            part = ROWS // writers  # this writer's own part of the table
            lo = idx * part + 1
            while not stop.is_set():
                first = lo + rng.randrange(0, part - rows + 1)
                cur.execute(
                    "UPDATE orders SET amount = amount + 1, updated_at = now()"
                    " WHERE id BETWEEN %s AND %s",
                    (first, first + rows - 1),
                    prepare=True,
                )
                n += 1
    counts[idx] = n


def _round(dsn: str, writers: int, seconds: float, seed: int, rows: int = 1) -> float:
    """Statements per second of ``writers`` connections, ``rows`` rows per UPDATE."""
    stop = threading.Event()
    counts = [0] * writers
    threads = [
        threading.Thread(target=_writer, args=(dsn, stop, counts, i, seed + i, rows, writers))
        for i in range(writers)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return sum(counts) / elapsed


async def _set_trigger(dsn: str, on: bool) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if on:
            await triggers.install(conn, SCHEMA, PIPELINE)
        else:
            await triggers.uninstall(conn, SCHEMA, PIPELINE)
        await conn.execute("CHECKPOINT")


async def _prepare(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await db.migrate(conn, SCHEMA)
        await conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL,"
            " amount numeric(12,2) NOT NULL, customer text, updated_at timestamptz)"
        )
        await conn.execute(
            "INSERT INTO orders SELECT g, 'open', 10.00, 'customer ' || g, now()"
            " FROM generate_series(1, %s) g",
            (ROWS,),
        )
        await conn.execute("VACUUM ANALYZE orders")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--rows-per-statement", type=int, default=1)
    args = ap.parse_args()
    rows = args.rows_per_statement

    root = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    server = EmbeddedPostgres(root / "data")
    server.start()
    try:
        dsn = server.dsn()
        asyncio.run(_prepare(dsn))
        _round(dsn, args.writers, min(2.0, args.seconds), seed=0, rows=rows)  # warm-up
        without: list[float] = []
        with_trigger: list[float] = []
        for r in range(args.rounds):
            for on in (False, True):
                asyncio.run(_set_trigger(dsn, on))
                rate = _round(dsn, args.writers, args.seconds, seed=1000 * r + on, rows=rows)
                (with_trigger if on else without).append(rate)
        with psycopg.connect(dsn) as conn:
            events = conn.execute("SELECT count(*) FROM connector.outbox").fetchone()
            version = conn.execute("SHOW server_version").fetchone()
        base = statistics.median(without)
        trig = statistics.median(with_trigger)
        print(
            json.dumps(
                {
                    "benchmark": "capture_trigger",
                    "writers": args.writers,
                    "rows_per_statement": rows,
                    "seconds_per_round": args.seconds,
                    "rounds": args.rounds,
                    "table_rows": ROWS,
                    "statements_per_s_without_trigger": round(base, 1),
                    "statements_per_s_with_trigger": round(trig, 1),
                    "ratio_with_over_without": round(trig / base, 3),
                    "rounds_without": [round(x, 1) for x in without],
                    "rounds_with": [round(x, 1) for x in with_trigger],
                    "outbox_events_written": events[0] if events else None,
                    "postgres": version[0] if version else None,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                },
                indent=2,
            )
        )
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
