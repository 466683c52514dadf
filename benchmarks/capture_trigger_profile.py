"""Where the capture trigger's cost is: server CPU per UPDATE for variants of the trigger function.

One connection runs UPDATEs (single-row, or ``--rows-per-statement`` consecutive rows) on the
10,000-row orders table of ``capture_trigger.py``; between samples the row trigger is pointed at
one of these functions, and the backend's CPU time is read from ``/proc/<pid>/schedstat``
(Linux) around each sample, so the figure is the server's own work, not the client's or the
machine's load (docs/capture.md, "Cost on the legacy write path"):

* ``none``: no trigger;
* ``empty``: a PL/pgSQL ``SECURITY DEFINER`` function that returns at once;
* ``insert``: ``nextval`` + ``INSERT`` of an outbox row without image;
* ``insert_image``: the same with the ``to_jsonb(NEW)`` image;
* ``installed``: the function ``connector init`` installs (connector/capture/triggers.py).

``--primary-key-only`` drops the outbox's four secondary indexes first (a throwaway cluster).

    .venv/bin/python benchmarks/capture_trigger_profile.py [--rows-per-statement 1]
        [--statements 2000] [--samples 5] [--primary-key-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import capture_trigger as tb
from connector.capture import triggers
from connector.pgembed import EmbeddedPostgres

SCHEMA = tb.SCHEMA
SECONDARY = ("outbox_pipeline_id", "outbox_txid", "outbox_pipeline_key", "outbox_captured_at")


def _variant_body(name: str, sequence: str) -> str | None:
    """The PL/pgSQL body of a variant (None: the installed function)."""
    insert = (
        "DECLARE v_id bigint; BEGIN"
        f" v_id := pg_catalog.nextval({sql.Literal(sequence).as_string(None)}::regclass);"
        f" INSERT INTO {sql.Identifier(SCHEMA, 'outbox').as_string(None)}"
        " (id, pipeline, op, key, version, row)"
        " VALUES (v_id, 'orders', 'update', NEW.id::text, v_id, {image}); RETURN NULL; END"
    )
    return {
        "none": None,
        "empty": "BEGIN RETURN NULL; END",
        "insert": insert.format(image="NULL"),
        "insert_image": insert.format(image="pg_catalog.to_jsonb(NEW)"),
        "installed": None,
    }[name]


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _sample(conn: psycopg.Connection[Any], pid: int, statements: int, rows: int) -> float:
    """Backend CPU µs per statement over ``statements`` UPDATEs."""
    start = _cpu_ns(pid)
    for i in range(statements):
        if rows == 1:
            conn.execute(
                "UPDATE orders SET amount = amount + 1, updated_at = now() WHERE id = %s",
                (1 + (i * 37) % tb.ROWS,),
                prepare=True,
            )
        else:
            first = 1 + (i * rows) % (tb.ROWS - rows)
            conn.execute(
                "UPDATE orders SET amount = amount + 1, updated_at = now()"
                " WHERE id BETWEEN %s AND %s",
                (first, first + rows - 1),
                prepare=True,
            )
    return (_cpu_ns(pid) - start) / statements / 1000


def _point(conn: psycopg.Connection[Any], name: str, body: str | None, installed: str) -> None:
    """Point the pipeline's row trigger at variant ``name``."""
    func = sql.Identifier(SCHEMA, triggers.function_name(tb.PIPELINE))
    conn.execute(
        sql.SQL("DROP TRIGGER IF EXISTS {} ON orders").format(
            sql.Identifier(triggers.trigger_name(SCHEMA, tb.PIPELINE))
        )
    )
    if name == "none":
        return
    if body is None:
        conn.execute(installed)
    else:
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql"
                " SECURITY DEFINER AS {}"
            ).format(func, sql.Literal(body))
        )
        conn.execute(sql.SQL("ALTER FUNCTION {}() RESET ALL").format(func))
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON orders"
            " FOR EACH ROW EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(triggers.trigger_name(SCHEMA, tb.PIPELINE)), func)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-per-statement", type=int, default=1)
    ap.add_argument("--statements", type=int, default=None, help="per sample (2,000 or 80)")
    ap.add_argument("--samples", type=int, default=5, help="per variant; medians")
    ap.add_argument("--primary-key-only", action="store_true")
    args = ap.parse_args()
    rows = args.rows_per_statement
    statements = args.statements or (2000 if rows == 1 else 80)
    root = Path(tempfile.mkdtemp(prefix="bench-trigger-profile-"))
    server = EmbeddedPostgres(root / "data")
    server.start()
    try:
        dsn = server.dsn()
        asyncio.run(tb._prepare(dsn))
        asyncio.run(tb._set_trigger(dsn, True))
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_get_functiondef(%s::regprocedure), pg_get_serial_sequence(%s, 'id')",
                (
                    sql.Identifier(SCHEMA, triggers.function_name(tb.PIPELINE)).as_string(conn)
                    + "()",
                    sql.Identifier(SCHEMA, "outbox").as_string(conn),
                ),
            ).fetchone()
            assert row is not None
            installed, sequence = str(row[0]), str(row[1])
            if args.primary_key_only:
                for index in SECONDARY:
                    conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(SCHEMA, index)))
            pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            names = ["none", "empty", "insert", "insert_image", "installed"]
            _sample(conn, pid, statements, rows)  # warm-up
            samples: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.samples):
                for name in names:
                    _point(conn, name, _variant_body(name, sequence), installed)
                    _sample(conn, pid, max(1, statements // 10), rows)  # plans, caches
                    samples[name].append(_sample(conn, pid, statements, rows))
        base = statistics.median(samples["none"])
        result = {
            "benchmark": "capture_trigger_profile",
            "rows_per_statement": rows,
            "statements_per_sample": statements,
            "samples": args.samples,
            "primary_key_only": args.primary_key_only,
            "backend_cpu_us_per_statement": {
                n: round(statistics.median(v), 1) for n, v in samples.items()
            },
            "cpu_ratio_none_over_variant": {
                n: round(base / statistics.median(v), 3) for n, v in samples.items()
            },
            "samples_us": {n: [round(x, 1) for x in v] for n, v in samples.items()},
        }
        print(json.dumps(result, indent=2))
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
