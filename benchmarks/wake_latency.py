"""Commit -> reader wake-up latency of ``outbox.OutboxWatcher`` (trigger mode, default bounds
50 ms .. 1 s): how long after a legacy commit the engine learns that there is something to read.

Busy: a commit every 20 ms (the watcher stays at its minimum interval). Idle: a commit every
3 s (it has backed off to its maximum). Runs an embedded PostgreSQL 16 in a temporary directory.

    .venv/bin/python benchmarks/wake_latency.py [--busy 40] [--idle 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from connector import db, outbox
from connector.capture import triggers
from connector.config import PipelineConfig
from connector.pgembed import EmbeddedPostgres

SCHEMA = "connector"
PIPELINE = PipelineConfig(
    name="orders", source_table="orders", key_column="id", module="Orders", fields={"v": "V"}
)


async def measure(dsn: str, busy: int, idle: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await db.migrate(conn, SCHEMA)
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)")
        await triggers.install(conn, SCHEMA, PIPELINE)
        pos = outbox.START
        key = 0
        async with outbox.OutboxWatcher(dsn, SCHEMA, "orders", lambda: pos) as watcher:
            for label, gap, n in (("busy", 0.02, busy), ("idle", 3.0, idle)):
                lat: list[float] = []
                for _ in range(n):
                    await asyncio.sleep(gap)
                    key += 1
                    await conn.execute("INSERT INTO orders VALUES (%s, 'x')", (key,))
                    t0 = time.perf_counter()
                    if not await watcher.wait(5):
                        raise AssertionError("no wake-up within 5 s")
                    lat.append((time.perf_counter() - t0) * 1000)
                    _, pos = await outbox.read_batch(conn, SCHEMA, "orders", pos)
                results[label] = {
                    "commits": n,
                    "p50_ms": round(statistics.median(lat), 1),
                    "p95_ms": round(statistics.quantiles(lat, n=20)[18], 1),
                    "max_ms": round(max(lat), 1),
                }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--busy", type=int, default=40)
    ap.add_argument("--idle", type=int, default=12)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wake-latency-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    try:
        out = asyncio.run(measure(pg.dsn(), args.busy, args.idle))
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"benchmark": "wake_latency", **out}, indent=2))


if __name__ == "__main__":
    main()
