"""Logical-mode capture throughput next to pg_recvlogical on the same changes.

For each shape (1-row and 100-row transactions) the script writes N row events into a table
captured by a fresh slot, then measures (a) LogicalCapture decoding them and committing them
into the outbox (events/s, from start to the last outbox commit), and (b) pg_recvlogical reading
the same changes from a second slot to /dev/null. Prints JSON.

Wall-clock rates depend on whatever else runs on the machine, so the script also reports CPU
time spent during the capture run: by this Python process (``capture_cpu_us_per_event``) and,
with the embedded cluster, by all PostgreSQL processes (walsender + outbox backend + background
workers; ``postgres_cpu_us_per_event``, read from /proc on Linux).

    .venv/bin/python benchmarks/capture_logical.py [--events 100000] [--dsn DSN] [--no-origin]

The capture tags its own outbox writes with a replication origin and streams with
``origin 'none'`` (PostgreSQL 16+), so its walsender skips them before decoding;
``--no-origin`` measures without that (``origin_filter`` and the slot's decoded
transactions/bytes are in each result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from connector import db
from connector.capture import logical
from connector.config import PipelineConfig
from connector.pgembed import EmbeddedPostgres, bin_dir

SCHEMA = "connector"


def _cfg(origin: bool = True) -> PipelineConfig:
    return PipelineConfig(
        name="bench",
        source_table="orders",
        key_column="id",
        module="Orders",
        capture="logical",
        fields={"amount": "Amount"},
        filter_own_writes=origin,
    )


async def _prepare(dsn: str, events: int, per_txn: int) -> str:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DROP TABLE IF EXISTS orders")
        await conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(12,2),"
            " status text, created timestamptz, flag boolean)"
        )
        await conn.execute(f"TRUNCATE {SCHEMA}.outbox")
        await conn.execute(f"DELETE FROM {SCHEMA}.capture_state")
        for slot in ("connector_bench", "bench_recv"):
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )
        await conn.execute("DROP PUBLICATION IF EXISTS connector_bench")
        await logical.install(conn, SCHEMA, _cfg())
        await conn.execute("SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')")
        ntx = events // per_txn
        if per_txn == 1:
            # one transaction per row, written server-side (a procedure commits each row)
            await conn.execute(
                "CREATE OR REPLACE PROCEDURE bench_fill(n int) LANGUAGE plpgsql AS $$"
                " BEGIN FOR i IN 1..n LOOP INSERT INTO orders VALUES (i, 'customer ' || i,"
                " i * 1.25, 'new', now(), i % 2 = 0); COMMIT; END LOOP; END $$"
            )
            await conn.execute("CALL bench_fill(%s)", (events,))
        else:
            await conn.execute(
                "CREATE OR REPLACE PROCEDURE bench_fill_batch(n int, k int) LANGUAGE plpgsql AS $$"
                " BEGIN FOR t IN 0..n-1 LOOP INSERT INTO orders SELECT i, 'customer ' || i,"
                " i * 1.25, 'new', now(), i % 2 = 0 FROM generate_series(t*k+1, t*k+k) i;"
                " COMMIT; END LOOP; END $$"
            )
            await conn.execute("CALL bench_fill_batch(%s, %s)", (ntx, per_txn))
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


def _postgres_cpu(postmaster: int | None) -> float | None:
    """CPU seconds used so far by a postmaster and its children (exited ones included)."""
    if postmaster is None or not Path("/proc").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == postmaster:  # own time + that of waited-for (exited) children
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / tick


async def _run_capture(dsn: str, events: int, *, origin: bool = True) -> tuple[float, bool]:
    cap = logical.LogicalCapture(dsn, SCHEMA, _cfg(origin), heartbeat_interval=3600)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(cap.run(stop))
    while cap.stats.events < events:
        if task.done():
            task.result()
            raise RuntimeError("capture stopped early")
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    return elapsed, cap.origin_filter


def _run_recvlogical(dsn: str, end_lsn: str) -> float:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    argv = [
        str(bin_dir() / "pg_recvlogical"),
        "-d", str(info.get("dbname", "postgres")),
        "-h", str(info.get("host", "127.0.0.1")),
        "-p", str(info.get("port", 5432)),
        "-U", str(info.get("user", "postgres")),
        "--slot", "bench_recv", "--start", "--no-loop",
        "-o", "proto_version=1", "-o", "publication_names=connector_bench",
        "-E", end_lsn, "-f", "/dev/null",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


async def _bench(
    dsn: str, events: int, per_txn: int, postmaster: int | None, *, origin: bool = True
) -> dict[str, Any]:
    end_lsn = await _prepare(dsn, events, per_txn)
    await asyncio.sleep(1)  # let the checkpoint / autovacuum work of the fill settle
    pg0 = _postgres_cpu(postmaster)
    cpu0 = time.process_time()
    cap_s, filtered = await _run_capture(dsn, events, origin=origin)
    cpu_s = time.process_time() - cpu0
    pg1 = _postgres_cpu(postmaster)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # what the capture's walsender decoded (its own outbox writes included unless they
        # carry the capture's replication origin)
        cur = await conn.execute(
            "SELECT total_txns, total_bytes FROM pg_stat_replication_slots"
            " WHERE slot_name = 'connector_bench'"
        )
        decoded = await cur.fetchone()
    recv_s = await asyncio.to_thread(_run_recvlogical, dsn, end_lsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {SCHEMA}.outbox")
        row = await cur.fetchone()
        assert row is not None and row[0] == events, row
        await logical.uninstall(conn, SCHEMA, _cfg())
        await conn.execute("SELECT pg_drop_replication_slot('bench_recv')")
    return {
        "rows_per_transaction": per_txn,
        "events": events,
        "origin_filter": filtered,
        "slot_decoded_txns": None if decoded is None else decoded[0],
        "slot_decoded_bytes": None if decoded is None else decoded[1],
        "capture_seconds": round(cap_s, 3),
        "capture_events_per_s": round(events / cap_s),
        "capture_cpu_us_per_event": round(cpu_s / events * 1e6, 2),
        "postgres_cpu_us_per_event": (
            None if pg0 is None or pg1 is None else round((pg1 - pg0) / events * 1e6, 2)
        ),
        "pg_recvlogical_seconds": round(recv_s, 3),
        "pg_recvlogical_events_per_s": round(events / recv_s),
        "ratio_capture_to_recvlogical": round(recv_s / cap_s, 3),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--dsn", default=None, help="superuser DSN (default: an embedded cluster)")
    ap.add_argument(
        "--no-origin",
        action="store_true",
        help="decode the capture's own outbox writes too (no replication-origin filter)",
    )
    args = ap.parse_args()
    server = None
    tmp = None
    dsn = args.dsn
    if dsn is None:
        tmp = tempfile.mkdtemp(prefix="bench-logical-")
        server = EmbeddedPostgres(Path(tmp) / "data")
        server.start()
        dsn = server.dsn()
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await db.migrate(conn, SCHEMA)
        pm = server.pid() if server is not None else None
        results = [
            await _bench(dsn, args.events, k, pm, origin=not args.no_origin) for k in (1, 100)
        ]
    finally:
        if server is not None:
            server.stop("immediate")
    print(
        json.dumps(
            {
                "benchmark": "capture_logical",
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
