"""The outbox writer of ``LogicalCapture``: a task that COPYs batches of events into the open
outbox transaction (deferred values resolved first, rows without a key as dead letters), then
commits it with ``capture_state.last_commit_lsn`` and confirms that position to the server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from connector.capture import pgoutput as po
from connector.capture import values as vals
from connector.capture.logical.model import (
    _MISSING_KEY,
    _RECHECK,
    _SERVER,
    _TOAST,
    CaptureStats,
    _Batch,
    _Closed,
    _Codec,
    _Event,
    _Pending,
    _Row,
)
from connector.capture.triggers import missing_key_message
from connector.config import PipelineConfig
from connector.db import fetch_value as _one
from connector.errors import PermanentError

# one logger for the package: log lines keep the name they had before the split
log = logging.getLogger("connector.capture.logical")


class _Writer:
    """Mixed into ``LogicalCapture`` (stream.py), which sets these attributes (in ``_stream``
    for a session's) and defines ``_send_status``."""

    pipeline: PipelineConfig
    stats: CaptureStats
    after_outbox_commit: Callable[[int], Awaitable[None]] | None
    _schema_ident: sql.Identifier
    _types: vals.TypeRegistry
    _src: psycopg.AsyncConnection[Any]
    _state: psycopg.AsyncConnection[Any]
    _seq: Any
    _xid_ref: int
    _xid_ref_at: float
    _copy_sql: sql.Composed
    _fetch_sql: sql.Composed
    _image_sql: sql.Composed
    _dead_sql: sql.Composed
    _commit_times: dict[int, bytes]
    _queue: asyncio.Queue[_Batch]
    _inflight: int
    _written: int
    _writer_task: asyncio.Task[None]
    _pending: _Pending
    _stored_lsn: int
    _confirmed: int
    _send_status: Callable[[], None]

    async def _writer(self) -> None:
        """Write batches in order (overlapping the next batch's decoding), commit, confirm."""
        while True:
            batch = await self._queue.get()
            self._written += await self._write(batch.events)
            if batch.end_lsn:
                await self._commit(batch)
            self._inflight -= 1
            self._queue.task_done()

    async def _enqueue(self, batch: _Batch) -> None:
        self._check_writer()
        self._inflight += 1
        await self._queue.put(batch)

    def _check_writer(self) -> None:
        w = self._writer_task
        if w.done():
            exc = w.exception()
            if exc is not None:
                raise exc
            raise _Closed("outbox writer stopped")

    async def _drain(self) -> None:
        """Wait until every queued batch is written and committed."""
        while self._inflight:
            self._check_writer()
            await asyncio.sleep(0.005)
        self._check_writer()

    # -- writing ------------------------------------------------------------------------------
    async def _xid_reference(self) -> int:
        now = time.monotonic()
        if now - self._xid_ref_at > 1.0:
            text = await _one(self._src, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
            self._xid_ref = int(text)
            self._xid_ref_at = now
        return self._xid_ref

    async def _resolve(self, events: list[_Event]) -> None:
        for ev in events:
            if not ev.deferred:
                continue
            toast_cols = [i for i, kind, _ in ev.deferred if kind == _TOAST]
            if toast_cols:
                self.stats.toast_fetches += 1
                names = [ev.codec.names[i] for i in toast_cols]
                cur = await self._src.execute(self._fetch_sql, (ev.key, names))
                got = {k: v for k, v in await cur.fetchall()}
                for i in toast_cols:
                    v = got.get(ev.codec.names[i])
                    if v is None:
                        self.stats.toast_missing += 1
                        log.warning(
                            "unchanged TOAST value of a row that is gone; a later delete of the "
                            "key supersedes this event",
                            extra={"pipeline": self.pipeline.name},
                        )
                        v = "null"
                    ev.frags[i] = v
            for i, kind, text in ev.deferred:
                if kind == _RECHECK:
                    image = await _one(self._src, self._image_sql, (ev.key,))
                    if image is not None:
                        ev.op = "update"
                        ev.image = image
                elif kind == _SERVER:
                    conv_sql = sql.SQL("SELECT to_jsonb(CAST(%s::text AS {}))::text").format(
                        sql.SQL(self._types_sql_name(ev.codec, i))
                    )
                    ev.frags[i] = await _one(self._src, conv_sql, (text,))
            ev.deferred = None

    def _types_sql_name(self, codec: _Codec, i: int) -> str:
        oid = codec.relation.columns[i].type_oid
        info = self._types._infos.get(oid)
        if info is None:
            raise PermanentError(f"type OID {oid} cannot be converted")
        return info.sql_name

    def _render(self, ev: _Event) -> _Row:
        """An event of the general path (deferred values resolved) as a COPY-ready row."""
        prefixes = ev.codec.prefixes
        body = ",".join(prefixes[i] + f for i, f in enumerate(ev.frags) if f is not None)
        image = ev.image if ev.image is not None else "{" + body + "}"
        return (
            ev.codec.heads[ev.op] + vals.copy_escape(ev.key.encode()) + b"\t",
            vals.copy_escape(image.encode()),
            ev.xid,
            ev.commit_lsn,
            b"",
        )

    async def _write(self, events: list[_Event | _Row]) -> int:
        """COPY the events into the open outbox transaction (opened here if needed), as one
        text-format buffer. Returns the number of outbox rows written."""
        if not events:
            return 0
        slow = [ev for ev in events if isinstance(ev, _Event)]
        if slow:
            await self._resolve(slow)
            if any(ev.op == _MISSING_KEY for ev in slow):
                return await self._write_with_dead_letters(events)
        ref = await self._xid_reference()
        cur = await self._state.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (self._seq, len(events))
        )
        ids = sorted(r[0] for r in await cur.fetchall())
        widen = po.widen_xid
        render = self._render
        times = self._commit_times
        last_xid = last_lsn = -1
        sx = sl = st = b""
        lines: list[bytes] = []
        append = lines.append
        for ident, ev in zip(ids, events, strict=True):
            head, body, xid, lsn, _ = render(ev) if isinstance(ev, _Event) else ev
            if xid != last_xid:
                sx = b"%d" % widen(xid, ref)
                last_xid = xid
            if lsn != last_lsn:
                sl = b"%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF)
                st = times.get(lsn, b"now")  # (every streamed transaction has its Begin)
                last_lsn = lsn
            append(b"%d%s%d\t%s\t%s\t%s\t%s\n" % (ident, head, ident, sx, sl, body, st))
        async with self._state.cursor() as c, c.copy(self._copy_sql) as copy:
            await copy.write(b"".join(lines))
        return len(events)

    async def _write_with_dead_letters(self, events: list[_Event | _Row]) -> int:
        """``_write`` for a batch holding rows without a key: those become ``MISSING_KEY`` dead
        letters in the same (open) outbox transaction, with a version drawn from the outbox
        sequence in their place in the stream; the others are written as usual."""
        rows: list[_Event | _Row] = []
        written = 0
        for ev in events:
            if not (isinstance(ev, _Event) and ev.op == _MISSING_KEY):
                rows.append(ev)
                continue
            written += await self._write(rows)
            rows = []
            ref = await self._xid_reference()
            prefixes = ev.codec.prefixes
            body = ",".join(prefixes[i] + f for i, f in enumerate(ev.frags) if f is not None)
            await self._state.execute(
                self._dead_sql,
                (
                    self.pipeline.name,
                    self._seq,
                    str(po.widen_xid(ev.xid, ref)),
                    "{" + body + "}",
                    self.pipeline.key_field,
                    missing_key_message(self.pipeline),
                ),
            )
        return written + await self._write(rows)

    async def _flush(self) -> None:
        """Hand the committed events to the writer (which commits them together with
        capture_state, then confirms the last stored commit to the server)."""
        pending = self._pending
        batch = _Batch(
            pending.events[: pending.committed],
            pending.last_end_lsn,
            pending.last_xid,
            pending.transactions,
        )
        pending.events = pending.events[pending.committed :]
        pending.committed = 0
        pending.transactions = 0
        pending.first_commit_at = None
        await self._enqueue(batch)

    async def _commit(self, batch: _Batch) -> None:
        end_lsn = batch.end_lsn
        ref = await self._xid_reference()
        res = await self._state.execute(
            sql.SQL(
                "UPDATE {}.capture_state SET last_commit_lsn = %s::pg_lsn,"
                " last_source_xid = %s::xid8, updated_at = now()"
                " WHERE pipeline = %s AND mode = 'logical'"
            ).format(self._schema_ident),
            (po.lsn_to_str(end_lsn), str(po.widen_xid(batch.xid, ref)), self.pipeline.name),
        )
        if res.rowcount != 1:
            await self._state.rollback()
            raise PermanentError(
                f"capture_state row of pipeline {self.pipeline.name!r} disappeared "
                f"(uninstalled while running?)"
            )
        await self._state.commit()
        times = self._commit_times
        while times:  # transactions stream in commit order: drop the stored ones
            first = next(iter(times))
            if first > end_lsn:
                break
            del times[first]
        self.stats.events += self._written
        self._written = 0
        self.stats.transactions += batch.transactions
        self.stats.outbox_commits += 1
        self.stats.last_commit_lsn = end_lsn
        self._stored_lsn = end_lsn
        if self.after_outbox_commit is not None:
            await self.after_outbox_commit(end_lsn)
        self._confirmed = max(self._confirmed, end_lsn)
        self._send_status()
