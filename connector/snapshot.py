"""Initial sync: the legacy table, read in keyset-ordered chunks, written into the outbox.

Each chunk is read in its own REPEATABLE READ transaction on the source database through a
server-side cursor (``WHERE key > cursor ORDER BY key LIMIT chunk_size``). Its rows go into the
outbox as ``op = 'snapshot'`` events, with ``id = version = nextval(outbox sequence)`` like the
capture trigger, and ``chunk_id`` pointing at a ``snapshot_chunks`` row that holds the
``pg_current_snapshot()`` of the reading transaction. The chunk's rows, its chunk row and the
advanced cursor in ``snapshots`` are committed in one state transaction: a crash loses at most
the chunk being read, and a restart resumes after the last committed chunk.

Ordering against live changes needs no watermark writes (docs/snapshot.md): a live event whose
transaction is visible in the chunk's snapshot is older than the chunk's row, any other live
event is newer (``events.EventStamp.newer_than``). Capture must therefore be installed before
the first chunk's snapshot is taken; ``prepare`` refuses otherwise.

The chunks then flow through the same coalescer / planner / emitter as live changes; the engine
(``connector.engine``) runs the snapshotter and hands it a ``chunk_sent`` hook that returns
when the chunk's events are acknowledged or dead-lettered, so chunks are sent one at a time and
a backlog of 25,000 rows goes as one Bulk Write job.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import sql

from connector import state
from connector.capture import pin_image_settings
from connector.config import PipelineConfig
from connector.errors import PermanentError
from connector.metrics import Metrics

log = logging.getLogger(__name__)

FETCH_SIZE = 5_000

Q_CAPTURE_STATE = """
SELECT mode FROM {schema}.capture_state WHERE pipeline = %s
"""

Q_OUTBOX_SEQUENCE = "SELECT pg_catalog.pg_get_serial_sequence(%s, 'id')"

Q_LOCK_SNAPSHOT = """
SELECT chunks_done, status FROM {schema}.snapshots WHERE pipeline = %s FOR UPDATE
"""

# One outbox row per source row; id = version drawn from the outbox sequence (as the trigger
# does), source_xid = the chunk snapshot's xmax (an xid no live event visible in the chunk can
# have), txid = this writer's transaction (the column's default; gap-free reading). The ids are
# drawn first (one statement, returned with the writer's xid), then the rows go in by COPY
# (issue 19: an INSERT ... unnest(%s::text[]) had psycopg quote every row image into an array
# literal in Python, regex work per double quote, the top item of the snapshot's profile; and
# the chunk's max(id) was looked up by ``chunk_id``, which no index covers).
Q_DRAW_IDS = """
SELECT pg_catalog.nextval({seq}::regclass), pg_current_xact_id()::text
  FROM generate_series(1, %s)
"""

Q_COPY_CHUNK = """
COPY {schema}.outbox (id, pipeline, op, key, version, source_xid, chunk_id, row) FROM STDIN
"""

Q_ESTIMATE = """
SELECT greatest(c.reltuples, 0)::bigint FROM pg_catalog.pg_class c
 WHERE c.oid = %s::regclass
"""

# rows whose key is NULL cannot be identified in the CRM: like capture (both modes), the
# initial sync contains them as MISSING_KEY dead letters, once (a resumed or restarted sync
# does not add a second open letter for the same row image)
Q_MISSING_KEY_LETTERS = """
INSERT INTO {schema}.dead_letters (pipeline, key, version, payload, error_code, error_field,
    error_message)
SELECT %s, '', nextval({seq}::regclass), r.payload, 'MISSING_KEY', %s, %s
  FROM unnest(%s::jsonb[]) AS r(payload)
 WHERE NOT EXISTS (
    SELECT 1 FROM {schema}.dead_letters d
     WHERE d.pipeline = %s AND d.status = 'open' AND d.error_code = 'MISSING_KEY'
       AND d.key = '' AND d.payload = r.payload)
"""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk written into the outbox."""

    id: int
    chunk_no: int
    rows: int
    first_key: Any
    last_key: Any
    snapshot: str
    max_outbox_id: int
    txid: int


ChunkHook = Callable[[Chunk], Awaitable[None]]


class SnapshotProgress:
    """Progress output: a rich progress bar on a terminal, one log line per chunk otherwise."""

    def __init__(self, pipeline: str, *, terminal: bool | None = None) -> None:
        self.pipeline = pipeline
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._progress: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def start(self, done: int, total: int | None) -> None:
        self._started = time.monotonic()
        if not self.terminal:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeRemainingColumn(),
            TextColumn("credits {task.fields[credits]}"),
            console=Console(stderr=True),
        )
        self._progress.start()
        self._task = self._progress.add_task(
            f"snapshot {self.pipeline}", total=total or None, completed=done, rate="-", credits=0
        )

    def chunk(self, chunk: Chunk, done: int, total: int | None, credits: int) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = done / elapsed
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=done,
                total=max(total or 0, done) or None,
                rate=f"{rate:,.0f}",
                credits=credits,
            )
            return
        eta = (max((total or 0) - done, 0) / rate) if rate > 0 and total else None
        log.info(
            "snapshot chunk",
            extra={
                "pipeline": self.pipeline,
                "chunk": chunk.chunk_no,
                "chunk_rows": chunk.rows,
                "rows_done": done,
                "rows_estimated": total,
                "rows_per_second": round(rate, 1),
                "eta_seconds": None if eta is None else round(eta, 1),
                "credits": credits,
            },
        )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Snapshotter:
    """Reads one pipeline's legacy table into the outbox, chunk by chunk, resumably.

    ``source_dsn``: the legacy database; ``state_dsn``: the connector's state database (the
    same one in trigger mode).
    """

    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        source_dsn: str,
        state_dsn: str,
        schema: str = "connector",
        chunk_size: int | None = None,
        metrics: Metrics | None = None,
        progress: SnapshotProgress | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.source_dsn = source_dsn
        self.state_dsn = state_dsn
        self.schema = schema
        self.chunk_size = chunk_size or pipeline.snapshot_chunk_size
        self.metrics = metrics
        self.progress = progress
        self._started = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------
    async def status(self) -> state.SnapshotRow | None:
        async with await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=True) as c:
            return await state.get_snapshot(c, self.schema, self.pipeline.name)

    async def prepare(self, *, restart: bool = False) -> state.SnapshotRow:
        """Start a snapshot (or resume the running one). ``restart`` starts over even when a
        snapshot is running or done. Refuses when capture is not installed."""
        async with await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=True) as c:
            cur = await c.execute(_q(Q_CAPTURE_STATE, self.schema), (self.pipeline.name,))
            row = await cur.fetchone()
            if row is None:
                raise PermanentError(
                    f"pipeline {self.pipeline.name!r}: capture is not installed; run "
                    "`connector init` first (a snapshot needs capture running before its "
                    "first chunk is read)"
                )
            if self.pipeline.capture == "triggers":
                from connector.capture import triggers

                async with await psycopg.AsyncConnection.connect(
                    self.source_dsn, autocommit=True
                ) as src:
                    if not await triggers.is_installed(src, self.schema, self.pipeline):
                        raise PermanentError(
                            f"pipeline {self.pipeline.name!r}: the capture trigger is missing "
                            "or disabled; run `connector init`"
                        )
            current = await state.get_snapshot(c, self.schema, self.pipeline.name)
            if restart or current is None or current.status == "failed":
                estimate = await self._estimate()
                async with c.transaction():
                    await state.start_snapshot(c, self.schema, self.pipeline.name, estimate)
                current = await state.get_snapshot(c, self.schema, self.pipeline.name)
            assert current is not None
            return current

    async def run(
        self, stop: asyncio.Event | None = None, *, chunk_sent: ChunkHook | None = None
    ) -> state.SnapshotRow:
        """Write the remaining chunks. After each chunk, awaits ``chunk_sent(chunk)`` (the
        engine returns once the chunk's events are resolved). Returns the snapshots row; its
        status stays 'running' until ``finish`` (the engine calls it after the last chunk is
        resolved) or when stopped early."""
        current = await self.prepare()
        if current.status == "done":
            return current
        done = current.rows_read
        total = current.estimated_rows
        self._started = time.monotonic()
        if self.progress is not None:
            self.progress.start(done, total)
        try:
            while stop is None or not stop.is_set():
                chunk = await self.read_chunk()
                if chunk is None:
                    break
                done += chunk.rows
                if self.metrics is not None:
                    self.metrics.snapshot_rows_total.labels(pipeline=self.pipeline.name).inc(
                        chunk.rows
                    )
                    if total:
                        self.metrics.snapshot_progress_ratio.labels(
                            pipeline=self.pipeline.name
                        ).set(min(done / max(total, done), 1.0))
                if chunk_sent is not None:
                    await chunk_sent(chunk)
                if self.progress is not None:
                    self.progress.chunk(chunk, done, total, await self.credits_spent())
        finally:
            if self.progress is not None:
                self.progress.stop()
        row = await self.status()
        assert row is not None
        return row

    async def read_chunk(self) -> Chunk | None:
        """Read the next chunk and commit it into the outbox; None when the table is exhausted
        (or the snapshot is not running)."""
        p = self.pipeline
        key = sql.Identifier(p.key_column)
        table = sql.Identifier(*p.table_parts)
        async with (
            await psycopg.AsyncConnection.connect(self.source_dsn) as src,
            await psycopg.AsyncConnection.connect(self.state_dsn) as st,
        ):
            # state first: lock the snapshots row, so two snapshotters cannot interleave
            cur = await st.execute(_q(Q_LOCK_SNAPSHOT, self.schema), (p.name,))
            lock = await cur.fetchone()
            if lock is None or lock[1] != "running":
                await st.rollback()
                return None
            chunks_done = int(lock[0])
            snap_row = await state.get_snapshot(st, self.schema, p.name)
            assert snap_row is not None
            cursor_value = _key_param(snap_row.cursor)

            await src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await pin_image_settings(src)
            cur = await src.execute(
                "SELECT pg_current_snapshot()::text, pg_snapshot_xmax(pg_current_snapshot())::text"
            )
            srow = await cur.fetchone()
            assert srow is not None
            snapshot_text, xmax = str(srow[0]), str(srow[1])
            # the rows in the table when the first chunk is read, and no later ones: a row
            # inserted since is captured live, and reading it again would never end while
            # inserts go on at growing keys (migration 13). A snapshot started before that
            # migration has no bound (``upper_known`` false), as then.
            bounded = snap_row.upper_known
            upper_value = _key_param(snap_row.upper_key)
            if cursor_value is None:
                ucur = await src.execute(  # ORDER BY as the chunks (max() lacks some types)
                    sql.SQL(
                        "SELECT to_jsonb(t.{key})::text FROM {table} AS t"
                        " WHERE t.{key} IS NOT NULL ORDER BY t.{key} DESC LIMIT 1"
                    ).format(key=key, table=table)
                )
                urow = await ucur.fetchone()
                upper_json = urow[0] if urow is not None else None
                upper = orjson.loads(upper_json) if upper_json is not None else None
                await state.set_snapshot_upper(st, self.schema, p.name, upper)
            where: sql.Composable
            if cursor_value is None:
                where = sql.SQL("WHERE t.{} IS NOT NULL").format(key)
            elif bounded and upper_value is None:  # no keyed row at the start: nothing more
                where = sql.SQL("WHERE false")
            elif bounded:
                where = sql.SQL("WHERE t.{key} > %s AND t.{key} <= %s").format(key=key)
            else:
                where = sql.SQL("WHERE t.{} > %s").format(key)
            keyless: list[str] = []
            if cursor_value is None:  # the first chunk, in its snapshot: rows without a key
                kcur = await src.execute(
                    sql.SQL(
                        "SELECT to_jsonb(t.*)::text FROM {table} AS t WHERE t.{key} IS NULL"
                    ).format(table=table, key=key)
                )
                keyless = [str(r[0]) for r in await kcur.fetchall()]
            query = sql.SQL(
                "SELECT t.{key}::text, to_jsonb(t.*)::text, to_jsonb(t.{key})::text"
                " FROM {table} AS t {where} ORDER BY t.{key} LIMIT %s"
            ).format(key=key, table=table, where=where)
            params: tuple[Any, ...] = (
                (self.chunk_size,)
                if cursor_value is None or (bounded and upper_value is None)
                else (cursor_value, upper_value, self.chunk_size)
                if bounded
                else (cursor_value, self.chunk_size)
            )
            keys: list[str] = []
            rows: list[str] = []
            first_json: str | None = None
            last_json: str | None = None
            async with src.cursor(name=f"snapshot_{p.name}") as scur:
                scur.itersize = FETCH_SIZE
                await scur.execute(query, params)
                async for k, image, kjson in scur:
                    keys.append(k)
                    rows.append(image)
                    if first_json is None:
                        first_json = kjson
                    last_json = kjson
            await src.commit()

            if keyless:
                await self._missing_key_letters(st, keyless)
            if not keys:
                if keyless:
                    await st.commit()
                else:
                    await st.rollback()
                return None
            first_key = orjson.loads(first_json) if first_json else None
            last_key = orjson.loads(last_json) if last_json else None
            chunk_no = await state.next_chunk_no(st, self.schema, p.name)
            chunk_row = await state.insert_chunk(
                st,
                self.schema,
                p.name,
                chunk_no=chunk_no,
                first_key=first_key,
                last_key=last_key,
                rows=len(keys),
                snapshot=snapshot_text,
            )
            max_id, txid = await self._write_rows(st, chunk_row.id, keys, rows, xmax)
            await state.snapshot_progress(
                st,
                self.schema,
                p.name,
                cursor=last_key,
                rows=len(keys),
                estimated=chunks_done * self.chunk_size + len(keys),
            )
            await st.commit()
        chunk = Chunk(
            id=chunk_row.id,
            chunk_no=chunk_no,
            rows=len(keys),
            first_key=first_key,
            last_key=last_key,
            snapshot=snapshot_text,
            max_outbox_id=max_id,
            txid=txid,
        )
        log.debug(
            "snapshot chunk written",
            extra={"pipeline": p.name, "chunk": chunk.chunk_no, "rows": chunk.rows},
        )
        return chunk

    async def finish(self) -> dict[str, Any]:
        """Mark the snapshot done and store its report (counts gathered while sending)."""
        async with await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=True) as c:
            row = await state.get_snapshot(c, self.schema, self.pipeline.name)
            if row is None:
                raise PermanentError(f"pipeline {self.pipeline.name!r} has no snapshot")
            counts = dict(row.report or {})
            credits = await self.credits_spent(c)
            from datetime import UTC, datetime

            duration = (datetime.now(UTC) - row.started_at).total_seconds()
            report = {
                "rows_read": row.rows_read,
                "chunks": row.chunks_done,
                "sent": int(counts.get("sent", 0)),
                "added": int(counts.get("added", 0)),
                "updated": int(counts.get("updated", 0)),
                "skipped": int(counts.get("skipped", 0)),
                "credits": credits,
                "duration_seconds": round(duration, 3),
            }
            await state.finish_snapshot(c, self.schema, self.pipeline.name, "done", report)
        if self.metrics is not None:
            self.metrics.snapshot_progress_ratio.labels(pipeline=self.pipeline.name).set(1.0)
        log.info("snapshot done", extra={"pipeline": self.pipeline.name, **report})
        return report

    async def credits_spent(self, conn: psycopg.AsyncConnection[Any] | None = None) -> int:
        """Credits this pipeline spent since the snapshot started."""
        if conn is None:
            async with await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=True) as c:
                return await self.credits_spent(c)
        row = await state.get_snapshot(conn, self.schema, self.pipeline.name)
        if row is None:
            return 0
        return await state.credits_since(conn, self.schema, row.started_at, self.pipeline.name)

    # -- internals ------------------------------------------------------------------------
    async def _estimate(self) -> int | None:
        async with await psycopg.AsyncConnection.connect(self.source_dsn, autocommit=True) as c:
            cur = await c.execute(
                Q_ESTIMATE, (sql.Identifier(*self.pipeline.table_parts).as_string(c),)
            )
            row = await cur.fetchone()
            if row is None or row[0] is None or int(row[0]) <= 0:
                # never analysed: count (the table is read in full anyway)
                cur = await c.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(
                        sql.Identifier(*self.pipeline.table_parts)
                    )
                )
                row = await cur.fetchone()
            return None if row is None else int(row[0])

    async def _write_rows(
        self,
        st: psycopg.AsyncConnection[Any],
        chunk_id: int,
        keys: list[str],
        rows: list[str],
        xmax: str,
    ) -> tuple[int, int]:
        """The chunk's outbox rows, in key order with ascending ids; returns (the highest id,
        the writer's xid)."""
        seq = await self._sequence(st)
        cur = await st.execute(sql.SQL(Q_DRAW_IDS).format(seq=seq), (len(keys),), binary=True)
        drawn = await cur.fetchall()
        ids = sorted(int(r[0]) for r in drawn)  # ascending: the i-th key gets the i-th id
        txid = int(drawn[0][1])
        name = self.pipeline.name
        async with st.cursor().copy(_q(Q_COPY_CHUNK, self.schema)) as copy:
            for i, k, r in zip(ids, keys, rows, strict=True):
                await copy.write_row((i, name, "snapshot", k, i, xmax, chunk_id, r))
        return ids[-1], txid

    async def _missing_key_letters(self, st: psycopg.AsyncConnection[Any], rows: list[str]) -> None:
        from connector.capture.triggers import missing_key_message

        p = self.pipeline
        seq = await self._sequence(st)
        await st.execute(
            sql.SQL(Q_MISSING_KEY_LETTERS).format(schema=sql.Identifier(self.schema), seq=seq),
            (p.name, p.key_field, missing_key_message(p), rows, p.name),
        )
        log.warning(
            "rows without a key dead-lettered",
            extra={"pipeline": p.name, "rows": len(rows), "code": "MISSING_KEY"},
        )

    async def _sequence(self, conn: psycopg.AsyncConnection[Any]) -> sql.Literal:
        cur = await conn.execute(
            Q_OUTBOX_SEQUENCE, (sql.Identifier(self.schema, "outbox").as_string(conn),)
        )
        row = await cur.fetchone()
        if row is None or row[0] is None:
            raise PermanentError(f"state schema {self.schema!r} has no outbox sequence")
        return sql.Literal(str(row[0]))


def _q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(schema=sql.Identifier(schema))


def _key_param(cursor: Any) -> Any:
    """The stored cursor (a JSON value) as a query parameter for ``key > %s``."""
    if cursor is None:
        return None
    if isinstance(cursor, float):
        return Decimal(repr(cursor))
    if isinstance(cursor, str | int | Decimal):
        return cursor
    # composite or other JSON values: compare as text
    return orjson.dumps(cursor).decode()
