"""Coalescer and BatchTracker: examples and a model-based hypothesis property."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.coalesce import BatchTracker, Coalescer, PendingEntry
from connector.events import ChangeEvent, EventStamp, Op, SnapshotVisibility, stamp_of

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def ev(
    key: str,
    version: int,
    op: Op = Op.UPDATE,
    *,
    xid: int | None = None,
    at: int = 0,
    snap: SnapshotVisibility | None = None,
) -> ChangeEvent:
    return ChangeEvent(
        offset=version,
        pipeline="p",
        op=op,
        key=key,
        version=version,
        source_xid=version if xid is None else xid,
        row={"id": key, "v": version},
        captured_at=T0 + timedelta(seconds=at if at else version),
        snapshot=snap,
    )


def _coal(*batches: int) -> Coalescer:
    c = Coalescer()
    for b in batches:
        c.tracker.register(b, 100)
    return c


def test_newest_wins_and_delete_supersedes() -> None:
    c = Coalescer()
    c.tracker.register(1, 4)
    assert c.add(ev("a", 1, Op.INSERT), 1)
    assert c.add(ev("a", 3), 1)
    assert not c.add(ev("a", 2), 1)  # late commit of an older version
    assert c.add(ev("a", 4, Op.DELETE), 1)
    entry = c.pending()["a"]
    assert entry.event.version == 4 and entry.event.op is Op.DELETE
    assert entry.oldest_at == T0 + timedelta(seconds=1)
    assert entry.batches == {1}
    assert len(c) == 1


def test_insert_after_delete_is_an_insert() -> None:
    c = _coal(1)
    c.add(ev("a", 1, Op.DELETE), 1)
    c.add(ev("a", 2, Op.INSERT), 1)
    assert c.pending()["a"].event.op is Op.INSERT


def test_acked_stamp_filters_replays() -> None:
    c = _coal(1, 2)
    c.set_acked("a", EventStamp(10, 10))
    assert not c.add(ev("a", 9), 1)
    assert "a" not in c.pending()
    assert c.tracker.resolved_upto() is None  # batch 1 registered 100 events, 1 placed
    assert c.add(ev("a", 11), 2)
    assert c.acked("a") == EventStamp(10, 10)


def test_snapshot_row_against_live_events() -> None:
    # chunk read in snapshot 100:105:{102}: xid 101 committed before, 102 and 105 after
    snap = SnapshotVisibility(100, 105, frozenset({102}))
    c = _coal(1)
    assert c.add(ev("a", 1, xid=101), 1)
    assert c.add(ev("a", 50, Op.SNAPSHOT, xid=99, snap=snap), 1)  # newer than xid 101
    assert not c.add(ev("a", 2, xid=101), 1)  # visible in the snapshot: older
    assert c.add(ev("a", 3, xid=102), 1)  # in progress at the snapshot: newer
    assert c.pending()["a"].event.version == 3


def test_fencing_in_flight_key_not_taken_twice() -> None:
    c = _coal(1, 2)
    c.add(ev("a", 1), 1)
    c.add(ev("b", 2), 1)
    sent = c.take(["a", "b"])
    assert {e.key for e in sent} == {"a", "b"}
    assert set(c.in_flight()) == {"a", "b"}
    assert c.add(ev("a", 3), 2)  # newer while in flight: pending, fenced
    assert "a" in c.pending()
    assert c.take(["a"]) == []
    assert not c.add(ev("a", 1), 2)  # older than the in-flight one: resolved with it
    c.complete([e for e in sent if e.key == "a"], acked=True)
    assert c.acked("a") == stamp_of(ev("a", 1))
    again = c.take(["a"])
    assert [e.event.version for e in again] == [3]


def test_failed_entry_folds_into_newer_pending() -> None:
    c = _coal(1, 2)
    c.add(ev("a", 1, at=5), 1)
    (entry,) = c.take(["a"])
    c.add(ev("a", 2, at=30), 2)
    c.complete([entry], acked=False)
    merged = c.pending()["a"]
    assert merged.event.version == 2
    assert merged.oldest_at == T0 + timedelta(seconds=5)  # the older change is still unsent
    assert merged.batches == {1, 2}
    assert c.oldest_at() == T0 + timedelta(seconds=5)


def test_failed_entry_comes_back() -> None:
    c = _coal(1)
    c.add(ev("a", 1), 1)
    (entry,) = c.take(["a"])
    assert len(c) == 0 and c.oldest_at() is None
    c.complete([entry], acked=False)
    assert c.pending()["a"] is entry and not c.in_flight()


def test_batch_tracker_resolves_in_order() -> None:
    c = Coalescer()
    c.tracker.register(1, 2)
    c.add(ev("a", 1), 1)
    c.add(ev("b", 2), 1)
    c.tracker.register(2, 1)
    c.add(ev("c", 3), 2)
    c.tracker.register(3, 0)  # an empty read
    (ec,) = c.take(["c"])
    c.complete([ec], acked=True)
    assert c.tracker.is_resolved(2)
    assert c.tracker.resolved_upto() is None  # batch 1 still holds a and b
    ea, eb = c.take(["a", "b"])
    c.complete([ea], acked=True)
    assert c.tracker.resolved_upto() is None
    c.complete([eb], acked=True)
    assert c.tracker.resolved_upto() == 3
    assert c.tracker.unresolved() == 0


def test_batch_tracker_misuse() -> None:
    t = BatchTracker()
    t.register(5, 1)
    with pytest.raises(ValueError):
        t.register(5, 1)
    with pytest.raises(ValueError):
        t.place(6)
    t.place(5)
    with pytest.raises(ValueError):
        t.place(5)
    assert t.resolved_upto() == 5
    with pytest.raises(ValueError):
        t.release(5)


# -- model-based property ------------------------------------------------------------------

KEYS = ["a", "b", "c"]

op_strategy = st.one_of(
    st.tuples(
        st.just("commit"), st.sampled_from(KEYS), st.sampled_from(list(Op)[:3]), st.integers(0, 3)
    ),
    st.tuples(st.just("snapshot"), st.sampled_from(KEYS)),
    st.tuples(st.just("deliver"), st.lists(st.integers(0, 50), min_size=0, max_size=4)),
    st.tuples(st.just("take"), st.lists(st.sampled_from(KEYS), max_size=3)),
    st.tuples(st.just("complete"), st.integers(0, 10), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_strategy, max_size=60))
def test_coalescer_model(ops: list[tuple[object, ...]]) -> None:
    """Transactions start in one order (their xids) and commit in another; snapshot rows are
    read in snapshots consistent with that commit order; events are delivered in any order.
    The newest known version of a key (pending, else in flight, else acknowledged) is always
    the newest delivered one by the true order; in-flight keys are never handed out twice; the
    checkpoint never passes a batch that has an event not covered by an acknowledged version."""
    c = Coalescer()
    rank: dict[int, tuple[float, int]] = {}  # offset -> true order within its key
    events: list[ChangeEvent] = []
    undelivered: list[ChangeEvent] = []
    committed_xids: list[int] = []
    started_not_committed: set[int] = set()
    next_xid = 1000
    counter = 0
    delivered_newest: dict[str, ChangeEvent] = {}
    acked_rank: dict[str, tuple[float, int]] = {}
    batch_events: dict[int, list[ChangeEvent]] = {}
    groups: list[list[PendingEntry]] = []
    in_flight: set[str] = set()
    batch_no = 0

    for op in ops:
        kind = op[0]
        if kind == "commit":
            _, key, opk, delay = op
            # the transaction took its xid `delay` transactions ago: xids are not commit order
            xid = next_xid - int(delay) if next_xid - int(delay) in started_not_committed else None
            if xid is None:
                xid = next_xid
                next_xid += 1
            for x in range(next_xid - 3, next_xid):
                if x not in committed_xids and x != xid and x >= 1000:
                    started_not_committed.add(x)
            started_not_committed.discard(xid)
            counter += 1
            e = ev(str(key), counter, Op(opk), xid=xid, at=counter)
            committed_xids.append(xid)
            rank[counter] = (float(len(committed_xids)), 0)
            events.append(e)
            undelivered.append(e)
        elif kind == "snapshot":
            _, key = op
            xmax = max(committed_xids, default=999) + 1
            xip = frozenset(x for x in started_not_committed if x < xmax)
            snap = SnapshotVisibility(min(xip | {xmax}), xmax, xip)
            for x in committed_xids:
                assert snap.is_visible(x)
            counter += 1
            e = ev(str(key), counter, Op.SNAPSHOT, xid=next_xid, at=counter, snap=snap)
            next_xid += 1
            rank[counter] = (len(committed_xids) + 0.5, counter)
            events.append(e)
            undelivered.append(e)
        elif kind == "deliver":
            picks = sorted({int(i) % len(undelivered) for i in op[1]}) if undelivered else []
            chosen = [undelivered[i] for i in picks]
            for i in reversed(picks):
                undelivered.pop(i)
            batch_no += 1
            c.tracker.register(batch_no, len(chosen))
            batch_events[batch_no] = chosen
            for e in chosen:
                c.add(e, batch_no)
                cur = delivered_newest.get(e.key)
                if cur is None or rank[e.offset] > rank[cur.offset]:
                    delivered_newest[e.key] = e
        elif kind == "take":
            before = set(c.in_flight())
            got = c.take([str(k) for k in op[1]])
            for entry in got:
                assert entry.key not in before and entry.key not in in_flight
                in_flight.add(entry.key)
            if got:
                groups.append(got)
        elif kind == "complete" and groups:
            group = groups.pop(int(op[1]) % len(groups))
            acked = bool(op[2])
            for entry in group:
                in_flight.discard(entry.key)
                if acked:
                    r = rank[entry.event.offset]
                    if entry.key not in acked_rank or r > acked_rank[entry.key]:
                        acked_rank[entry.key] = r
            c.complete(group, acked)

        # invariants after every step
        assert set(c.in_flight()) == in_flight
        for key, newest in delivered_newest.items():
            pend = c.pending().get(key)
            known = pend.event if pend else None
            if known is None:
                fl = [e for g in groups for e in g if e.key == key]
                known = fl[0].event if fl else None
            if known is not None:
                assert known is newest, (key, known, newest)
            else:
                assert acked_rank.get(key) == rank[newest.offset]
            if pend is not None and key in acked_rank:
                assert rank[pend.event.offset] > acked_rank[key]
        pend_oldest = [e.oldest_at for e in c.pending().values()]
        assert c.oldest_at() == (min(pend_oldest) if pend_oldest else None)
        upto = c.tracker.resolved_upto()
        for b in range(1, (upto or 0) + 1):
            for e in batch_events[b]:
                assert e.key in acked_rank and acked_rank[e.key] >= rank[e.offset], (b, e)

    # drain: everything delivered eventually resolves every batch
    for group in groups:
        c.complete(group, acked=True)
    while len(c):
        c.complete(c.take(list(c.pending())), acked=True)
    assert c.tracker.resolved_upto() == (batch_no or None)


def test_fenced_keys_are_not_taken_until_unfenced() -> None:
    c = _coal(1)
    c.add(ev("a", 1), 1)
    c.add(ev("b", 2), 1)
    c.fence(["a", "x"], 7)
    c.fence(["a"], 8)
    assert set(c.fenced()) == {"a", "x"}
    assert [e.key for e in c.take(["a", "b"])] == ["b"]
    assert c.unfence(7) == ["x"]  # "a" is still fenced by job 8
    assert c.take(["a"]) == []
    assert c.unfence(8) == ["a"]
    assert [e.key for e in c.take(["a"])] == ["a"]


def test_live_at_is_the_clock_of_live_changes_only() -> None:
    snap = SnapshotVisibility.parse("100:100:")
    c = _coal(1)
    c.add(ev("s", 50, Op.SNAPSHOT, snap=snap, at=1), 1)
    assert c.pending()["s"].live_at is None  # initial-sync row only: no deadline
    c.add(ev("s", 60, xid=200, at=5), 1)  # a live change the chunk does not contain
    entry = c.pending()["s"]
    assert entry.live_at == T0 + timedelta(seconds=5)
    assert entry.oldest_at == T0 + timedelta(seconds=1)
    # an older live change covered by a chunk row still counts for the deadline
    c.add(ev("t", 70, Op.SNAPSHOT, snap=SnapshotVisibility.parse("300:300:"), at=9), 1)
    assert not c.add(ev("t", 65, xid=250, at=3), 1)
    assert c.pending()["t"].live_at == T0 + timedelta(seconds=3)


def test_trim_acked_keeps_the_most_recent_and_never_pending_or_in_flight() -> None:
    c = _coal(1, 2)
    for i in range(10):
        c.add(ev(f"k{i}", i + 1), 1)
    c.complete(c.take([f"k{i}" for i in range(10)]), acked=True)
    assert c.acked_size() == 10
    c.add(ev("k0", 20), 2)  # k0 pending again: its stamp stays
    c.complete(c.take(["k1"]), acked=True)  # nothing to take: k1 is not pending
    c.add(ev("k1", 21), 2)
    taken = c.take(["k1"])  # k1 in flight: its stamp stays
    assert c.trim_acked(3) == 7
    assert c.acked_size() == 3
    assert c.acked("k0") is not None and c.acked("k1") is not None
    assert c.acked("k9") is not None  # the most recently acknowledged free key
    assert c.acked("k2") is None
    c.complete(taken, acked=True)
    assert c.acked("k1") == stamp_of(ev("k1", 21))
    assert c.trim_acked(0) == 2  # k0 is still pending
    assert c.acked_size() == 1 and c.acked("k0") is not None


def test_forgotten_stamp_set_again_still_drops_an_older_event() -> None:
    c = _coal(1, 2)
    c.add(ev("a", 5), 1)
    c.complete(c.take(["a"]), acked=True)
    c.trim_acked(0)
    assert c.acked("a") is None
    c.set_acked("a", stamp_of(ev("a", 5)))  # what the engine reloads from key_state
    assert not c.add(ev("a", 4), 2)
    assert not c.pending()


@settings(max_examples=200, deadline=None)
@given(
    versions=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=12),
    newest=st.integers(min_value=1, max_value=50),
    take_after=st.lists(st.booleans(), min_size=13, max_size=13),
)
def test_read_ahead_newest_is_never_followed_by_an_older_version(
    versions: list[int], newest: int, take_after: list[bool]
) -> None:
    """Catch-up read-ahead (issue 14): the first re-read batch carries the key's newest committed
    version along with whatever version the reader met first. Whatever order the re-read brings
    the rest in and whenever the engine sends, nothing older than that newest version is ever
    handed out, and the key's newest is handed out at most once."""
    top = max([*versions, newest])
    c = _coal(1, 2)
    c.add(ev("k", versions[0]), 1)  # one batch: what the reader met, and the newest read ahead
    c.add(ev("k", top), 1)
    sent: list[int] = []
    for i, v in enumerate([*versions[1:], top]):  # the rest of the re-read, the newest again
        for e in c.take(["k"]) if take_after[i] else []:
            sent.append(e.event.version)
            c.complete([e], acked=True)
        c.add(ev("k", v), 2)
    sent.extend(e.event.version for e in c.take(["k"]))
    assert sent == [top]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6),
    ahead_from=st.integers(min_value=0, max_value=5),
    steps=st.lists(st.sampled_from(["none", "ack", "retry"]), min_size=6, max_size=6),
)
def test_read_ahead_releases_batches_but_never_loses_the_newest_version(
    sizes: list[int], ahead_from: int, steps: list[str]
) -> None:
    """``add_ahead`` (issue 14): the batches a row read ahead supersedes resolve at once, yet
    the checkpoint never passes the batch that holds the key's newest version before that
    version is acknowledged, and only the newest version is ever sent once it is known."""
    c = Coalescer()
    offsets = list(itertools.accumulate(sizes))  # batch i holds versions offsets[i-1]+1 .. [i]
    newest = offsets[-1]
    sent: list[int] = []
    after_ahead: list[int] = []
    ahead = False
    for i, size in enumerate(sizes, start=1):
        first = offsets[i - 2] + 1 if i > 1 else 1
        c.tracker.register(i, size)
        for v in range(first, first + size):
            c.add(ev("k", v), i)
        if i > ahead_from and offsets[i - 1] < newest:
            c.add_ahead(ev("k", newest))
            ahead = True
        for e in c.take(["k"]) if steps[i - 1] != "none" else []:
            sent.append(e.event.version)
            if ahead:
                after_ahead.append(e.event.version)
            c.complete([e], acked=steps[i - 1] == "ack")
        done = c.tracker.resolved_upto()
        if done is not None and done >= len(sizes):  # passed the newest version's batch
            acked = c.acked("k")
            assert acked is not None and acked.version == newest
    assert sent == sorted(sent)  # never an older version after a newer one
    assert all(v == newest for v in after_ahead)
