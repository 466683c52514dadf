"""Issue 19's two lead probes (run by ``make bench``) at a tiny size, on the suite's PostgreSQL:
their own correctness checks hold, so the figures they print compare equal work.

* ``initial_sync_sql_csv``: the CSV cells PostgreSQL builds equal the connector mapping's cells
  for every row of the demo table (a mapping change that breaks the equality fails here);
* ``interval_pg_coalesce``: the paged ``DISTINCT ON`` flush sees every key once, at its newest
  outbox id, in bulk-job-sized pages.
"""

from __future__ import annotations

import asyncio

import psycopg

from benchmarks import initial_sync_sql_csv as sql_csv
from benchmarks import interval_pg_coalesce as pg_coalesce
from connector.demo_workload import create_orders

ROWS = 3_000


def test_sql_cells_equal_the_mapping_cells_for_every_row(empty_database: str) -> None:
    asyncio.run(create_orders(empty_database, ROWS))
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        compared, sizes = sql_csv.compare(conn, sql_csv._pipeline())
    assert compared == ROWS
    assert sizes["python"] > 0 and sizes["sql"] > 0


def test_pg_coalesce_flush_sees_each_key_once_at_its_newest_version(
    empty_database: str,
) -> None:
    asyncio.run(pg_coalesce._fill(empty_database, ROWS))
    out = pg_coalesce.child(empty_database, ROWS)
    assert out["seen"] == ROWS
    assert out["older"] == 0  # every key's row came back at its second (newest) version
    assert out["jobs"] == 1  # 3,000 keys: one page of at most 25,000
