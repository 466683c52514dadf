"""The outbox: gap-free reading, checkpoints, replay, lag (retention: ``outbox_retention``).

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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads

from connector import dbpolicy
from connector.config import PipelineConfig
from connector.events import ChangeEvent, Op, SnapshotVisibility

log = logging.getLogger(__name__)


def _parse_int(text: str) -> int | decimal.Decimal:
    # Python refuses to read an int of more than sys.get_int_max_str_digits() (4300) digits;
    # a numeric column holds up to 131072: such a value stays exact as a Decimal
    return int(text) if len(text) <= 4000 else decimal.Decimal(text)


def load_json(data: str | bytes) -> Any:
    """JSON as psycopg loads it (floats as float), but integers exact whatever their size."""
    return json.loads(data, parse_int=_parse_int)


# built once (json.loads with keyword arguments builds a decoder on every call; issue 19)
_ROW_DECODER = json.JSONDecoder(parse_float=decimal.Decimal, parse_int=_parse_int)
# for a text of at most 4000 characters, which cannot hold an integer of more than 4000 digits:
# _parse_int would call int() on every integer anyway, so the scanner's own int() is the same
_SHORT_ROW_DECODER = json.JSONDecoder(parse_float=decimal.Decimal)


def load_row(data: str | bytes) -> Any:
    """Parse a row image: JSON with every non-integer number as a ``Decimal`` (never a float),
    integers exact whatever their size (lossless, issue 14 §4).

    The same as ``json.loads(data, parse_float=Decimal, parse_int=_parse_int)``, once per
    outbox row, without building a decoder per call."""
    if isinstance(data, bytes | bytearray):
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    elif isinstance(data, str) and not data.startswith("\ufeff"):
        text = data
    else:  # a BOM, a memoryview, a wrong type: json.loads's own answer (or error)
        return json.loads(data, parse_float=decimal.Decimal, parse_int=_parse_int)
    return (_SHORT_ROW_DECODER if len(text) <= 4000 else _ROW_DECODER).decode(text)


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


def _event(r: Sequence[Any], snapshots: dict[str, SnapshotVisibility] | None = None) -> ChangeEvent:
    """One outbox row as an event. ``snapshots``: the chunk snapshots parsed so far in this
    batch (every row of a chunk carries the same text: parsed once, one shared frozen value;
    issue 19)."""
    snap_text = r[8]
    snapshot: SnapshotVisibility | None = None
    if snap_text is not None:
        if snapshots is None:
            snapshot = SnapshotVisibility.parse(snap_text)
        else:
            snapshot = snapshots.get(snap_text)
            if snapshot is None:
                snapshot = snapshots[snap_text] = SnapshotVisibility.parse(snap_text)
    return ChangeEvent(
        offset=int(r[0]),
        pipeline=str(r[1]),
        op=Op(r[2]),
        key=str(r[3]),
        version=int(r[4]),
        source_xid=int(r[5]),
        row=r[6],
        captured_at=r[7],
        snapshot=snapshot,
    )


def pipeline_name(pipeline: str | PipelineConfig) -> str:
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
    pipeline = pipeline_name(pipeline)
    async with conn.transaction():
        cur = _cursor(conn)
        await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        await cur.execute("SELECT pg_current_snapshot()::text")
        snap_row = await cur.fetchone()
        assert snap_row is not None
        snap = SnapshotVisibility.parse(snap_row[0])
        events: list[ChangeEvent] = []
        snapshots: dict[str, SnapshotVisibility] = {}
        if position.pending_txids and position.last_id > 0:
            listed, horizon = _pending_params(position)
            await cur.execute(
                late_rows_query(schema), (pipeline, position.last_id, listed, horizon)
            )
            events.extend(_event(r, snapshots) for r in await cur.fetchall())
        await cur.execute(new_rows_query(schema), (pipeline, position.last_id, limit))
        new = [_event(r, snapshots) for r in await cur.fetchall()]
        events.extend(new)
    last_id = new[-1].offset if new else position.last_id
    pending = (*sorted(snap.xip), snap.xmax)
    return events, ReadPosition(last_id, pending)


async def load_checkpoint(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> ReadPosition:
    """The saved position of ``pipeline`` (the start of the log when none is saved)."""
    pipeline = pipeline_name(pipeline)
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


async def last_committed_id(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> int:
    """The highest outbox id of ``pipeline`` committed now (0 when the outbox is empty)."""
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL("SELECT coalesce(max(id), 0) FROM {} WHERE pipeline = %s").format(
            sql.Identifier(schema, "outbox")
        ),
        (pipeline_name(pipeline),),
    )
    row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


async def newest_rows(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    keys: Sequence[str],
    exclude: Sequence[int] = (),
) -> dict[str, ChangeEvent]:
    """Each key's newest committed outbox row (by id: rows are written in commit order per key
    in both capture modes), as an event. One backward step of the ``(pipeline, key, id)``
    index per key, however many versions a key has.

    ``exclude``: offsets the caller already holds (the batch just read). A key whose newest row
    is one of them is left out of the answer, in the query itself: that row is neither sent
    again by PostgreSQL nor parsed again here (issue 19: with a backlog of distinct keys the
    newest row of almost every key is the one just read). Planned at each call, with its
    arrays (``prepare=False``): a generic plan made the exclusion quadratic."""
    if not keys:
        return {}
    cur = _cursor(conn)
    await cur.execute(
        sql.SQL(
            "SELECT {cols} FROM unnest(%b::text[]) AS k(key)"
            " CROSS JOIN LATERAL (SELECT * FROM {outbox} i WHERE i.pipeline = %s AND i.key = k.key"
            " ORDER BY i.id DESC LIMIT 1) o"
            " LEFT JOIN {chunks} c ON c.id = o.chunk_id"
            " WHERE o.id <> ALL(%b::bigint[])"  # binary arrays: cheaper to dump (issue 19)
        ).format(
            cols=_COLUMNS,
            outbox=sql.Identifier(schema, "outbox"),
            chunks=sql.Identifier(schema, "snapshot_chunks"),
        ),
        (list(keys), pipeline_name(pipeline), list(exclude)),
        # never prepared: psycopg prepares a statement run 5 times on a connection, and
        # PostgreSQL may then plan it once for any arrays (a generic plan), in which
        # `<> ALL(array)` compares each row with every offset: 34 s instead of 0.5-1 s for
        # 25,000 keys (session 15). Unprepared, each call is planned with its own arrays.
        prepare=False,
    )
    return {ev.key: ev for ev in (_event(r) for r in await cur.fetchall())}


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
    pipeline = pipeline_name(pipeline)
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


def not_passed(position: ReadPosition) -> tuple[sql.Composable, list[Any]]:
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
    pipeline = pipeline_name(pipeline)
    cond, params = not_passed(position)
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
    pipeline = pipeline_name(pipeline)
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


async def has_unread(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    position: ReadPosition,
) -> bool:
    """True when a committed outbox row of ``pipeline`` is not passed by ``position``, i.e. when
    ``read_batch`` from ``position`` would return something. One index probe: the newest ids
    above ``last_id`` (``outbox_pipeline_id``) and the rows of the pending transactions
    (``outbox_txid``); uncommitted rows are invisible to it."""
    cond, params = not_passed(position)
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} o WHERE o.pipeline = %s AND {})").format(
            sql.Identifier(schema, "outbox"), cond
        ),
        [pipeline_name(pipeline), *params],
    )
    row = await cur.fetchone()
    return bool(row is not None and row[0])


class OutboxWatcher:
    """Wakes a reader when committed outbox rows are waiting for it: an adaptive poll.

    Nothing runs inside the legacy application's transactions to wake the reader (no
    ``NOTIFY``: it makes ``PREPARE TRANSACTION`` fail and serialises every committing
    transaction on one global lock; DESIGN.md invariant 9). Instead a dedicated autocommit
    connection asks ``has_unread`` for the reader's current position (``position()``): every
    ``min_interval`` seconds while rows keep arriving, doubling up to ``max_interval`` while the
    outbox is idle. So the first change after an idle spell is seen within ``max_interval``,
    later ones within ``min_interval``. While the event is set and not yet taken by the reader,
    nothing is queried. A lost connection is re-established with capped backoff; meanwhile the
    event is set (the reader then reads itself, and polls on its own interval in any case).

    Use as ``async with OutboxWatcher(dsn, schema, "orders", lambda: pos) as w: await
    w.wait(5.0)``.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        pipeline: str,
        position: Callable[[], ReadPosition],
        *,
        min_interval: float = 0.05,
        max_interval: float = 1.0,
        max_backoff: float = 5.0,
    ) -> None:
        if not 0 < min_interval <= max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        self._dsn = dsn
        self._schema = schema
        self._pipeline = pipeline
        self._position = position
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._max_backoff = max_backoff
        self._event = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.interval = min_interval  # the current poll interval (for tests and docs)
        self.polls = 0  # queries run

    @property
    def event(self) -> asyncio.Event:
        return self._event

    async def start(self) -> None:
        """Start polling; returns once connected (or after the first failure)."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name=f"outbox-watcher:{self._pipeline}")
        first = asyncio.create_task(self._connected.wait())
        await asyncio.wait({first, self._task}, return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if self._task.done():
            self._task.result()

    async def _run(self) -> None:
        while True:
            # each outage starts the policy afresh: a connection that lived for hours does
            # not make the next reconnect wait longer
            async for attempt in dbpolicy.retrying(
                "the outbox watcher",
                pipeline=self._pipeline,
                initial=0.1,
                cap=self._max_backoff,
            ):
                with attempt:
                    conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
            try:
                async with conn:
                    self._connected.set()
                    await self._poll(conn)
            except psycopg.OperationalError as exc:
                log.warning(
                    "outbox watcher connection lost; reconnecting (%s)",
                    dbpolicy.describe(exc),
                    extra={"pipeline": self._pipeline},
                )
            finally:
                self._connected.clear()
                self._event.set()  # anything may have happened meanwhile: make the reader read

    async def _poll(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.interval = self.min_interval
        while True:
            if self._event.is_set():  # not taken yet: the reader is busy, no need to ask
                await asyncio.sleep(self.min_interval)
                continue
            self.polls += 1
            if await has_unread(conn, self._schema, self._pipeline, self._position()):
                self._event.set()
                self.interval = self.min_interval
            else:
                self.interval = min(self.interval * 2, self.max_interval)
            await asyncio.sleep(self.interval)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for unread rows; True if there are (the event is
        cleared on return)."""
        if self._task is not None and self._task.done():
            self._task.result()  # surface an unexpected crash
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        found = self._event.is_set()
        self._event.clear()
        return found

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> OutboxWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
