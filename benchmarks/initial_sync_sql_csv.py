"""Issue 19's initial-sync lead, measured before building it: the bulk CSV cells made by
PostgreSQL (``COPY (SELECT …) TO STDOUT (FORMAT csv)``) instead of by the connector in Python.

Part of ``make bench`` (registered in ``benchmarks/__main__.py``): a probe of the headroom. Both
paths read the demo's ``orders`` table (N rows, ``connector.demo_workload``) in keyset chunks of
25,000 rows, the snapshot's chunk size, and write each chunk as one deflated zip, the Bulk Write
upload:

* ``python``: what the connector does per row today, without the outbox round trip: the row
  image as ``to_jsonb(t.*)::text`` (``TimeZone = UTC``, as the trigger and snapshot pin it),
  ``outbox.load_row``, ``RecordMapper.to_csv_values`` of the demo mapping,
  ``zoho.bulk.build_bulk_zip``. Today's real path does more per row (the outbox ``COPY`` and
  its read, the coalescer, ``key_state``): this is a lower bound of its connector CPU.
* ``sql``: the cells built by one SQL expression per mapped column (below), streamed by
  ``COPY … TO STDOUT (FORMAT csv)`` into the zip as bytes; the connector only counts rows.

Before timing, every chunk of both paths is unzipped and parsed (``csv.reader``) and the cells
compared: the probe fails unless the SQL expressions produce exactly the mapping's values for
every row of the table (PostgreSQL's CSV writes ``\\n`` line ends and quotes an empty string;
both parse to the same cells).

The paths run alternately, ``--rounds`` times each; per run: wall seconds, the probe process's
own CPU (``time.process_time``) and PostgreSQL's CPU (postmaster and children, /proc).

    python -m benchmarks initial_sync_sql_csv [--rows 1000000] [--rounds 3] [--scale S]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import statistics
import time
import zipfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import _common as c

NAME = "initial_sync_sql_csv"
CHUNK = 25_000
TARGET_CPU_US = 20.0  # issue 19: <= 20 connector CPU-s per million rows

# The demo mapping's columns and CRM types (connector/demo_config.py), and the SQL that yields the
# CSV cell ``crm_values.csv_converter`` yields for a to_jsonb image of that column's value.
# The fast paths of csv_converter decide the forms: a text type's string as is; an integer's
# digits; a decimal in plain notation with its scale (numeric's own text); a date from
# 1900-01-01 as yyyy-MM-dd; an aware timestamp as yyyy-MM-ddTHH:mm:ss+HH:MM (seconds
# truncated, the session's offset: UTC); a boolean as true/false; NULL as an empty cell.
SQL_CELLS = {
    "text": "{c}",
    "email": "{c}",
    "picklist": "{c}",
    "textarea": "{c}",
    "integer": "{c}::text",
    "currency": "{c}::text",
    "date": "to_char({c}, 'YYYY-MM-DD')",
    "datetime": "to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || to_char({c}, 'TZH:TZM')",
    "boolean": "CASE WHEN {c} THEN 'true' WHEN NOT {c} THEN 'false' END",
}


def _pipeline() -> Any:
    from connector.config import parse_settings
    from connector.demo import demo_config

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover (Python < 3.11)
        import tomli as tomllib  # type: ignore[no-redef]

    text = demo_config(dsn="postgresql://unused", emulator_url="http://127.0.0.1:1", port=1)
    return parse_settings(tomllib.loads(text)).pipelines[0]


def _select_cells(pipeline: Any) -> sql.Composed:
    cells = [sql.SQL("t.{}::text").format(sql.Identifier(pipeline.key_column))]
    for column, m in pipeline.fields.items():
        if column == pipeline.key_column:
            continue
        col = sql.SQL("t.{}").format(sql.Identifier(column)).as_string(None)
        cells.append(sql.SQL(SQL_CELLS[m.type].format(c=col)))  # type: ignore[arg-type]
    return sql.SQL(", ").join(cells)


def _chunk_query(pipeline: Any, what: sql.Composable) -> sql.Composed:
    return sql.SQL(
        "SELECT {what} FROM public.orders AS t WHERE t.id > {last} ORDER BY t.id LIMIT {n}"
    ).format(what=what, last=sql.Placeholder(), n=sql.Literal(CHUNK))


def _python_chunks(conn: psycopg.Connection[Any], pipeline: Any) -> list[bytes]:
    from connector.mapping import RecordMapper
    from connector.outbox import load_row
    from connector.zoho.bulk import build_bulk_zip

    mapper = RecordMapper(pipeline)
    header = mapper.csv_header()
    query = _chunk_query(pipeline, sql.SQL("t.id, to_jsonb(t.*)::text"))
    out: list[bytes] = []
    last = 0
    while True:
        rows = conn.execute(query, (last,)).fetchall()
        if not rows:
            return out
        last = rows[-1][0]
        values = [mapper.to_csv_values(load_row(image)) for _, image in rows]
        out.append(build_bulk_zip(header, values).data)


def _sql_chunks(conn: psycopg.Connection[Any], pipeline: Any) -> list[bytes]:
    from connector.mapping import RecordMapper

    header = RecordMapper(pipeline).csv_header()
    head = io.StringIO()
    csv.writer(head, lineterminator="\r\n").writerow(header)
    head_bytes = head.getvalue().encode()
    query = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(
        _chunk_query(pipeline, _select_cells(pipeline))
    )
    out: list[bytes] = []
    last = 0
    while True:
        buf = io.BytesIO()
        rows = 0
        with (
            zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
            zf.open("orders.csv", "w", force_zip64=False) as raw,
        ):
            raw.write(head_bytes)
            # the key of a chunk's last row is the next chunk's start: from the last row's
            # first cell (a bigint: never quoted)
            tail = b""
            with conn.cursor().copy(query, (last,)) as copy:
                for data in copy:  # one CopyData message per row (protocol: COPY TO)
                    raw.write(data)
                    tail = bytes(data)
                    rows += 1
        if rows == 0:
            return out
        last = int(tail.split(b",", 1)[0])
        out.append(buf.getvalue())


def _cells(zipped: bytes) -> list[list[str]]:
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        text = zf.read(zf.namelist()[0]).decode()
    return list(csv.reader(io.StringIO(text, newline="")))


def compare(conn: psycopg.Connection[Any], pipeline: Any) -> tuple[int, dict[str, int]]:
    """Both paths over the whole table, every cell compared: (rows compared, zip bytes per
    path). ``SystemExit`` naming the first row whose cells differ."""
    py, sq = _python_chunks(conn, pipeline), _sql_chunks(conn, pipeline)
    if len(py) != len(sq):
        raise SystemExit(f"{len(py)} python chunks against {len(sq)} sql chunks")
    compared = 0
    for a, b in zip(py, sq, strict=True):
        ca, cb = _cells(a), _cells(b)
        if ca != cb:
            bad = next(i for i, (x, y) in enumerate(zip(ca, cb, strict=False)) if x != y)
            raise SystemExit(f"cells differ at row {bad}: {ca[bad]} != {cb[bad]}")
        compared += len(ca) - 1
    return compared, {"python": sum(map(len, py)), "sql": sum(map(len, sq))}


def _measure(fn: Any, conn: psycopg.Connection[Any], pipeline: Any, pm: int | None) -> Any:
    pg0, cpu0, t0 = c.postgres_cpu_seconds(pm), time.process_time(), time.perf_counter()
    chunks = fn(conn, pipeline)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pg1 = c.postgres_cpu_seconds(pm)
    pg = (pg1 - pg0) if pg0 is not None and pg1 is not None else None
    return chunks, wall, cpu, pg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.initial_sync_sql_csv", description=__doc__
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply --rows")
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    ns = ap.parse_args(argv)
    ns.rows = c.scaled(ns.rows, ns.scale, 1_000)
    pipeline = _pipeline()
    from connector.demo_workload import create_orders

    runs: dict[str, list[tuple[float, float, float | None]]] = {"python": [], "sql": []}
    with c.postgres(NAME) as server:
        dsn = server.dsn()
        asyncio.run(create_orders(dsn, ns.rows))
        pm = c.postmaster_pid(server)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            # equal cells, chunk by chunk, before anything is timed
            compared, sizes = compare(conn, pipeline)
            if compared != ns.rows:
                raise SystemExit(f"compared {compared} rows of {ns.rows}")
            for _ in range(ns.rounds):
                for name, fn in (("python", _python_chunks), ("sql", _sql_chunks)):
                    _, wall, cpu, pg = _measure(fn, conn, pipeline, pm)
                    runs[name].append((wall, cpu, pg))
                    print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s probe CPU, PostgreSQL {pg} s")

    def med(name: str, i: int) -> float | None:
        vals = [r[i] for r in runs[name] if r[i] is not None]
        return statistics.median(vals) if vals else None

    rows_table = []
    for name in ("python", "sql"):
        wall, cpu, pg = med(name, 0), med(name, 1), med(name, 2)
        assert wall is not None and cpu is not None
        rows_table.append(
            [
                name,
                ns.rows,
                round(ns.rows / wall),
                round(cpu * 1e6 / ns.rows, 2),
                None if pg is None else round(pg * 1e6 / ns.rows, 2),
                round(cpu * 1e6 / ns.rows / TARGET_CPU_US, 2),
                sizes[name],
            ]
        )
    py_cpu, sq_cpu = med("python", 1), med("sql", 1)
    assert py_cpu and sq_cpu
    result = {
        "benchmark": NAME,
        "title": "Initial sync lead: bulk CSV cells by PostgreSQL vs by the connector",
        "command": f"python -m benchmarks {NAME} --rows {ns.rows} --rounds {ns.rounds}",
        "generated_at": c.now_iso(),
        "machine": c.machine(),
        "parameters": {"rows": ns.rows, "rounds": ns.rounds, "chunk": CHUNK},
        "tables": [
            {
                "title": "Per row, medians of the rounds (every row's cells compared equal first)",
                "columns": [
                    "path",
                    "rows",
                    "rows/s",
                    "probe CPU µs/row",
                    "PostgreSQL CPU µs/row",
                    "× issue 19's 20 µs",
                    "zip bytes",
                ],
                "rows": rows_table,
                "note": (
                    f"sql / python probe CPU: ×{sq_cpu / py_cpu:.3f}. Rows read in keyset chunks"
                    f" of {CHUNK:,}; each chunk one deflated zip. The python path is a lower"
                    " bound of today's per-row connector work (no outbox, coalescer or"
                    " key_state)."
                ),
            }
        ],
        "runs": runs,
    }
    path = c.write_result(NAME, result, ns.out)
    print(f"sql / python probe CPU: ×{sq_cpu / py_cpu:.3f}; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
