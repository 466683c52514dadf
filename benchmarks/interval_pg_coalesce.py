"""Issue 19's interval-sync lead, measured before building it: coalesce in PostgreSQL at flush
time instead of holding every pending key in the ``Coalescer``.

Part of ``make bench`` (registered in ``benchmarks/__main__.py``): a probe of what the design in
docs/performance.md ("Interval sync memory") would cost. For each size (pending keys), a fresh
embedded PostgreSQL holds the connector's state schema (``connector.db.migrate``: the real
outbox and its indexes) and the demo's ``orders`` table; the outbox gets two update events per
key (every key once, then every key again: the second version is the newest), each with the
row's ``to_jsonb`` image, as the trigger writes it. Then a fresh child process does the flush:

    SELECT DISTINCT ON (o.key) o.key, o.id, o.row::text FROM connector.outbox o
     WHERE o.pipeline = 'orders' ORDER BY o.key DESC, o.id DESC

through a server-side cursor, 25,000 keys a page (one Bulk Write job's worth): each page's
images are parsed (``outbox.load_row``), mapped (``RecordMapper.to_csv_values``, the demo
mapping) and zipped (``zoho.bulk.build_bulk_zip``), and then dropped. The child checks that it
saw every key once, at its newest id. Reported: the child's peak RSS (``VmHWM``), its wall
and CPU seconds, PostgreSQL's CPU during the flush, the plan's top node.

What the probe leaves out (the real design must add them, docs/performance.md): the in-flight
fences and ``key_state``'s acknowledged version, snapshot events (ordered by visibility, not
id), deletes, and the bound of the range by the reader's checkpoint.

    python -m benchmarks interval_pg_coalesce [--sizes 10000,1000000] [--scale S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import _common as c
from benchmarks.interval_memory import _rss_mb

NAME = "interval_pg_coalesce"
PAGE = 25_000
TARGET_RATIO = 1.5
QUERY = (
    "SELECT DISTINCT ON (o.key) o.key, o.id, o.row::text FROM connector.outbox o"
    " WHERE o.pipeline = 'orders' ORDER BY o.key DESC, o.id DESC"
)


def child(dsn: str, keys: int) -> dict[str, Any]:
    from benchmarks.initial_sync_sql_csv import _pipeline
    from connector.mapping import RecordMapper
    from connector.outbox import load_row
    from connector.zoho.bulk import build_bulk_zip

    base = _rss_mb()
    mapper = RecordMapper(_pipeline())
    header = mapper.csv_header()
    t0, cpu0 = time.perf_counter(), time.process_time()
    seen = 0
    jobs = 0
    zip_bytes = 0
    older = 0  # keys whose row came back at an id below their newest
    last_key: str | None = None
    with psycopg.connect(dsn) as conn, conn.cursor(name="flush") as cur:
        cur.itersize = PAGE
        cur.execute(QUERY)
        while page := cur.fetchmany(PAGE):
            for key, oid, _ in page:
                if last_key is not None and key >= last_key:
                    raise SystemExit(f"keys out of order or repeated: {key!r} after {last_key!r}")
                last_key = key
                if int(oid) <= keys:  # ids 1..keys are the first version of each key
                    older += 1
            values = [mapper.to_csv_values(load_row(image)) for _, _, image in page]
            zip_bytes += len(build_bulk_zip(header, values).data)
            seen += len(page)
            jobs += 1
    return {
        "keys": keys,
        "seen": seen,
        "older": older,
        "jobs": jobs,
        "zip_bytes": zip_bytes,
        "rss_base_mb": round(base, 1),
        "rss_peak_mb": round(_rss_mb(), 1),
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
    }


async def _fill(dsn: str, keys: int) -> str:
    from connector.db import migrate
    from connector.demo_workload import create_orders

    await create_orders(dsn, keys)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrate(conn, "connector")
        await conn.execute("SET TimeZone = 'UTC'")
        for _version in (1, 2):
            await conn.execute(
                "INSERT INTO connector.outbox (pipeline, op, key, version, row)"
                " SELECT 'orders', 'update', o.id::text, nextval('connector.outbox_id_seq'),"
                " to_jsonb(o.*) FROM public.orders o ORDER BY o.id"
            )
        await conn.execute("VACUUM ANALYZE connector.outbox")
        cur = await conn.execute("EXPLAIN " + QUERY)
        top = (await cur.fetchone() or ("?",))[0]
    return str(top).split("  (", 1)[0].strip()


def _size(n: int) -> dict[str, Any]:
    with c.postgres(NAME) as server:
        dsn = server.dsn()
        t0 = time.perf_counter()
        plan = asyncio.run(_fill(dsn, n))
        fill_s = time.perf_counter() - t0
        pm = c.postmaster_pid(server)
        pg0 = c.postgres_cpu_seconds(pm)
        out = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{NAME}", "--child", str(n), "--dsn", dsn],
            check=True,
            capture_output=True,
            text=True,
            cwd=c.REPO,
            timeout=1800,
        )
        pg1 = c.postgres_cpu_seconds(pm)
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if doc["seen"] != n or doc["older"]:
        raise SystemExit(f"flush of {n} keys saw {doc['seen']}, {doc['older']} not the newest")
    doc["plan"] = plan
    doc["fill_s"] = round(fill_s, 1)
    doc["pg_cpu_s"] = None if pg0 is None or pg1 is None else round(pg1 - pg0, 2)
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__)
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every size")
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dsn", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child is not None:
        print(json.dumps(child(ns.dsn, ns.child)))
        return 0
    sizes = [c.scaled(int(s), ns.scale, 1_000) for s in ns.sizes.split(",")]
    started = time.perf_counter()
    runs = []
    for n in sizes:
        runs.append(_size(n))
        print(runs[-1], flush=True)
    anchor = runs[0]["rss_peak_mb"]
    rows = [
        [
            r["keys"],
            2 * r["keys"],
            r["jobs"],
            r["rss_peak_mb"],
            round(r["rss_peak_mb"] / anchor, 2),
            r["seconds"],
            r["cpu_s"],
            r["pg_cpu_s"],
            r["plan"],
        ]
        for r in runs
    ]
    worst = max(row[4] for row in rows)
    result = {
        "benchmark": NAME,
        "title": "Interval sync lead: newest per key by DISTINCT ON at flush time, paged",
        "command": f"python -m benchmarks {NAME} --sizes {ns.sizes}"
        + (f" --scale {ns.scale:g}" if ns.scale != 1 else ""),
        "generated_at": c.now_iso(),
        "machine": c.machine(),
        "versions": {"connector_commit": c.git_commit()},
        "parameters": {"sizes": sizes, "page": PAGE},
        "tables": [
            {
                "title": "The flush in a fresh process: peak RSS by pending keys",
                "columns": [
                    "pending keys",
                    "outbox rows",
                    "pages (bulk jobs)",
                    "peak RSS (MB)",
                    f"x the {sizes[0]:,}-key peak",
                    "wall s",
                    "flush CPU s",
                    "PostgreSQL CPU s",
                    "plan (top node)",
                ],
                "rows": rows,
                "note": (
                    f"target (issue 19): at most {TARGET_RATIO} x between the sizes; this lead"
                    f" measured {worst} x. Every key seen once, at its newest id. Not built:"
                    " fences, key_state versions, snapshot ordering and deletes are left out"
                    " (see the module docstring)."
                ),
            }
        ],
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    path = c.write_result(NAME, result, ns.out)
    print(f"worst x the anchor: {worst}; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
