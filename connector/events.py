"""The event model shared by capture, the outbox reader, the coalescer and the emitter.

Pure: no I/O. See docs/architecture.md for the ordering rules.

Ordering of two events for the same key (``newer_than``):

* live vs live: by ``version`` (drawn after the row lock in trigger mode, or in commit order by
  the single logical-mode writer), never by xid;
* a snapshot event carries the PostgreSQL snapshot its chunk was read in. A live event is older
  than the snapshot row iff its source transaction is visible in that snapshot;
* snapshot vs snapshot: by ``version`` (a later chunk read of the same key is newer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Op(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    SNAPSHOT = "snapshot"
    TRUNCATE = "truncate"  # the whole table (key ''): never coalesced, see connector/truncate.py


@dataclass(frozen=True, slots=True)
class SnapshotVisibility:
    """A PostgreSQL ``pg_snapshot``: xmin, xmax and the in-progress xids between them."""

    xmin: int
    xmax: int
    xip: frozenset[int] = field(default_factory=frozenset)

    def is_visible(self, xid: int) -> bool:
        """Same rule as ``pg_visible_in_snapshot`` for a transaction that committed."""
        if xid < self.xmin:
            return True
        if xid >= self.xmax:
            return False
        return xid not in self.xip

    @classmethod
    def parse(cls, text: str) -> SnapshotVisibility:
        """Parse the text form of ``pg_snapshot``: ``xmin:xmax:xip1,xip2``."""
        xmin_s, xmax_s, xip_s = text.split(":")
        xip = frozenset(int(x) for x in xip_s.split(",") if x)
        return cls(int(xmin_s), int(xmax_s), xip)

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row of the outbox.

    offset: outbox id (position in the log, not an order between keys).
    version: per-key order for live events (see module docstring).
    source_xid: the legacy transaction's xid8 (for ordering against snapshot chunks).
    row: full row image as JSON-compatible values keyed by column name; for deletes the old
        image (with REPLICA IDENTITY DEFAULT in logical mode only the key columns).
    snapshot: the visibility of the chunk's snapshot, for op == SNAPSHOT only.
    """

    offset: int
    pipeline: str
    op: Op
    key: str
    version: int
    source_xid: int
    row: dict[str, Any] | None
    captured_at: datetime
    snapshot: SnapshotVisibility | None = None

    @property
    def is_delete(self) -> bool:
        return self.op is Op.DELETE

    def newer_than(self, other: ChangeEvent | EventStamp) -> bool:
        return stamp_of(self).newer_than(
            other if isinstance(other, EventStamp) else stamp_of(other)
        )


@dataclass(frozen=True, slots=True)
class EventStamp:
    """What must be remembered of an event to order it against later ones (kept in key_state)."""

    version: int
    source_xid: int
    snapshot: SnapshotVisibility | None = None

    def newer_than(self, other: EventStamp) -> bool:
        if self.snapshot is None and other.snapshot is not None:
            # live vs snapshot row: newer iff not visible in the chunk's snapshot
            return not other.snapshot.is_visible(self.source_xid)
        if self.snapshot is not None and other.snapshot is None:
            return self.snapshot.is_visible(other.source_xid) and not (
                self.version == other.version and self.source_xid == other.source_xid
            )
        return self.version > other.version


def stamp_of(event: ChangeEvent) -> EventStamp:
    return EventStamp(event.version, event.source_xid, event.snapshot)
