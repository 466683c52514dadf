"""The logical capture consumer's data: statistics, per-relation codecs, events, the pending
rows of the stream and the batches handed to the outbox writer."""

from __future__ import annotations

from dataclasses import dataclass, field

from connector.capture import pgoutput as po
from connector.capture import values as vals

# ---------------------------------------------------------------------------------------------
# the consumer
# ---------------------------------------------------------------------------------------------

_TOAST = 1
_SERVER = 2
_RECHECK = 3  # the key's row at the end of the transaction is read from the table
_MISSING_KEY = "missing_key"  # _Event.op of a row whose key is NULL: a dead letter, not a row


@dataclass
class CaptureStats:
    events: int = 0  # outbox rows committed
    transactions: int = 0  # source transactions whose rows are committed
    outbox_commits: int = 0
    skipped_replays: int = 0  # source transactions dropped as already stored
    toast_cache_hits: int = 0
    toast_fetches: int = 0
    toast_missing: int = 0  # unchanged TOAST value whose row had gone (written as null)
    truncates: int = 0
    heartbeats: int = 0  # heartbeat messages sent
    heartbeats_received: int = 0  # ... and seen coming back through the slot
    reconnects: int = 0
    last_commit_lsn: int = 0
    confirmed_lsn: int = 0


@dataclass
class _Codec:
    """Per-Relation: converters and JSON key prefixes chosen once."""

    relation: po.Relation
    convs: list[vals.Converter]
    prefixes: list[str]
    names: list[str]
    key_idx: int
    key_cols: list[int]
    ignored: frozenset[int] = frozenset()
    varlen: tuple[int, ...] = ()  # columns of types that can be TOASTed
    encode: vals.RowEncoder | None = None  # fused decode + convert of a whole tuple
    heads: dict[str, bytes] = field(default_factory=dict)  # op -> b"\t<pipeline>\t<op>\t"
    head_insert: bytes = b""
    head_update: bytes = b""
    deferrable: bool = False  # the key's unique constraint is DEFERRABLE


@dataclass
class _Event:
    op: str
    key: str
    frags: list[str | None]  # None: column left out (key-only delete image)
    xid: int
    commit_lsn: int
    codec: _Codec
    deferred: list[tuple[int, int, str]] | None = None  # (column, kind, text for _SERVER)
    image: str | None = None  # the whole JSON image, read from the table (_RECHECK)


_Row = tuple[bytes, bytes, int, int, bytes]
"""A row ready for COPY (the fast path): ``(head, body, xid, commit_lsn, raw key)``; ``head``
is ``\\t<pipeline>\\t<op>\\t<key>\\t`` and ``body`` the JSON image, both COPY-escaped."""


@dataclass
class _Pending:
    events: list[_Event | _Row] = field(default_factory=list)
    committed: int = 0  # events[:committed] belong to committed source transactions
    last_end_lsn: int = 0
    last_xid: int = 0
    transactions: int = 0
    first_commit_at: float | None = None


@dataclass
class _Batch:
    """One unit of work for the writer task: rows to COPY, and, when ``end_lsn`` is set, the
    commit of the outbox transaction (with capture_state) after them."""

    events: list[_Event | _Row]
    end_lsn: int = 0
    xid: int = 0
    transactions: int = 0


class _Closed(Exception):
    """The server ended the replication stream."""
