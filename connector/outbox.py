"""The outbox: gap-free reading, checkpoints, retention, replay, lag.

Gap-free reading (docs/architecture.md, "Gap-free reading"). A position is
``(last_id, pending_txids)``: every outbox row with ``id <= last_id`` has been delivered except
those written by a *pending* transaction. ``pending_txids`` is the set of transactions that
were not visible in the snapshot *S* the position was taken in, written compactly as
``sorted(pg_snapshot_xip(S)) + [pg_snapshot_xmax(S)]``: the listed xids, **and every xid from
the last element (the snapshot's xmax) up**. Transactions that are still running but whose xid
is ``>= xmax(S)`` are not listed in ``xip(S)`` (PostgreSQL leaves them out), and such a
transaction can have drawn an outbox id below rows visible in *S*; the open-ended tail keeps
them pending.

One read, in a REPEATABLE READ READ ONLY transaction:

1. ``S = pg_current_snapshot()``;
2. late rows: ``id <= last_id AND (txid = ANY(listed) OR txid >= horizon)`` (index on ``txid``:
   the cost is the rows of the listed transactions plus the rows written since the previous
   read, however long a transaction stays open);
3. new rows: ``id > last_id ORDER BY id LIMIT n``;
4. new position: ``last_id' = max id delivered`` (or ``last_id``), pending' = invisible(S).

A row with ``id <= last_id'`` that *S* does not see belongs, by definition of visibility, to a
transaction in ``xip(S)`` or with xid ``>= xmax(S)`` (or it rolled back): no assumption about
when ids are drawn is needed. Rolled-back transactions drop out on the next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads

from connector.capture.triggers import notify_channel
from connector.config import PipelineConfig
from connector.events import ChangeEvent, Op, SnapshotVisibility

log = logging.getLogger(__name__)

PRUNE_BATCH = 10_000


def _parse_int(text: str) -> int | decimal.Decimal:
    # Python refuses to read an int of more than sys.get_int_max_str_digits() (4300) digits;
    # a numeric column holds up to 131072: such a value stays exact as a Decimal
    return int(text) if len(text) <= 4000 else decimal.Decimal(text)


def load_row(data: str | bytes) -> Any:
    """Parse a row image: JSON with every non-integer number as a ``Decimal`` (never a float),
    integers exact whatever their size (lossless, issue 14 §4)."""
    return json.loads(data, parse_float=decimal.Decimal, parse_int=_parse_int)


@dataclass(frozen=True)
class ReadPosition:
    """Where a reader stands. ``pending_txids`` is sorted; its last element (the snapshot's
    xmax) also stands for every larger xid. ``ReadPosition(0, ())`` is the start of the log."""

    last_id: int
    pending_txids: tuple[int, ...]

    @property
    def horizon(self) -> int | None:
        """The xmax of the snapshot the position was taken in (None at the start)."""
        return self.pending_txids[-1] if self.pending_txids else None

    def is_pending(self, txid: int) -> bool:
        if not self.pending_txids:
            return False
        return txid >= self.pending_txids[-1] or txid in self.pending_txids

    def passed(self, offset: int, txid: int) -> bool:
        """True when the outbox row (offset, txid) is behind this position (delivered)."""
        return offset <= self.last_id and not self.is_pending(txid)

    def not_behind(self, other: ReadPosition) -> bool:
        """True when this position is the same as or later than ``other``."""
        if self.last_id != other.last_id:
            return self.last_id > other.last_id
        return (self.horizon or 0) >= (other.horizon or 0)


START = ReadPosition(0, ())

_COLUMNS = sql.SQL(
    "o.id, o.pipeline, o.op, o.key, o.version, o.source_xid::text, o.row, o.captured_at,"
    " c.snapshot::text"
)


def late_rows_query(schema: str) -> sql.Composed:
    """Rows at or below ``last_id`` of pending transactions.
    Parameters: pipeline, last_id, listed xids (text[]), horizon (text)."""
    return sql.SQL(
        "SELECT {cols} FROM {outbox} o LEFT JOIN {chunks} c ON c.id = o.chunk_id"
        " WHERE o.pipeline = %s AND o.id <= %s"
        " AND (o.txid = ANY(%s::text[]::xid8[]) OR o.txid >= %s::text::xid8)"
        " ORDER BY o.id"
    ).format(
        cols=_COLUMNS,
        outbox=sql.Identifier(schema, "outbox"),
        chunks=sql.Identifier(schema, "snapshot_chunks"),
    )


def new_rows_query(schema: str) -> sql.Composed:
    """Rows above ``last_id``. Parameters: pipeline, last_id, limit."""
    return sql.SQL(
        "SELECT {cols} FROM {outbox} o LEFT JOIN {chunks} c ON c.id = o.chunk_id"
        " WHERE o.pipeline = %s AND o.id > %s ORDER BY o.id LIMIT %s"
    ).format(
        cols=_COLUMNS,
        outbox=sql.Identifier(schema, "outbox"),
        chunks=sql.Identifier(schema, "snapshot_chunks"),
    )


def _event(r: Sequence[Any]) -> ChangeEvent:
    return ChangeEvent(
        offset=int(r[0]),
        pipeline=str(r[1]),
        op=Op(r[2]),
        key=str(r[3]),
        version=int(r[4]),
        source_xid=int(r[5]),
        row=r[6],
        captured_at=r[7],
        snapshot=SnapshotVisibility.parse(r[8]) if r[8] is not None else None,
    )


def _name(pipeline: str | PipelineConfig) -> str:
    return pipeline if isinstance(pipeline, str) else pipeline.name


def _cursor(conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncCursor[tuple[Any, ...]]:
    cur = conn.cursor(row_factory=tuple_row)
    set_json_loads(load_row, cur)
    return cur


def _pending_params(position: ReadPosition) -> tuple[list[str], str]:
    listed = [str(x) for x in position.pending_txids[:-1]]
    return listed, str(position.pending_txids[-1])


async def read_batch(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    position: ReadPosition,
    limit: int = 5000,
) -> tuple[list[ChangeEvent], ReadPosition]:
    """Read the events after ``position``: late rows of pending transactions that have committed
    since, then up to ``limit`` new rows by id. Returns the events (late ones first, each group
    by id) and the new position. ``conn`` must not be inside a transaction.

    Late rows are not bounded by ``limit``: a transaction that wrote N rows and committed after
    later offsets were read yields its N events in one batch.
    """
    pipeline = _name(pipeline)
    async with conn.transaction():
        cur = _cursor(conn)
        await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        await cur.execute("SELECT pg_current_snapshot()::text")
        snap_row = await cur.fetchone()
        assert snap_row is not None
        snap = SnapshotVisibility.parse(snap_row[0])
        events: list[ChangeEvent] = []
        if position.pending_txids and position.last_id > 0:
            listed, horizon = _pending_params(position)
            await cur.execute(
                late_rows_query(schema), (pipeline, position.last_id, listed, horizon)
            )
            events.extend(_event(r) for r in await cur.fetchall())
        await cur.execute(new_rows_query(schema), (pipeline, position.last_id, limit))
        new = [_event(r) for r in await cur.fetchall()]
        events.extend(new)
    last_id = new[-1].offset if new else position.last_id
    pending = (*sorted(snap.xip), snap.xmax)
    return events, ReadPosition(last_id, pending)


async def load_checkpoint(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> ReadPosition:
    """The saved position of ``pipeline`` (the start of the log when none is saved)."""
    pipeline = _name(pipeline)
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL("SELECT last_id, pending_txids::text[] FROM {} WHERE pipeline = %s").format(
            sql.Identifier(schema, "checkpoints")
        ),
        (pipeline,),
    )
    row = await cur.fetchone()
    if row is None:
        return START
    return ReadPosition(int(row[0]), tuple(sorted(int(x) for x in row[1])))


async def save_checkpoint(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    position: ReadPosition,
    events_passed: int = 0,
) -> None:
    """Store ``position`` unless the stored one is already later (checkpoints only move
    forward: by ``last_id``, then by the snapshot horizon). ``events_passed`` is added to the
    pipeline's counter when the position is stored."""
    pipeline = _name(pipeline)
    pending = [str(x) for x in sorted(position.pending_txids)]
    await conn.execute(
        sql.SQL(
            "INSERT INTO {cp} AS c (pipeline, last_id, pending_txids, events_passed, updated_at)"
            " VALUES (%s, %s, %s::text[]::xid8[], %s, now())"
            " ON CONFLICT (pipeline) DO UPDATE SET"
            " last_id = EXCLUDED.last_id, pending_txids = EXCLUDED.pending_txids,"
            " events_passed = c.events_passed + EXCLUDED.events_passed, updated_at = now()"
            " WHERE EXCLUDED.last_id > c.last_id OR (EXCLUDED.last_id = c.last_id AND"
            " coalesce(EXCLUDED.pending_txids[array_upper(EXCLUDED.pending_txids, 1)], '0')"
            " >= coalesce(c.pending_txids[array_upper(c.pending_txids, 1)], '0'))"
        ).format(cp=sql.Identifier(schema, "checkpoints")),
        (pipeline, position.last_id, pending, events_passed),
    )


def _not_passed(position: ReadPosition) -> tuple[sql.Composable, list[Any]]:
    """SQL condition (on alias o) for rows the position has not passed, and its parameters."""
    if not position.pending_txids:
        return sql.SQL("o.id > %s"), [position.last_id]
    listed, horizon = _pending_params(position)
    return (
        sql.SQL(
            "(o.id > %s OR (o.id <= %s AND"
            " (o.txid = ANY(%s::text[]::xid8[]) OR o.txid >= %s::text::xid8)))"
        ),
        [position.last_id, position.last_id, listed, horizon],
    )


async def outbox_lag(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    position: ReadPosition,
) -> tuple[int, float]:
    """(committed events the position has not passed, age in seconds of the oldest of them)."""
    pipeline = _name(pipeline)
    cond, params = _not_passed(position)
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT count(*), extract(epoch FROM clock_timestamp() - min(o.captured_at))::float8"
            " FROM {} o WHERE o.pipeline = %s AND {}"
        ).format(sql.Identifier(schema, "outbox"), cond),
        [pipeline, *params],
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


async def prune(conn: psycopg.AsyncConnection[Any], schema: str, older_than: datetime) -> int:
    """Delete outbox rows captured before ``older_than`` that every checkpoint has passed: the
    row's pipeline has a checkpoint with ``id <= last_id`` and the row's transaction is not
    pending there. Rows of a pipeline without a checkpoint are kept. Deletes in batches (each
    its own transaction when ``conn`` is in autocommit); returns the number of rows deleted."""
    outbox = sql.Identifier(schema, "outbox")
    query = sql.SQL(
        "DELETE FROM {outbox} WHERE id IN ("
        " SELECT o.id FROM {outbox} o JOIN {cp} c ON c.pipeline = o.pipeline"
        " WHERE o.captured_at < %s AND o.id <= c.last_id"
        " AND (cardinality(c.pending_txids) = 0 OR"
        "  (o.txid < c.pending_txids[array_upper(c.pending_txids, 1)]"
        "   AND o.txid <> ALL(c.pending_txids)))"
        " ORDER BY o.id LIMIT %s)"
    ).format(outbox=outbox, cp=sql.Identifier(schema, "checkpoints"))
    total = 0
    while True:
        cur = await conn.execute(query, (older_than, PRUNE_BATCH))
        total += cur.rowcount
        if cur.rowcount < PRUNE_BATCH:
            return total


async def read_range(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    *,
    from_offset: int | None = None,
    to_offset: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    key: str | None = None,
    batch: int = 5000,
) -> AsyncIterator[list[ChangeEvent]]:
    """Committed events of ``pipeline`` in id order, in pages of at most ``batch``, for replay.

    Bounds: ``from_offset <= id <= to_offset``, ``since <= captured_at < until``, ``key``.
    Each page is its own statement (no transaction is held across pages), so a transaction that
    commits during the iteration with ids below the page already read is not included.
    """
    pipeline = _name(pipeline)
    conds: list[sql.Composable] = [sql.SQL("o.pipeline = %s"), sql.SQL("o.id > %s")]
    params: list[Any] = [pipeline]
    extra: list[Any] = []
    if to_offset is not None:
        conds.append(sql.SQL("o.id <= %s"))
        extra.append(to_offset)
    if since is not None:
        conds.append(sql.SQL("o.captured_at >= %s"))
        extra.append(since)
    if until is not None:
        conds.append(sql.SQL("o.captured_at < %s"))
        extra.append(until)
    if key is not None:
        conds.append(sql.SQL("o.key = %s"))
        extra.append(key)
    query = sql.SQL(
        "SELECT {cols} FROM {outbox} o LEFT JOIN {chunks} c ON c.id = o.chunk_id"
        " WHERE {where} ORDER BY o.id LIMIT %s"
    ).format(
        cols=_COLUMNS,
        outbox=sql.Identifier(schema, "outbox"),
        chunks=sql.Identifier(schema, "snapshot_chunks"),
        where=sql.SQL(" AND ").join(conds),
    )
    after = (from_offset - 1) if from_offset is not None else 0
    while True:
        cur = _cursor(conn)
        await cur.execute(query, [*params, after, *extra, batch])
        page = [_event(r) for r in await cur.fetchall()]
        if not page:
            return
        yield page
        if len(page) < batch:
            return
        after = page[-1].offset


async def wait_for_change(conn: psycopg.AsyncConnection[Any], schema: str, timeout: float) -> bool:
    """LISTEN on the outbox channel and wait up to ``timeout`` seconds for one notification.

    ``conn`` must be in autocommit mode. True when notified. NOTIFY is only a hint: callers
    poll as well (a notification sent before the LISTEN, or while nobody waits, is not seen).
    For a long-running reader prefer ``OutboxListener``.
    """
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(notify_channel(schema))))
    async for _ in conn.notifies(timeout=timeout, stop_after=1):
        return True
    return False


class OutboxListener:
    """A dedicated connection LISTENing on ``<schema>_outbox``; sets an ``asyncio.Event``.

    Use as ``async with OutboxListener(dsn, schema) as listener: await listener.wait(5.0)``.
    A lost connection is re-established with capped backoff; while it is down, ``wait``
    returns True at once (the caller polls anyway). ``pipelines`` limits which notifications
    (their payload is the pipeline name) set the event.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        pipelines: Collection[str] | None = None,
        *,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._channel = notify_channel(schema)
        self._pipelines = frozenset(pipelines) if pipelines is not None else None
        self._max_backoff = max_backoff
        self._event = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def event(self) -> asyncio.Event:
        return self._event

    async def start(self) -> None:
        """Start listening; returns once the first LISTEN is in place (or failed once)."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name=f"outbox-listener:{self._channel}")
        first = asyncio.create_task(self._connected.wait())
        await asyncio.wait({first, self._task}, return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if self._task.done():
            self._task.result()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True
                ) as conn:
                    self._conn = conn
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self._connected.set()
                    backoff = 0.1
                    async for n in conn.notifies():
                        if self._pipelines is None or n.payload in self._pipelines:
                            self._event.set()
            except psycopg.OperationalError as exc:
                log.warning(
                    "outbox listener connection lost; retrying",
                    extra={"error": type(exc).__name__, "retry_in": backoff},
                )
            finally:
                self._conn = None
                self._connected.clear()
            self._event.set()  # anything may have happened meanwhile: make readers poll
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notification; True if one came (the event is
        cleared on return)."""
        if self._task is not None and self._task.done():
            self._task.result()  # surface an unexpected crash
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        notified = self._event.is_set()
        self._event.clear()
        return notified

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> OutboxListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
