"""Catching up after a restart: a backlog of several versions per key, drained by a fresh
engine, with each connector tree given (A/B in one run, alternating).

The chaos soak's connectors restart every half minute and each life starts by catching up
from the checkpoint, with the read-ahead of issue 14 (``connector/engine_read.py``). This
measures one such catch-up: a fresh embedded PostgreSQL with the demo's ``orders`` table
(``--keys`` rows, the capture trigger), ``--versions`` − 1 mass updates of every row (so the
outbox holds ``keys × versions`` events, one version of every key after another, as the soak's
mass updates write them), the CRM emulator in its own process at zero latency, then the ceiling
benchmark's child (``benchmarks.ceiling --child``, bulk pricing: 25,000-row jobs) drains it:
read from the start, read ahead, coalesce, send, acknowledge, checkpoint. A fresh engine treats
everything committed before it started as a backlog to catch up on, so the whole drain runs
with the read-ahead.

Each tree (``--trees DIR,DIR``: a checkout of the connector, e.g. a worktree of an older
commit) runs the child from its own directory, so its ``connector`` package is the one
imported; the parent, PostgreSQL and the emulator are this tree's. Trees alternate
``--rounds`` times. Reported per run: drain seconds, the child's CPU during the drain, and
PostgreSQL's CPU during it.

    .venv/bin/python -m benchmarks.catchup --trees /work/main,/tmp/old [--keys 48000]
        [--versions 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "catchup"


async def _updates(dsn: str, versions: int) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(versions - 1):
            await conn.execute("UPDATE public.orders SET quantity = quantity % 9 + 1")
        await conn.execute("VACUUM ANALYZE connector.outbox")
        cur = await conn.execute("SELECT count(*) FROM connector.outbox")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _run(tree: Path, keys: int, versions: int) -> dict[str, Any]:
    from benchmarks.ceiling import _check, _fill

    with c.postgres(NAME) as pg:
        dsn = pg.dsn()
        work = Path(tempfile.mkdtemp(prefix="bench-catchup-"))
        with c.EmulatorProcess(c.emulator_config()) as emu:
            config = asyncio.run(c.prepare_connector(dsn, emu.url, work, rows=0, snapshot="never"))
            asyncio.run(_fill(dsn, keys))
            events = asyncio.run(_updates(dsn, versions))
            argv = [sys.executable, "-m", "benchmarks.ceiling", "--child", str(config), "bulk"]
            argv += ["-", "cpu", "tuned"]
            pm = c.postmaster_pid(pg)
            pg0 = c.postgres_cpu_seconds(pm)
            log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by reap)
            started = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, **c.connector_env()},
                cwd=str(tree),
            )
            child = c.reap(proc, log, started)
            pg1 = c.postgres_cpu_seconds(pm)
            check = asyncio.run(_check(dsn))
    if child.returncode != 0:
        raise RuntimeError(f"child in {tree} exited {child.returncode}:\n{child.stderr_tail}")
    if check["synced"] != keys or check["outbox"] != events:
        raise RuntimeError(f"catch-up in {tree}: not every key acknowledged: {check}")
    return {
        "tree": str(tree),
        "events": events,
        "seconds": round(float(child.output["seconds"]), 2),
        "drain_cpu_s": round(float(child.output["drain_cpu_s"]), 2),
        "postgres_cpu_s": None if pg0 is None or pg1 is None else round(pg1 - pg0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__)
    ap.add_argument("--trees", required=True, help="connector checkouts, comma-separated")
    ap.add_argument("--keys", type=int, default=48_000)
    ap.add_argument("--versions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    ns = ap.parse_args(argv)
    trees = [Path(t).resolve() for t in ns.trees.split(",")]
    commits = {}
    for t in trees:
        out = subprocess.run(
            ["git", "-C", str(t), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        commits[str(t)] = out.stdout.strip() or "?"
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for _ in range(ns.rounds):
        for t in trees:
            runs.append(_run(t, ns.keys, ns.versions))
            print(runs[-1], flush=True)

    def med(tree: Path, field: str) -> float | None:
        vals = [r[field] for r in runs if r["tree"] == str(tree) and r[field] is not None]
        return statistics.median(vals) if vals else None

    rows = []
    base = med(trees[0], "drain_cpu_s")
    for t in trees:
        cpu = med(t, "drain_cpu_s")
        rows.append(
            [
                f"{t} ({commits[str(t)]})",
                runs[0]["events"],
                med(t, "seconds"),
                cpu,
                med(t, "postgres_cpu_s"),
                None if not base or cpu is None else round(cpu / base, 3),
            ]
        )
    result = {
        "benchmark": NAME,
        "title": "Catch-up after a restart: a backlog of several versions per key",
        "command": f"python -m benchmarks.{NAME} --keys {ns.keys} --versions {ns.versions}"
        f" --rounds {ns.rounds} --trees A,B",
        "generated_at": c.now_iso(),
        "machine": c.machine(),
        "parameters": {"keys": ns.keys, "versions": ns.versions, "rounds": ns.rounds},
        "tables": [
            {
                "title": "Medians of the rounds (trees alternating)",
                "columns": [
                    "tree (commit)",
                    "outbox events",
                    "drain s",
                    "connector CPU s",
                    "PostgreSQL CPU s",
                    "CPU x the first tree",
                ],
                "rows": rows,
            }
        ],
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    path = c.write_result(NAME, result, ns.out)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
