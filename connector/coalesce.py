"""Newest version per key among pending changes, with in-flight fencing and batch bookkeeping.

Pure: no I/O, no clock. Ordering of two events of one key is ``ChangeEvent.newer_than``
(connector/events.py); nothing here compares versions or xids itself.

* A newer event replaces the pending one, whatever its op: a delete supersedes earlier changes,
  an insert after a delete is an insert (the CRM side upserts by key, so the newest image is
  all that has to be sent).
* An event that is not newer than what is pending, in flight or acknowledged is dropped; the
  reader batch it came from is then resolved by the entry that superseded it (or at once, if
  the acknowledged stamp already covers it).
* Fencing (DESIGN.md invariant 2): a key that is in flight (an upsert call or a bulk job not yet
  answered) keeps a newer event pending, but ``take`` will not hand that key out again until the
  in-flight entry is completed. So two versions of one key are never on the wire together and
  an older one can never land after a newer one.
* Orphan fences: keys of a bulk job that may still run on the CRM without our knowing its id
  (``fence(keys, tag)``) are not handed out by ``take`` either, until ``unfence(tag)`` (the
  engine decides when: the job's callback or its time bound).
* Backlog: an entry made only of initial-sync (``snapshot``) events has no staleness deadline
  (``live_at is None``); see docs/planner.md.
* ``BatchTracker`` turns "every event of reader batches ≤ b is acknowledged, dead-lettered or
  superseded by one that is" into a number the emitter can checkpoint (invariant 5).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from connector.events import ChangeEvent, EventStamp, Op, stamp_of


@dataclass(slots=True, eq=False)
class PendingEntry:
    """The newest pending event of one key.

    oldest_at: captured_at of the oldest change merged into this entry and not yet sent.
    live_at: the same among live (non-snapshot) changes only: the entry's staleness clock;
        None when the entry holds initial-sync rows only (a backlog without a deadline).
    batches: reader batch numbers whose events were merged into (or superseded by) this entry;
        they are resolved when the entry is acknowledged or dead-lettered.
    """

    key: str
    event: ChangeEvent
    oldest_at: datetime
    batches: set[int] = field(default_factory=set)
    live_at: datetime | None = None


class BatchTracker:
    """Which reader batches are fully resolved.

    A batch is resolved when it was registered with its number of events, that many events of
    it were ``place``d, and no live entry (pending or in flight) still ``hold``s it. Batches
    are registered in increasing order before their events are placed; ``resolved_upto`` is the
    highest batch such that it and every batch registered before it are resolved. Memory is per
    unresolved batch only: a resolved prefix is forgotten.
    """

    __slots__ = ("_batches", "_last_registered", "_resolved_upto")

    def __init__(self) -> None:
        # batch -> [expected events, placed events, holds]; insertion order = number order
        self._batches: dict[int, list[int]] = {}
        self._last_registered: int | None = None
        self._resolved_upto: int | None = None

    def register(self, batch_no: int, events: int) -> None:
        """Declare reader batch ``batch_no`` with its ``events`` events, before adding them."""
        if events < 0:
            raise ValueError("a batch holds a non-negative number of events")
        if self._last_registered is not None and batch_no <= self._last_registered:
            raise ValueError(
                f"batch {batch_no} registered after batch {self._last_registered}; "
                "batch numbers must increase"
            )
        self._last_registered = batch_no
        self._batches[batch_no] = [events, 0, 0]
        self._advance()

    def place(self, batch_no: int) -> None:
        """One event of ``batch_no`` was given to the coalescer."""
        state = self._state(batch_no)
        if state[1] >= state[0]:
            raise ValueError(f"batch {batch_no}: more events placed than registered")
        state[1] += 1
        self._advance()

    def hold(self, batch_no: int) -> None:
        """A live entry now depends on ``batch_no``."""
        self._state(batch_no)[2] += 1

    def release(self, batch_no: int) -> None:
        """A live entry that held ``batch_no`` was acknowledged, dead-lettered or merged."""
        state = self._state(batch_no)
        if state[2] <= 0:
            raise ValueError(f"batch {batch_no} released more often than held")
        state[2] -= 1
        self._advance()

    def is_resolved(self, batch_no: int) -> bool:
        state = self._batches.get(batch_no)
        if state is None:
            return self._resolved_upto is not None and batch_no <= self._resolved_upto
        return _done(state)

    def resolved_upto(self) -> int | None:
        return self._resolved_upto

    def unresolved(self) -> int:
        """Number of registered batches not yet passed by ``resolved_upto``."""
        return len(self._batches)

    def _state(self, batch_no: int) -> list[int]:
        state = self._batches.get(batch_no)
        if state is None:
            raise ValueError(f"batch {batch_no} is not registered (or already resolved)")
        return state

    def _advance(self) -> None:
        batches = self._batches
        while batches:
            first = next(iter(batches))
            if not _done(batches[first]):
                return
            del batches[first]
            self._resolved_upto = first


def _done(state: list[int]) -> bool:
    expected, placed, holds = state
    return expected >= 0 and placed == expected and holds == 0


class Coalescer:
    """Pending changes of one pipeline, newest per key.

    Memory per pending key: one ``PendingEntry`` (the event itself, a timestamp, a small set of
    batch numbers) plus, for keys seen before, the acknowledged ``EventStamp``. Acknowledged
    stamps of keys no longer pending are a cache of ``key_state``: the owner bounds it with
    ``trim_acked`` (otherwise it would grow with every key ever sent).
    """

    def __init__(self, tracker: BatchTracker | None = None) -> None:
        self.tracker = tracker if tracker is not None else BatchTracker()
        self._pending: dict[str, PendingEntry] = {}
        self._in_flight: dict[str, PendingEntry] = {}
        self._acked: dict[str, EventStamp] = {}
        self._heap: list[tuple[datetime, int, PendingEntry]] = []
        self._seq = itertools.count()
        self._fenced: dict[str, set[int]] = {}
        self._fence_keys: dict[int, list[str]] = {}

    # -- input ------------------------------------------------------------------------------
    def add(self, event: ChangeEvent, batch: int) -> bool:
        """Merge ``event`` (from reader batch ``batch``). True if it became the pending version
        of its key; False if something pending, in flight or acknowledged is newer (the batch
        is then resolved together with that)."""
        accepted = self._merge(event, batch)
        self.tracker.place(batch)  # after any hold, so the batch cannot resolve in between
        return accepted

    def _merge(self, event: ChangeEvent, batch: int) -> bool:
        newest, entry, live = self._standing(event)
        if not newest:
            if live is not None:  # as new as the event: the batch resolves with it
                self._attach(live, batch, event)
            return False
        if entry is None:
            entry = self._open(event)
        else:
            entry.event = event
        self._attach(entry, batch, event)
        return True

    def add_ahead(self, event: ChangeEvent) -> bool:
        """Merge a row read *ahead* of the reader (catch-up after a restart, issue 14): a key's
        newest committed version, at a position the reader has not passed yet. It becomes the
        key's pending version like ``add``, but holds no reader batch: the batches of the older
        versions it supersedes are released at once, because the row lies ahead of them — a
        checkpoint past them still re-reads it — and the batch the reader later reads it in
        holds it as usual (``add`` attaches it to this entry, or drops it once acknowledged).
        So a catch-up never waits for versions that arrive while it runs. True if it became
        the pending version."""
        newest, entry, _ = self._standing(event)
        if not newest:
            return False
        if entry is None:
            self._open(event)
            return True
        entry.event = event  # oldest_at / live_at stay: the CRM is stale since the oldest
        if event.op is not Op.SNAPSHOT and entry.live_at is None:
            entry.live_at = event.captured_at
        for b in entry.batches:
            self.tracker.release(b)
        entry.batches.clear()
        return True

    def set_acked(self, key: str, stamp: EventStamp | None) -> None:
        """What key_state says was last acknowledged for ``key`` (None: nothing)."""
        if stamp is None:
            self._acked.pop(key, None)
        else:
            self._acked[key] = stamp

    def acked(self, key: str) -> EventStamp | None:
        return self._acked.get(key)

    def forget_acked(self, keys: Iterable[str]) -> None:
        """Drop acknowledged stamps kept in memory (they stay in key_state); the caller must
        ``set_acked`` them again before adding events of those keys."""
        for key in keys:
            self._acked.pop(key, None)

    def acked_size(self) -> int:
        """Number of acknowledged stamps held in memory."""
        return len(self._acked)

    def trim_acked(self, keep: int) -> int:
        """Forget the least recently acknowledged stamps beyond ``keep`` (they stay in
        key_state, which is written before ``complete``; the engine reloads a forgotten key's
        stamp before it adds an event of that key). Stamps of keys pending or in flight are
        kept: ``complete(acked=False)`` compares against them. Returns how many were dropped."""
        excess = len(self._acked) - keep
        if excess <= 0:
            return 0
        drop: list[str] = []
        for key in self._acked:
            if len(drop) >= excess:
                break
            if key not in self._pending and key not in self._in_flight:
                drop.append(key)
        for key in drop:
            del self._acked[key]
        return len(drop)

    # -- views ------------------------------------------------------------------------------
    def pending(self) -> Mapping[str, PendingEntry]:
        """Pending entries by key (in flight ones excluded unless a newer version is pending)."""
        return MappingProxyType(self._pending)

    def in_flight(self) -> Set[str]:
        return self._in_flight.keys()

    # -- orphan fences ----------------------------------------------------------------------
    def fence(self, keys: Iterable[str], tag: int) -> None:
        """Hold ``keys`` back (``take`` skips them) until ``unfence(tag)``: a bulk job that may
        still write older versions of them on the CRM (``tag`` = its bulk_jobs id)."""
        if tag in self._fence_keys:
            return
        listed = list(dict.fromkeys(keys))
        self._fence_keys[tag] = listed
        for key in listed:
            self._fenced.setdefault(key, set()).add(tag)

    def unfence(self, tag: int) -> list[str]:
        """Release the keys fenced under ``tag``; returns those no longer fenced at all."""
        freed: list[str] = []
        for key in self._fence_keys.pop(tag, []):
            tags = self._fenced.get(key)
            if tags is None:
                continue
            tags.discard(tag)
            if not tags:
                del self._fenced[key]
                freed.append(key)
        return freed

    def fenced(self) -> Set[str]:
        return self._fenced.keys()

    def fence_tags(self) -> list[int]:
        return list(self._fence_keys)

    def __len__(self) -> int:
        """Number of pending entries (not counting those in flight)."""
        return len(self._pending)

    def __iter__(self) -> Iterator[PendingEntry]:
        return iter(self._pending.values())

    def oldest_at(self) -> datetime | None:
        """The oldest ``oldest_at`` among pending entries."""
        heap = self._heap
        while heap:
            at, _, entry = heap[0]
            if self._pending.get(entry.key) is entry and entry.oldest_at == at:
                return at
            heapq.heappop(heap)
        return None

    # -- sending ----------------------------------------------------------------------------
    def take(self, keys: Iterable[str]) -> list[PendingEntry]:
        """Remove the pending entries of ``keys`` for sending; they are in flight until
        ``complete``. Keys not pending, or already in flight, are skipped (fencing)."""
        out: list[PendingEntry] = []
        for key in keys:
            if key in self._in_flight or key in self._fenced:
                continue
            entry = self._pending.pop(key, None)
            if entry is None:
                continue
            self._in_flight[key] = entry
            out.append(entry)
        self._compact()
        return out

    def complete(self, entries: Iterable[PendingEntry], acked: bool) -> None:
        """After the CRM acknowledged ``entries`` (or they were dead-lettered): ``acked=True``
        records their stamps and resolves their batches. ``acked=False`` (not delivered, to be
        retried): each entry is pending again, or folded into a newer pending entry of its key
        that arrived meanwhile (which then carries its batches and its older ``oldest_at``)."""
        for entry in entries:
            key = entry.key
            if self._in_flight.get(key) is entry:
                del self._in_flight[key]
            if acked:
                prev = self._acked.pop(key, None)  # re-inserted last: most recently acked
                if prev is None or entry.event.newer_than(prev):
                    prev = stamp_of(entry.event)
                self._acked[key] = prev
                for b in entry.batches:
                    self.tracker.release(b)
                entry.batches.clear()
                continue
            newer = self._pending.get(key)
            prev = self._acked.get(key)
            if newer is None and prev is not None and not entry.event.newer_than(prev):
                # something acknowledged meanwhile covers it (set_acked from elsewhere)
                for b in entry.batches:
                    self.tracker.release(b)
                entry.batches.clear()
            elif newer is None:
                self._pending[key] = entry
                self._push(entry)
            else:
                for b in entry.batches:
                    if b in newer.batches:
                        self.tracker.release(b)
                    else:
                        newer.batches.add(b)
                entry.batches.clear()
                if entry.live_at is not None and (
                    newer.live_at is None or entry.live_at < newer.live_at
                ):
                    newer.live_at = entry.live_at
                if entry.oldest_at < newer.oldest_at:
                    newer.oldest_at = entry.oldest_at
                    self._push(newer)

    # -- internals --------------------------------------------------------------------------
    def _standing(
        self, event: ChangeEvent
    ) -> tuple[bool, PendingEntry | None, PendingEntry | None]:
        """The checks ``add`` and ``add_ahead`` share: ``(newest, entry, live)``. ``newest``:
        ``event`` is newer than the key's acknowledged version and than its pending or
        in-flight entry. ``entry``: the key's pending entry; ``live``: that entry, else the
        key's in-flight one. When the acknowledged version is as new, both are None (nothing
        to merge into)."""
        key = event.key
        acked = self._acked.get(key)
        if acked is not None and not event.newer_than(acked):
            return False, None, None
        entry = self._pending.get(key)
        live = entry if entry is not None else self._in_flight.get(key)
        if live is not None and not event.newer_than(live.event):
            return False, entry, live
        return True, entry, live

    def _open(self, event: ChangeEvent) -> PendingEntry:
        """A new pending entry for ``event``'s key, holding no batch yet."""
        entry = PendingEntry(event.key, event, event.captured_at)
        if event.op is not Op.SNAPSHOT:
            entry.live_at = event.captured_at
        self._pending[event.key] = entry
        self._push(entry)
        return entry

    def _attach(self, entry: PendingEntry, batch: int, event: ChangeEvent) -> None:
        if batch not in entry.batches:
            entry.batches.add(batch)
            self.tracker.hold(batch)
        captured_at = event.captured_at
        if event.op is not Op.SNAPSHOT and (entry.live_at is None or captured_at < entry.live_at):
            entry.live_at = captured_at
        if captured_at < entry.oldest_at:
            entry.oldest_at = captured_at
            if self._pending.get(entry.key) is entry:
                self._push(entry)

    def _push(self, entry: PendingEntry) -> None:
        heapq.heappush(self._heap, (entry.oldest_at, next(self._seq), entry))

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._pending) + 64:
            self._heap = [(e.oldest_at, next(self._seq), e) for e in self._pending.values()]
            heapq.heapify(self._heap)
