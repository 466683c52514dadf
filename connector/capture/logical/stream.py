"""The replication stream consumer: ``LogicalCapture.run`` streams the slot (reconnecting with
backoff), decodes pgoutput in ``_consume`` (the fast path inline, the rest through ``_Decoder``,
decode.py), hands committed source transactions to the outbox writer (``_Writer``, writer.py),
sends heartbeats and standby status updates (the confirmed position), and filters its own writes
by replication origin when it may."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from connector.capture import OWN_WRITE_PREFIX
from connector.capture import pgoutput as po
from connector.capture import values as vals
from connector.capture.logical.admin import (
    ORIGIN_MIN_SERVER,
    _key,
    _table_ident,
    foreign_origin,
    object_name,
    origin_name,
)
from connector.capture.logical.decode import _Decoder
from connector.capture.logical.model import CaptureStats, _Batch, _Closed, _Codec, _Event, _Pending
from connector.capture.logical.writer import _Writer
from connector.config import PipelineConfig
from connector.config_secrets import redact
from connector.db import fetch_value as _one
from connector.errors import ConfigError

# one logger for the package: log lines keep the name they had before the split
log = logging.getLogger("connector.capture.logical")

HEARTBEAT_PREFIX = "connector-heartbeat"


class LogicalCapture(_Decoder, _Writer):
    """Stream the pipeline's slot into the outbox. One instance per pipeline and process."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        pipeline: PipelineConfig,
        *,
        state_dsn: str | None = None,
        batch_rows: int = 10_000,
        flush_interval: float = 0.1,
        heartbeat_interval: float = 10.0,
        status_interval: float = 10.0,
        max_backoff: float = 30.0,
        toast_cache_bytes: int = 64 << 20,
        after_outbox_commit: Callable[[int], Awaitable[None]] | None = None,
        origin_check_interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.state_dsn = state_dsn or dsn
        self.schema = schema
        self.pipeline = pipeline
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.status_interval = status_interval
        self.max_backoff = max_backoff
        self.toast_cache_bytes = toast_cache_bytes
        self.after_outbox_commit = after_outbox_commit
        self.stats = CaptureStats()
        self.slot_name = object_name(schema, pipeline.name)
        self._schema_ident = sql.Identifier(schema)
        self._types = vals.TypeRegistry()
        self._toast: OrderedDict[str, dict[int, str]] = OrderedDict()
        self._toast_bytes = 0
        # deferrable keys: keys the current source transaction inserted or updated, and those
        # a row left after that (DELETE, key change): re-read at its commit (see _note_leave)
        self._txn_up: set[str] = set()
        self._txn_recheck: dict[str, _Event] = {}
        self._codecs: dict[int, _Codec] = {}
        # START_REPLICATION at the stored commit, so the server itself skips what is stored;
        # the client-side skip rule covers a slot that went back (tests turn this off to
        # exercise that rule)
        self.request_stored_lsn = True
        # ``filter_own_writes`` (the pipeline option, off by default): tag the state
        # connection's writes with the pipeline's replication origin and stream with origin
        # 'none', so that the walsender skips them before decoding; ``origin_filter``: in use
        # in the current (or last) session
        self.filter_own_writes = pipeline.filter_own_writes
        self.origin_filter = False
        self.origin_fallback_reason: str | None = None
        self.origin_check_interval = origin_check_interval

    # -- supervision -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set; reconnect with capped exponential backoff (jittered)
        when a connection is lost. Configuration problems raise ``ConfigError``."""
        backoff = 0.2
        while not stop.is_set():
            try:
                started = await self._session(stop)
                if started:
                    backoff = 0.2
            except (psycopg.OperationalError, OSError, _Closed) as exc:
                self.stats.reconnects += 1
                delay = min(self.max_backoff, backoff) * (0.5 + random.random() / 2)
                # the server's own words (e.g. 'publication "…" does not exist'), so the
                # operator does not have to guess why it keeps reconnecting
                log.warning(
                    "logical capture connection lost (%s: %s); reconnecting",
                    type(exc).__name__,
                    redact(str(exc).strip())[:500] or "no message",
                    extra={
                        "pipeline": self.pipeline.name,
                        "error": type(exc).__name__,
                        "delay": round(delay, 2),
                    },
                )
                backoff = min(self.max_backoff, backoff * 2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, stop: asyncio.Event) -> bool:
        self._codecs = {}
        self._toast.clear()
        self._toast_bytes = 0
        self.origin_filter = False
        opts = vals.SESSION_OPTIONS
        state = await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=False)
        try:
            src = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, options=opts)
            try:
                repl = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, replication="database", options=opts
                )
                try:
                    return await self._stream(stop, state, src, repl)
                finally:
                    await repl.close()
            finally:
                await src.close()
        finally:
            if self.origin_filter:
                with contextlib.suppress(psycopg.Error):
                    await state.rollback()
                    await state.execute("SELECT pg_replication_origin_session_reset()")
            await state.close()  # (closing releases the origin in any case)

    async def _setup_origin(
        self,
        state: psycopg.AsyncConnection[Any],
        src: psycopg.AsyncConnection[Any],
        slot: str,
    ) -> bool:
        """Tag the state connection's writes with the pipeline's replication origin, when the
        source server has pgoutput's ``origin`` option (16+), no other replication origin exists
        on it, and the role may call ``pg_replication_origin_session_setup``. Otherwise keep
        decoding our own writes (correct, slower) and say why once."""
        self.origin_filter = False
        if not self.filter_own_writes:
            return False
        origin = origin_name(slot)
        reason: str | None = None
        version = src.info.server_version
        if version < ORIGIN_MIN_SERVER:
            reason = f"the source server is PostgreSQL {version // 10000} (origin filtering: 16+)"
        else:
            other = await foreign_origin(src)
            if other is not None:
                reason = (
                    f"replication origin {other!r} is not the connector's: changes written under "
                    f"it (e.g. by a subscription) would be filtered out too"
                )
        if reason is None:
            try:
                await state.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
                await state.commit()
            except psycopg.errors.InsufficientPrivilege:
                await state.rollback()
                reason = "the role may not execute pg_replication_origin_session_setup(text)"
            except psycopg.errors.UndefinedObject:
                await state.rollback()
                reason = (
                    f"replication origin {origin!r} does not exist (`connector init` creates it "
                    f"when the role may execute pg_replication_origin_create(text))"
                )
            except psycopg.errors.ObjectInUse:
                # another session holds it (e.g. the backend of a connector cut off by a
                # network partition, until TCP keepalive ends it): never wait for it
                await state.rollback()
                reason = f"replication origin {origin!r} is in use by another session"
        if reason is not None:
            if reason != self.origin_fallback_reason:
                log.info(
                    "logical capture does not filter its own writes by replication origin; the "
                    "walsender also decodes the outbox writes (slower, correct)",
                    extra={"pipeline": self.pipeline.name, "reason": reason},
                )
            self.origin_fallback_reason = reason
            return False
        self.origin_fallback_reason = None
        self.origin_filter = True
        return True

    async def _stream(
        self,
        stop: asyncio.Event,
        state: psycopg.AsyncConnection[Any],
        src: psycopg.AsyncConnection[Any],
        repl: psycopg.AsyncConnection[Any],
    ) -> bool:
        ident = self._schema_ident
        cur = await state.execute(
            sql.SQL(
                "SELECT slot_name, publication_name, last_commit_lsn::text"
                " FROM {}.capture_state WHERE pipeline = %s AND mode = 'logical'"
            ).format(ident),
            (self.pipeline.name,),
        )
        row = await cur.fetchone()
        await state.commit()
        if row is None:
            raise ConfigError(
                _key(self.pipeline, "capture"),
                f"logical capture is not installed for pipeline {self.pipeline.name!r}; "
                f"run `connector init`",
            )
        slot, publication, last_lsn = row
        self._stored_lsn = po.str_to_lsn(last_lsn) if last_lsn else 0
        self._confirmed = self._stored_lsn
        self._received = self._stored_lsn
        self._seq = await _one(
            state,
            "SELECT pg_get_serial_sequence(%s, 'id')",
            (f"{_quote(self.schema)}.outbox",),
        )
        await state.commit()
        self._state, self._src, self._repl = state, src, repl
        self._xid_ref = 0
        self._xid_ref_at = 0.0
        self._copy_sql = sql.SQL(
            "COPY {}.outbox (id, pipeline, op, key, version, source_xid, source_lsn, row,"
            " captured_at) FROM STDIN"
        ).format(ident)
        # commit LSN -> the source transaction's commit time (pgoutput Begin), COPY-ready: the
        # outbox row's captured_at, from which every deadline and staleness figure runs
        # (DESIGN.md invariant 10), not the time the connector stored it
        self._commit_times: dict[int, bytes] = {}
        self._fetch_sql = sql.SQL(
            "SELECT j.key, j.value::text FROM {} t, jsonb_each(to_jsonb(t.*)) j"
            " WHERE t.{} = %s AND j.key = ANY(%s)"
        ).format(_table_ident(self.pipeline), sql.Identifier(self.pipeline.key_column))
        self._image_sql = sql.SQL("SELECT to_jsonb(t.*)::text FROM {} t WHERE t.{} = %s").format(
            _table_ident(self.pipeline), sql.Identifier(self.pipeline.key_column)
        )
        self._dead_sql = sql.SQL(
            "INSERT INTO {}.dead_letters (pipeline, key, version, source_xid, payload,"
            " error_code, error_field, error_message)"
            " VALUES (%s, '', nextval(%s::regclass), %s::xid8, %s::jsonb, 'MISSING_KEY', %s, %s)"
        ).format(ident)
        self._spilled_open = False
        by_origin = await self._setup_origin(state, src, slot)
        await repl.execute(
            sql.SQL(
                "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1',"
                " publication_names {}, messages 'true'{})"
            ).format(
                sql.Identifier(slot),
                sql.SQL(po.lsn_to_str(self._stored_lsn if self.request_stored_lsn else 0)),
                sql.Literal(publication),
                sql.SQL(", origin 'none'" if by_origin else ""),
            )
        )
        log.info(
            "logical capture streaming",
            extra={
                "pipeline": self.pipeline.name,
                "slot": slot,
                "from_lsn": po.lsn_to_str(self._stored_lsn),
                "origin_filter": by_origin,
            },
        )
        self._skip_below = self._stored_lsn
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=2)
        self._inflight = 0
        self._written = 0
        writer = asyncio.create_task(self._writer(), name=f"outbox-writer-{self.pipeline.name}")
        self._writer_task = writer
        try:
            await self._consume(stop, repl.pgconn)
        finally:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return True

    # -- the stream loop ----------------------------------------------------------------------
    async def _consume(self, stop: asyncio.Event, pgconn: Any) -> None:
        loop = asyncio.get_running_loop()
        pending = _Pending()
        self._pending = pending
        in_txn = False
        skip = False
        own = False  # the connector's own sync-flag transaction (OWN_WRITE_PREFIX)
        xid = 0
        commit_lsn = 0
        last_status = time.monotonic()
        last_activity = time.monotonic()
        last_origin_check = last_activity
        get = pgconn.get_copy_data
        decode_tuple = po.decode_tuple
        unpack_xlog = po._XLOG.unpack_from
        unpack_rel = po._U32.unpack_from
        unpack_begin = po._BEGIN.unpack_from
        unpack_commit = po._COMMIT.unpack_from
        needs_server = vals.NeedsServer
        codecs = self._codecs
        monotonic = time.monotonic
        while True:
            nbytes, view = get(1)
            if nbytes > 0:
                data = bytes(view)
                kind = data[0]
                if kind == 0x77:  # 'w' XLogData
                    m = data[25]
                    if m in {73, 85, 68}:  # I / U / D
                        if skip or own:
                            continue
                        (relid,) = unpack_rel(data, 26)
                        codec = codecs.get(relid)
                        if codec is None:
                            continue
                        # fast path: an insert, or an update without an old tuple, whose
                        # values are all sent as text and convertible from it
                        row = None
                        if data[30] == 0x4E and codec.encode is not None:  # 'N' new tuple
                            try:
                                row = codec.encode(
                                    data,
                                    31,
                                    codec.head_insert if m == 0x49 else codec.head_update,
                                    xid,
                                    commit_lsn,
                                )
                            except needs_server:
                                row = None
                        if row is not None:
                            if self._toast:
                                self._forget(row[4].decode())
                            pending.events.append(row)
                        elif m == 0x49:
                            new, _ = decode_tuple(data, 31)
                            self._on_row("insert", codec, new, None, None, xid, commit_lsn)
                        else:
                            msg = po.decode(data[25:])
                            if isinstance(msg, po.Update):
                                self._on_row(
                                    "update",
                                    codec,
                                    msg.new,
                                    msg.old,
                                    msg.old_kind,
                                    xid,
                                    commit_lsn,
                                )
                            elif isinstance(msg, po.Delete):
                                self._on_row(
                                    "delete", codec, None, msg.old, msg.old_kind, xid, commit_lsn
                                )
                        if len(pending.events) - pending.committed >= self.batch_rows:
                            # a large source transaction: spill its rows into the open outbox
                            # transaction, which is committed only after the source commit
                            await self._enqueue(_Batch(pending.events))
                            pending.events = []
                            pending.committed = 0
                            self._spilled_open = True
                        continue
                    if m == 0x42:  # 'B' Begin
                        commit_lsn, commit_ts, xid = unpack_begin(data, 26)
                        in_txn = True
                        own = False
                        if self._txn_up:
                            self._txn_up.clear()
                            self._txn_recheck.clear()
                        # a commit record before the stored one ends at or before it: a replay
                        skip = commit_lsn < self._skip_below
                        if not skip:
                            self._commit_times[commit_lsn] = _copy_time(commit_ts)
                        continue
                    start, _end, _ts = unpack_xlog(data, 1)
                    self._received = max(self._received, start)
                    if m == 0x43:  # 'C' Commit
                        _flags, _lsn, end_lsn, _ts = unpack_commit(data, 26)
                        in_txn = False
                        now = monotonic()
                        last_activity = now
                        if skip:
                            skip = False
                            self.stats.skipped_replays += 1
                            continue
                        if self._txn_recheck:
                            pending.events.extend(self._txn_recheck.values())
                            self._txn_recheck.clear()
                            self._txn_up.clear()
                        spilled = self._spilled_open
                        if len(pending.events) > pending.committed or spilled:
                            self._spilled_open = False
                            pending.committed = len(pending.events)
                            pending.last_end_lsn = end_lsn
                            pending.last_xid = xid
                            pending.transactions += 1
                            if pending.first_commit_at is None:
                                pending.first_commit_at = now
                        elif not pending.transactions and not self._inflight:
                            # nothing of ours in it and nothing unstored before it
                            self._confirmed = max(self._confirmed, end_lsn)
                        if pending.transactions and (
                            pending.committed >= self.batch_rows
                            or spilled
                            or stop.is_set()
                            or now - (pending.first_commit_at or now) >= self.flush_interval
                        ):
                            await self._flush()
                            last_status = monotonic()
                        if stop.is_set():
                            await self._drain()
                            self._send_status()
                            return
                        continue
                    msg = po.decode(data[25:])
                    if isinstance(msg, po.Relation):
                        await self._on_relation(msg)
                    elif isinstance(msg, po.Truncate):
                        if not skip:
                            self._on_truncate(msg, xid, commit_lsn)
                    elif isinstance(msg, po.Message) and msg.prefix == OWN_WRITE_PREFIX:
                        own = msg.transactional and in_txn
                    elif isinstance(msg, po.Message) and msg.prefix == HEARTBEAT_PREFIX:
                        self.stats.heartbeats_received += 1
                        if (
                            not in_txn
                            and not pending.events
                            and not self._inflight
                            and msg.lsn > self._confirmed
                        ):
                            # every commit before the heartbeat is stored: confirm past it
                            self._confirmed = msg.lsn
                            self._send_status()
                            last_status = monotonic()
                    # Type / Origin: nothing to do (types are looked up by OID)
                elif kind == 0x6B:  # 'k' keepalive
                    ka = po.parse_copy_data(data)
                    assert isinstance(ka, po.Keepalive)
                    self._received = max(self._received, ka.wal_end)
                    if not in_txn and not pending.events and not self._inflight:
                        # nothing of ours is in flight: everything before wal_end is handled
                        self._confirmed = max(self._confirmed, ka.wal_end)
                    if ka.reply_requested:
                        self._send_status()
                        last_status = monotonic()
                continue
            if nbytes == -1:
                # libpq: after PQgetCopyData returns -1, PQgetResult gives the COPY's final
                # status, the server's ERROR when it ended the stream with one
                raise _Closed(f"replication stream ended by the server{_server_error(pgconn)}")
            if nbytes < -1:
                raise psycopg.OperationalError("replication stream error")
            # nothing buffered: time-based flush, housekeeping, then wait for the socket
            now = monotonic()
            self._check_writer()
            can_flush = pending.transactions and not (in_txn and self._spilled_open)
            if can_flush and (
                stop.is_set() or now - (pending.first_commit_at or now) >= self.flush_interval
            ):
                await self._flush()
                last_status = monotonic()
                continue
            if stop.is_set() and not pending.transactions:
                await self._drain()
                self._send_status()
                return
            if now - last_status >= self.status_interval:
                self._send_status()
                last_status = now
            if self.origin_filter and now - last_origin_check >= self.origin_check_interval:
                last_origin_check = now
                await self._check_origins()
            if now - last_activity >= self.heartbeat_interval and not in_txn and not pending.events:
                # the captured table is idle: a non-transactional message lets the slot's
                # confirmed position follow the WAL even when other tables are busy
                await self._src.execute(
                    "SELECT pg_logical_emit_message(false, %s, now()::text)", (HEARTBEAT_PREFIX,)
                )
                self.stats.heartbeats += 1
                last_activity = now
            timeout = 0.1
            if pending.first_commit_at is not None:
                timeout = max(
                    0.0, min(timeout, pending.first_commit_at + self.flush_interval - now)
                )
            await _wait_readable(loop, pgconn.socket, timeout)
            pgconn.consume_input()

    async def _check_origins(self) -> None:
        """While filtering by origin: a replication origin that is not the connector's has
        appeared (a subscription created meanwhile): restart the stream without the filter."""
        other = await foreign_origin(self._src)
        if other is None:
            return
        log.warning(
            "a replication origin that is not the connector's appeared while the capture was "
            "filtering by origin: restarting without the filter; source changes written under "
            "it before this check (at most origin_check_interval ago) were skipped by the "
            "server: run `connector verify`",
            extra={"pipeline": self.pipeline.name, "origin": other},
        )
        raise _Closed("foreign replication origin")

    def _send_status(self, *, reply: bool = False) -> None:
        pg = self._repl.pgconn
        msg = po.standby_status(
            max(self._received, self._confirmed), self._confirmed, self._confirmed, reply=reply
        )
        if pg.put_copy_data(msg) != 1:
            raise psycopg.OperationalError("cannot send the standby status update")
        pg.flush()
        self.stats.confirmed_lsn = self._confirmed


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _copy_time(pg_us: int) -> bytes:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as COPY text for timestamptz."""
    return (_PG_EPOCH + timedelta(microseconds=pg_us)).isoformat().encode()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _wait_readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(fd)


def _server_error(pgconn: Any) -> str:
    """``": <the server's message>"`` of the result that ended a COPY stream, or ``""``
    (never blocks: only a result that is already in is read)."""
    try:
        pgconn.consume_input()
        if pgconn.is_busy():
            return ""
        res = pgconn.get_result()
    except psycopg.Error:
        return ""
    if res is None:
        return ""
    text = bytes(res.error_message or b"").decode("utf-8", "replace").strip()
    while not pgconn.is_busy() and pgconn.get_result() is not None:  # drain the results
        pass
    return f": {text}" if text else ""
