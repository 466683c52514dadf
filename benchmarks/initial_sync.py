"""Initial sync (issue 8, item 4; issue 6's memory bound): 100,000 and 1,000,000 rows.

For each size: a fresh embedded PostgreSQL with the demo's ``orders`` table filled with that
many rows, the CRM emulator in its own process (no latency, bulk jobs complete when polled), and
``connector snapshot`` run as a fresh child process: the real ``Runtime`` in snapshot mode
(keyset chunks of 25,000 rows → outbox → reader → coalescer → one Bulk Write job per chunk →
``key_state``), until every row is acknowledged. The parent takes the child's own CPU seconds
and peak RSS (``os.wait4``: ``ru_maxrss`` of that child only; the emulator and PostgreSQL are
other processes and are reported separately).

Engine options: ``bulk_poll_initial = 0.1 s`` (the default 2 s first poll would add 2 s of idle
per 25,000-row chunk against an emulator that answers at once). Everything else is the default.

``python -m benchmarks initial_sync [--scale S] [--sizes 100000,1000000] [--profile FILE]``
(``--profile``: the child under cProfile with a CPU timer, stats in ``FILE.<rows>.pstats``;
its rows/s and CPU are then the profiled ones, not for comparison.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "initial_sync"
SIZES = (100_000, 1_000_000)
ENGINE_OPTIONS = {"bulk_poll_initial": 0.1, "bulk_poll_max": 1.0}
PROFILE_ENV = "INITIAL_SYNC_PROFILE"


# --------------------------------------------------------------------------------------------
# the child: the connector's snapshot, nothing else in the process


async def _child(config: Path) -> dict[str, Any]:
    from connector.runtime import Runtime

    settings, secrets = c.load_config(config)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    runtime = Runtime(
        settings,
        secrets,
        mode="snapshot",
        serve_http=False,
        handle_signals=False,
        snapshot_progress=False,
        engine_options=ENGINE_OPTIONS,
    )
    rc = await runtime.run()
    return {
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "rss_after_imports_mib": ru0.ru_maxrss / 1024,
        "cpu_before_run_s": ru0.ru_utime + ru0.ru_stime,
    }


# --------------------------------------------------------------------------------------------
# the parent


async def _check(dsn: str) -> dict[str, Any]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM connector.key_state WHERE pipeline = 'orders'"
            "        AND status = 'synced'),"
            "       (SELECT count(*) FROM connector.dead_letters WHERE pipeline = 'orders'),"
            "       (SELECT status FROM connector.snapshots WHERE pipeline = 'orders'),"
            "       (SELECT count(*) FROM connector.bulk_jobs)"
        )
        row = await cur.fetchone()
    assert row is not None
    return {"synced": row[0], "dead_letters": row[1], "status": row[2], "bulk_jobs": row[3]}


def run_size(rows: int, profile: Path | None = None) -> dict[str, Any]:
    with c.postgres(f"sync{rows}") as pg:
        dsn = pg.dsn()
        work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
        with c.EmulatorProcess(c.emulator_config()) as emu:
            t_fill = time.perf_counter()
            config = asyncio.run(c.prepare_connector(dsn, emu.url, work, rows=rows))
            fill_s = time.perf_counter() - t_fill
            pg_cpu0 = c.postgres_cpu_seconds(c.postmaster_pid(pg))
            env = c.connector_env()
            if profile is not None:
                env[PROFILE_ENV] = str(profile.with_suffix(f".{rows}.pstats"))
            child = c.run_child(
                [sys.executable, "-m", "benchmarks.initial_sync", "--child", str(config)], env
            )
            pg_cpu1 = c.postgres_cpu_seconds(c.postmaster_pid(pg))
            usage = emu.usage()
            check = asyncio.run(_check(dsn))
        assert emu.result is not None
        version = c.pg_version(dsn)
    if child.output.get("rc") != 0:
        raise RuntimeError(f"snapshot child failed: {child.output}\n{child.stderr_tail}")
    if check["synced"] != rows or check["status"] != "done":
        raise RuntimeError(f"snapshot incomplete: {check}")
    secs = float(child.output["seconds"])
    by_api = usage.get("by_api", {})
    return {
        "rows": rows,
        "seconds": round(secs, 2),
        "rows_per_s": round(rows / secs),
        "connector_cpu_s": round(child.cpu_s, 2),
        "connector_cpu_user_s": round(child.cpu_user_s, 2),
        "connector_cpu_sys_s": round(child.cpu_sys_s, 2),
        "connector_cpu_us_per_row": round(child.cpu_s / rows * 1e6, 1),
        "connector_peak_rss_mib": round(child.max_rss_mib, 1),
        "rss_after_imports_mib": round(float(child.output["rss_after_imports_mib"]), 1),
        "child_wall_s": round(child.wall_s, 2),
        "emulator_cpu_s": round(emu.result.cpu_s, 2),
        "emulator_peak_rss_mib": round(emu.result.max_rss_mib, 1),
        "postgres_cpu_s": (
            round(pg_cpu1 - pg_cpu0, 2) if pg_cpu0 is not None and pg_cpu1 is not None else None
        ),
        "bulk_jobs": check["bulk_jobs"],
        "credits": sum(int(v.get("credits", 0)) for v in by_api.values()),
        "dead_letters": check["dead_letters"],
        "table_fill_s": round(fill_s, 1),
        "postgresql": version,
    }


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        profile = os.environ.get(PROFILE_ENV)
        if not profile:
            c.child_report(asyncio.run(_child(Path(args_in[1]))))
            return 0
        import cProfile

        prof = cProfile.Profile(time.process_time)  # the connector's CPU only, no idle wait
        doc = prof.runcall(asyncio.run, _child(Path(args_in[1])))
        prof.dump_stats(profile)
        c.child_report(doc)
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks initial_sync", description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply both table sizes")
    ap.add_argument("--sizes", help="comma-separated row counts (overrides --scale)")
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    ap.add_argument(
        "--profile",
        type=Path,
        help="run the child under cProfile (CPU timer) and write PROFILE.<rows>.pstats",
    )
    args, _unknown = ap.parse_known_args(args_in)
    sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else [c.scaled(n, args.scale, 1000) for n in SIZES]
    )
    t0 = time.perf_counter()
    runs = []
    for rows in sizes:
        print(f"initial sync of {rows:,} rows …", flush=True)
        r = run_size(rows, args.profile)
        print(
            f"  {r['rows_per_s']:,} rows/s, {r['seconds']} s, connector CPU "
            f"{r['connector_cpu_s']} s, peak RSS {r['connector_peak_rss_mib']} MiB",
            flush=True,
        )
        runs.append(r)
    pg_version = runs[0].pop("postgresql")
    for r in runs[1:]:
        r.pop("postgresql")
    small, large = runs[0], runs[-1]
    ratio = round(large["connector_peak_rss_mib"] / small["connector_peak_rss_mib"], 3)
    argv_shown = [f"--sizes {args.sizes}"] if args.sizes else []
    argv_shown += [f"--scale {args.scale:g}"] if args.scale != 1 and not args.sizes else []
    result: dict[str, Any] = {
        "benchmark": NAME,
        "title": "Initial sync: rows/s, connector CPU (emulator excluded), peak RSS",
        "command": c.command(NAME, argv_shown),
        "generated_at": c.now_iso(),
        "machine": c.machine(),
        "versions": c.versions(pg_version),
        "parameters": {
            "sizes": sizes,
            "chunk_rows": 25_000,
            "engine_options": ENGINE_OPTIONS,
            "emulator": "own process, latency 0, bulk jobs complete when polled",
            "postgres": "embedded 16, fsync off, synchronous_commit off",
            "connector": "fresh child process per size: Runtime(mode='snapshot')",
        },
        "runs": runs,
        "peak_rss_ratio_large_over_small": ratio,
        "peak_rss_within_1_5x": ratio <= 1.5,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    cols = [
        "rows",
        "seconds",
        "rows/s",
        "connector CPU s",
        "CPU µs/row",
        "peak RSS MiB",
        "RSS after imports MiB",
        "emulator CPU s",
        "PostgreSQL CPU s",
        "bulk jobs",
        "credits",
    ]
    result["tables"] = [
        {
            "title": "Initial sync, one fresh connector process per size",
            "columns": cols,
            "rows": [
                [
                    r["rows"],
                    r["seconds"],
                    r["rows_per_s"],
                    r["connector_cpu_s"],
                    r["connector_cpu_us_per_row"],
                    r["connector_peak_rss_mib"],
                    r["rss_after_imports_mib"],
                    r["emulator_cpu_s"],
                    r["postgres_cpu_s"],
                    r["bulk_jobs"],
                    r["credits"],
                ]
                for r in runs
            ],
            "note": (
                f"Peak RSS {large['rows']:,} rows / {small['rows']:,} rows = {ratio} "
                f"(bound: 1.5, {'met' if ratio <= 1.5 else 'NOT met'}). Connector CPU is the "
                "child's own user+system time (os.wait4), the emulator's and PostgreSQL's are "
                "separate columns."
            ),
        }
    ]
    c.write_result(NAME, result, args.out)
    print(f"peak RSS ratio {ratio}; wall {result['wall_seconds']} s")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
