"""The decoding helpers of ``LogicalCapture``: a pgoutput Relation becomes a codec, row and
TRUNCATE messages become outbox events (values converted, unchanged TOAST values completed from
a bounded cache or deferred to the writer, deferrable keys and NULL keys handled)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import psycopg

from connector.capture import pgoutput as po
from connector.capture import values as vals
from connector.capture.logical.admin import _key
from connector.capture.logical.model import (
    _MISSING_KEY,
    _RECHECK,
    _SERVER,
    _TOAST,
    CaptureStats,
    _Codec,
    _Event,
    _Pending,
)
from connector.config import PipelineConfig
from connector.errors import PermanentError

# one logger for the package: log lines keep the name they had before the split
log = logging.getLogger("connector.capture.logical")

TOAST_CANDIDATE = 1000  # characters of a JSON fragment worth keeping for unchanged-TOAST fills


class _Decoder:
    """Mixed into ``LogicalCapture`` (stream.py), which sets these attributes."""

    pipeline: PipelineConfig
    stats: CaptureStats
    toast_cache_bytes: int
    _types: vals.TypeRegistry
    _toast: OrderedDict[str, dict[int, str]]
    _toast_bytes: int
    _txn_up: set[str]
    _txn_recheck: dict[str, _Event]
    _codecs: dict[int, _Codec]
    _src: psycopg.AsyncConnection[Any]
    _pending: _Pending

    # -- decoding helpers ---------------------------------------------------------------------
    async def _on_relation(self, rel: po.Relation) -> None:
        schema, table = self.pipeline.table_parts
        if (rel.namespace or "pg_catalog") != schema or rel.name != table:
            return
        oids = [c.type_oid for c in rel.columns]
        missing = self._types.missing(oids)
        while missing:
            await self._lookup_types(missing)
            missing = self._types.missing(oids)
        names = [c.name for c in rel.columns]
        if self.pipeline.key_column not in names:
            raise PermanentError(
                f"{_key(self.pipeline, 'key_column')}: column {self.pipeline.key_column!r} "
                f"is no longer in {self.pipeline.source_table!r}"
            )
        convs = [self._types.converter(o) for o in oids]
        key_idx = names.index(self.pipeline.key_column)
        varlen = tuple(i for i, o in enumerate(oids) if o not in vals.FIXED_LENGTH)
        pipe = vals.copy_escape(self.pipeline.name.encode())
        codec = _Codec(
            relation=rel,
            convs=convs,
            prefixes=[vals.dumps_str(n) + ":" for n in names],
            names=names,
            key_idx=key_idx,
            key_cols=[i for i, c in enumerate(rel.columns) if c.is_key],
            varlen=varlen,
            ignored=frozenset(i for i, n in enumerate(names) if n in self.pipeline.ignore_columns),
            encode=vals.row_encoder(
                names, oids, convs, key_idx=key_idx, varlen=frozenset(varlen), big=TOAST_CANDIDATE
            ),
            heads={
                op: b"\t" + pipe + b"\t" + op.encode() + b"\t"
                for op in ("insert", "update", "delete")
            },
        )
        codec.head_insert = codec.heads["insert"]
        codec.head_update = codec.heads["update"]
        cur = await self._src.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c"
            " JOIN pg_catalog.pg_attribute a"
            "  ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)"
            " WHERE c.conrelid = %s AND c.contype IN ('p', 'u') AND c.condeferrable"
            " AND a.attname = %s)",
            (rel.oid, self.pipeline.key_column),
        )
        found = await cur.fetchone()
        if found is not None and found[0]:
            # another row of a transaction can hold a key before this row leaves it: events
            # go through _on_row, which tracks that (the fast path does not)
            codec.deferrable = True
            codec.encode = None
        self._codecs[rel.oid] = codec
        # a new Relation may change column positions or types: cached images are stale
        self._toast.clear()
        self._toast_bytes = 0

    async def _lookup_types(self, oids: list[int]) -> None:
        cur = await self._src.execute(
            "SELECT t.oid, t.typtype, t.typbasetype, t.typelem,"
            " (t.typelem <> 0 AND t.typsubscript = 'array_subscript_handler'::regproc),"
            " coalesce(e.typdelim, ','), format_type(t.oid, NULL), t.typrelid,"
            " (t.oid >= 16384 AND EXISTS (SELECT 1 FROM pg_cast c WHERE c.castsource = t.oid"
            "  AND c.casttarget = 'json'::regtype AND c.castmethod = 'f'))"
            " FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid = ANY(%s)",
            (oids,),
        )
        found = set()
        for (
            oid,
            typtype,
            base,
            elem,
            is_array,
            delim,
            name,
            _relid,
            castjson,
        ) in await cur.fetchall():
            found.add(oid)
            if typtype == "d":
                info = vals.TypeInfo(oid, base, sql_name=name)
            elif is_array:
                info = vals.TypeInfo(oid, oid, elem=elem, delim=delim, sql_name=name)
            elif typtype == "c" or oid == vals.RECORD:
                info = vals.TypeInfo(oid, oid, category="composite", sql_name=name)
            elif castjson:
                info = vals.TypeInfo(oid, oid, category="castjson", sql_name=name)
            else:
                info = vals.TypeInfo(oid, oid, category="other", sql_name=name)
            self._types.add(info)
        for oid in oids:
            if oid not in found:
                raise PermanentError(f"type OID {oid} of {self.pipeline.source_table!r} is unknown")

    def _convert(
        self, codec: _Codec, tup: list[po.Value], key: str, old: list[po.Value] | None
    ) -> tuple[list[str | None], list[tuple[int, int, str]] | None]:
        if po.UNCHANGED not in tup:
            try:  # fast path: every value sent, every type convertible from its text
                return [
                    "null" if raw is None else conv(raw.decode())  # type: ignore[union-attr]
                    for conv, raw in zip(codec.convs, tup, strict=True)
                ], None
            except vals.NeedsServer:
                pass
        frags: list[str | None] = []
        deferred: list[tuple[int, int, str]] | None = None
        convs = codec.convs
        cached: dict[int, str] | None = None
        for i, raw in enumerate(tup):
            if raw is None:
                frags.append("null")
            elif raw is po.UNCHANGED:
                val: str | None = None
                raw_old = old[i] if old is not None else None
                if isinstance(raw_old, bytes):
                    more: list[tuple[int, int, str]] = []
                    val = self._conv1(convs[i], raw_old, i, more)
                    if more:
                        deferred = (deferred or []) + more
                if val is None:
                    if cached is None:
                        cached = self._toast.get(key, {})
                    val = cached.get(i)
                    if val is not None:
                        self.stats.toast_cache_hits += 1
                if val is None:
                    deferred = deferred or []
                    deferred.append((i, _TOAST, ""))
                    frags.append("null")
                else:
                    frags.append(val)
            else:
                assert isinstance(raw, bytes)
                try:
                    frags.append(convs[i](raw.decode()))
                except vals.NeedsServer:
                    deferred = deferred or []
                    deferred.append((i, _SERVER, raw.decode()))
                    frags.append("null")
        return frags, deferred

    @staticmethod
    def _conv1(
        conv: vals.Converter, raw: bytes, i: int, deferred: list[tuple[int, int, str]]
    ) -> str | None:
        try:
            return conv(raw.decode())
        except vals.NeedsServer:
            deferred.append((i, _SERVER, raw.decode()))
            return "null"

    def _remember(self, codec: _Codec, key: str, frags: list[str | None]) -> None:
        """Keep the large values of the latest image of ``key`` (bounded LRU by bytes) so that
        a later update that leaves them TOASTed and unchanged can be completed exactly.

        Only variable-length columns whose value is over ``TOAST_CANDIDATE`` characters: a
        value is moved out of line only when the row exceeds ~2 kB; a smaller out-of-line value
        (possible in very wide rows) is completed from the source row instead."""
        if self._toast:
            old = self._toast.pop(key, None)
            if old is not None:
                self._toast_bytes -= sum(len(v) for v in old.values())
        entry = None
        for i in codec.varlen:
            f = frags[i]
            if f is not None and len(f) > TOAST_CANDIDATE:
                if entry is None:
                    entry = {}
                entry[i] = f
        if entry is None:
            return
        size = sum(len(v) for v in entry.values())
        if size > self.toast_cache_bytes:
            return
        self._toast[key] = entry
        self._toast_bytes += size
        while self._toast_bytes > self.toast_cache_bytes and self._toast:
            _, ev = self._toast.popitem(last=False)
            self._toast_bytes -= sum(len(v) for v in ev.values())

    def _forget(self, key: str) -> None:
        old = self._toast.pop(key, None)
        if old is not None:
            self._toast_bytes -= sum(len(v) for v in old.values())

    def _on_row(  # noqa: PLR0917
        self,
        op: str,
        codec: _Codec,
        new: list[po.Value] | None,
        old: list[po.Value] | None,
        old_kind: str | None,
        xid: int,
        commit_lsn: int,
    ) -> None:
        ki = codec.key_idx
        events = self._pending.events
        if new is None:  # delete
            assert old is not None
            raw_key = old[ki]
            if not isinstance(raw_key, bytes):
                log.warning("delete without a key value", extra={"pipeline": self.pipeline.name})
                return
            key = raw_key.decode()
            if old_kind == "K":
                only = set(codec.key_cols)
                img: list[po.Value] = [v if i in only else None for i, v in enumerate(old)]
                frags, deferred = self._convert(codec, img, key, None)
                frags = [f if i in only else None for i, f in enumerate(frags)]
            else:
                frags, deferred = self._convert(codec, old, key, None)
            self._forget(key)
            gone = _Event("delete", key, frags, xid, commit_lsn, codec, deferred)
            events.append(gone)
            if codec.deferrable:
                self._note_leave(gone)
            return
        raw_key = new[ki]
        if not isinstance(raw_key, bytes):
            self._on_missing_key(codec, new, old, old_kind, xid, commit_lsn)
            return
        key = raw_key.decode()
        if old is not None and isinstance(old[ki], bytes) and old[ki] != raw_key:
            # the key itself changed: the old key is gone
            old_key = old[ki]
            assert isinstance(old_key, bytes)
            ok = old_key.decode()
            only = set(codec.key_cols) if old_kind == "K" else set(range(len(old)))
            ofr, odef = self._convert(
                codec, [v if i in only else None for i, v in enumerate(old)], ok, None
            )
            ofr = [f if i in only else None for i, f in enumerate(ofr)]
            cached = self._toast.get(ok)
            if cached is not None:
                self._toast[key] = cached
                self._toast.pop(ok, None)
            left = _Event("delete", ok, ofr, xid, commit_lsn, codec, odef)
            events.append(left)
            if codec.deferrable:
                self._note_leave(left)
            op = "insert"  # as trigger mode: a key change is a delete plus an insert
        elif old is not None and old[ki] is None:
            op = "insert"  # the key was NULL (a dead letter so far): the row appears, as in
            # trigger mode
        frags, deferred = self._convert(codec, new, key, old if old_kind == "O" else None)
        if op == "update" and old_kind == "O" and old is not None and not deferred:
            # REPLICA IDENTITY FULL gives the old image: skip no-op updates (as trigger mode)
            ofr2, odef2 = self._convert(codec, old, key, None)
            ignored = codec.ignored
            if not odef2 and all(
                a == b or i in ignored for i, (a, b) in enumerate(zip(frags, ofr2, strict=True))
            ):
                return
        self._remember(codec, key, frags)
        events.append(_Event(op, key, frags, xid, commit_lsn, codec, deferred))
        if codec.deferrable:
            self._txn_up.add(key)

    def _note_leave(self, ev: _Event) -> None:
        """A row left key ``ev.key`` (DELETE or key change). Under a DEFERRABLE key, another row
        of the same transaction may already hold that key (``SET id = id + 1`` in ascending
        order, a swap): when this transaction inserted or updated the key before, the key's
        row is re-read at commit and its image (or a delete when there is none) is the
        transaction's last event for the key (issue 14 §4: the delete used to win). The read
        is at capture time, so it may carry a later transaction's image: later events of the
        key follow it, as for unchanged TOAST values."""
        if ev.key in self._txn_up:
            self._txn_recheck[ev.key] = _Event(
                "delete",
                ev.key,
                list(ev.frags),
                ev.xid,
                ev.commit_lsn,
                ev.codec,
                [*(ev.deferred or []), (ev.codec.key_idx, _RECHECK, "")],
            )

    def _on_missing_key(  # noqa: PLR0917
        self,
        codec: _Codec,
        new: list[po.Value],
        old: list[po.Value] | None,
        old_kind: str | None,
        xid: int,
        commit_lsn: int,
    ) -> None:
        """A row whose key column is NULL: contained as a ``MISSING_KEY`` dead letter, written
        in the outbox transaction of its batch (invariant 8). When the key was set before
        (an update to NULL), the old key is gone from the source: a delete, as for a key
        change. Unchanged TOAST values of the image are not fetched (there is no key to fetch
        them by) and stay null in the payload."""
        ki = codec.key_idx
        events = self._pending.events
        raw_old = old[ki] if old is not None else None
        if isinstance(raw_old, bytes):
            assert old is not None
            ok = raw_old.decode()
            only = set(codec.key_cols) if old_kind == "K" else set(range(len(old)))
            ofr, odef = self._convert(
                codec, [v if i in only else None for i, v in enumerate(old)], ok, None
            )
            ofr = [f if i in only else None for i, f in enumerate(ofr)]
            self._forget(ok)
            events.append(_Event("delete", ok, ofr, xid, commit_lsn, codec, odef))
        image = [None if v is po.UNCHANGED else v for v in new]
        frags, deferred = self._convert(codec, image, "", None)
        events.append(_Event(_MISSING_KEY, "", frags, xid, commit_lsn, codec, deferred))

    def _on_truncate(self, msg: po.Truncate, xid: int, commit_lsn: int) -> None:
        """A TRUNCATE of the source table becomes one ``truncate`` outbox event (key '', no
        image) in its place in the stream; the pipeline decides what it means for the CRM
        (``on_truncate``, connector/truncate.py, which also logs it)."""
        if any(r in self._codecs for r in msg.relations):
            self.stats.truncates += 1
            self._toast.clear()
            self._toast_bytes = 0
            head = b"\t" + vals.copy_escape(self.pipeline.name.encode()) + b"\ttruncate\t\t"
            self._pending.events.append((head, b"\\N", xid, commit_lsn, b""))
