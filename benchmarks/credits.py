"""Credit economy (issue 8, item 1): what each sending policy spends on a day of changes.

Simulated time, no sleeping. Every policy reads the same trace through the same reader (changes
become visible at the next whole second, one reader batch per second) and talks to the same
simulated CRM: an upsert call takes ``UPSERT_LATENCY`` s and holds one of ``CONCURRENCY``
slots; a bulk job takes ``BULK_BASE`` s + rows / ``BULK_RATE`` from creation to result, jobs run
side by side. Credits come from ``connector.costs.CostModel`` for everyone. A change counts as
delivered when a call or job carrying its version or a newer one of its key has been answered;
its staleness is that time minus its capture time.

Policies:
  a  one upsert call per change;
  b  buffer (newest per key), upsert 100 at a time, flush the rest every 10 minutes;
  c  b, but a buffer above 5,000 records goes by Bulk Write;
  economy / balanced / fast  this connector at each ``freshness`` setting:
     connector.coalesce.Coalescer + connector.planner.plan, the planner fed by a
     connector.latency.LatencyEstimator with what the simulated CRM really took.

Yardstick: ``lower_bound`` — no schedule that delivers every change within ``max_staleness``
can spend less (relaxed dynamic program over blocks of per-key windows with the real price
function; checked against brute force in tests/unit/test_credits_bench.py).

``python -m benchmarks credits [--scale S] [--seed N] [--out DIR] [--no-charts]``
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from connector.coalesce import Coalescer, PendingEntry
from connector.costs import CostModel
from connector.events import ChangeEvent, Op
from connector.latency import LatencyEstimator
from connector.planner import FRESHNESS, Freshness, PendingKey, PlannerInput, plan

DAY = 86_400.0
MAX_STALENESS = 600.0
CONCURRENCY = 10
UPSERT_LATENCY = 1.0
BULK_BASE = 60.0
BULK_RATE = 1_000.0  # rows per second inside a bulk job
POLL = 1.0  # reader batch interval, seconds
BUDGET = 5_000_000  # daily credits given to the planner (Enterprise cap), reserve below
RESERVE = 1_000
RESULTS = Path(__file__).parent / "results"
POLICIES = ("a", "b", "c", "economy", "balanced", "fast")
LABELS = {
    "a": "(a) one call per change",
    "b": "(b) 100 or 10 min, upsert",
    "c": "(c) b + bulk above 5,000",
    "economy": "planner, economy",
    "balanced": "planner, balanced",
    "fast": "planner, fast",
}

# --------------------------------------------------------------------------------------------
# traces: (time, key, op) sorted by time; version = position in the trace


@dataclass
class Trace:
    name: str
    title: str
    changes: list[tuple[float, str, str]]  # (captured_at seconds, key, op)
    bulk_base: float = BULK_BASE  # seconds of a bulk job before its rows (8 min: a slow API)
    adversarial: bool = False

    def batches(self) -> Iterator[tuple[float, list[int]]]:
        """Reader batches: (read time, indices of the changes it delivers)."""
        cur: list[int] = []
        cur_t = -1.0
        for i, (t, _, _) in enumerate(self.changes):
            rt = math.floor(t / POLL) * POLL + POLL
            if rt != cur_t and cur:
                yield cur_t, cur
                cur = []
            cur_t = rt
            cur.append(i)
        if cur:
            yield cur_t, cur


HOURLY = [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.4, 0.8, 1.2, 1.6, 2.0, 2.2]
HOURLY += [2.0, 1.8, 1.7, 1.6, 1.5, 1.4, 1.6, 1.9, 2.0, 1.6, 1.0, 0.5]


def _order_changes(
    rng: random.Random, key: str, t0: float, alpha: float
) -> list[tuple[float, str, str]]:
    """One order's life: created → paid → shipped → delivered, some cancelled, some edited;
    a few orders (heavy tail) are edited many times."""
    out = [(t0, key, "insert")]
    if rng.random() < 0.05:  # cancelled before payment
        out.append((t0 + rng.expovariate(1 / 1200), key, "update"))
        return out
    paid = t0 + rng.expovariate(1 / 300)
    out.append((paid, key, "update"))
    # edits: P(edits >= k) = (k + 1) ** -alpha, a heavy tail of orders changed many times
    edits = min(60, int(rng.paretovariate(alpha)) - 1)
    for _ in range(edits):
        out.append((t0 + rng.expovariate(1 / 7200), key, "update"))
    if rng.random() < 0.03:  # cancelled after payment
        out.append((paid + rng.expovariate(1 / 3600), key, "update"))
        return out
    shipped = paid + rng.expovariate(1 / 14_400)
    out.append((shipped, key, "update"))
    out.append((shipped + rng.expovariate(1 / 43_200) + 3600, key, "update"))
    return out


def ecommerce(rng: random.Random, orders_per_day: int, alpha: float) -> list[Any]:
    """Orders created over yesterday and today with a business-hours profile; only the changes
    that fall on today are kept (yesterday's orders ship and deliver today)."""
    changes: list[tuple[float, str, str]] = []
    for day in (-1, 0):
        for i in range(orders_per_day):
            h = rng.choices(range(24), weights=HOURLY)[0]
            t0 = day * DAY + (h + rng.random()) * 3600
            key = f"o{day + 1}-{i}"
            changes.extend(c for c in _order_changes(rng, key, t0, alpha) if 0 <= c[0] < DAY)
    return changes


def make_traces(scale: float, seed: int) -> list[Trace]:
    def n(x: float) -> int:
        return max(1, round(x * scale))

    rng = random.Random(seed)
    trickle_keys = n(20_000)
    trickle = [
        (float(i) / scale + 0.5, f"k{rng.randrange(trickle_keys)}", "update") for i in range(n(DAY))
    ]
    base = ecommerce(random.Random(seed + 1), n(40_000), 1.3)
    imported = [(7200 + i * (300 / n(30_000)), f"imp-{i}", "insert") for i in range(n(30_000))]
    mass_t = 14 * 3600 + 0.25  # one UPDATE statement: one transaction, one commit time
    mass = [(mass_t, f"old-{i}", "update") for i in range(n(200_000))]
    seed_day = ecommerce(random.Random(seed + 2), n(2_000), 1.6)

    # -- adversarial traces (issue 18) on top of the seed's scale of traffic
    def new_rows(prefix: str, count: int, at: float, spread: float = 0.0) -> list[Any]:
        return [(at + spread * j / count, f"{prefix}{j}", "update") for j in range(count)]

    bursts = list(seed_day)
    for h, size in ((3, 4_900), (9, 5_100), (15, 24_900)):
        bursts += new_rows(f"bu{h}-", n(size), h * 3600 + 0.25)
    young = list(seed_day)
    for h in range(0, 24, 2):  # a few old changes, then a big young burst 530 s later
        young += new_rows(f"yo{h}-", 5, h * 3600 + 0.5, 2.0)
        young += new_rows(f"yb{h}-", n(10_000), h * 3600 + 530.25)
    twice = list(seed_day)
    for h in range(1, 24, 3):  # the same rows updated twice, a minute apart
        twice += new_rows(f"tw{h}-", n(25_000), h * 3600 + 0.25)
        twice += new_rows(f"tw{h}-", n(25_000), h * 3600 + 60.25)
    after = [(t * 10.0, k, op) for t, k, op in trickle if t * 10.0 < DAY]  # 1 change / 10 s
    for w in range(int(DAY // 600)):  # a burst 1 s after every 10-minute flush of (b)
        after += [
            (w * 600 + 1.25, f"af{rng.randrange(n(50_000))}", "update") for _ in range(n(600))
        ]
    straddle = []  # around 5,000 distinct keys per 10 minutes: 4,800 / 5,160, hour by hour
    for h in range(8, 14):
        rate = (4_800 if h % 2 else 5_160) / 600 * scale
        count = int(rate * 3600)
        straddle += [(h * 3600 + j / rate, f"st{h}-{j}", "update") for j in range(count)]
    return [
        Trace("trickle", "steady trickle: 1 change/s over 20,000 keys", sorted(trickle)),
        Trace("ecommerce", "e-commerce day: 40,000 orders/day, peaks, skewed edits", sorted(base)),
        Trace(
            "import",
            "e-commerce day + nightly import of 30,000 new orders (02:00, over 5 min)",
            sorted(base + imported),
        ),
        Trace(
            "mass_update",
            "e-commerce day + one UPDATE of 200,000 existing orders (14:00)",
            sorted(base + mass),
        ),
        Trace("seed", "the seed's scale: 2,000 new orders/day, ~4 updates each", sorted(seed_day)),
        Trace(
            "bursts",
            "seed day + one-statement bursts of 4,900 / 5,100 / 24,900 new rows",
            sorted(bursts),
            adversarial=True,
        ),
        Trace(
            "young_burst",
            "seed day + every 2 h: 5 changes, then 10,000 new rows 530 s later",
            sorted(young),
            adversarial=True,
        ),
        Trace(
            "twice",
            "seed day + every 3 h: the same 25,000 rows updated twice, a minute apart",
            sorted(twice),
            adversarial=True,
        ),
        Trace(
            "after_flush",
            "1 change / 10 s + 600 changes 1 s after every 10-minute boundary",
            sorted(after),
            adversarial=True,
        ),
        Trace(
            "straddle",
            "08:00-14:00 at 4,800 / 5,160 new rows per 10 min, alternating hourly",
            sorted(straddle),
            adversarial=True,
        ),
        Trace(
            "slow_bulk",
            "the import trace with an 8-minute Bulk Write API (480 s + rows/1,000 per job)",
            sorted(base + imported),
            bulk_base=480.0,
            adversarial=True,
        ),
    ]


# --------------------------------------------------------------------------------------------
# the simulated CRM, identical for every policy


@dataclass
class Crm:
    cost: CostModel
    bulk_base: float = BULK_BASE
    slots: list[float] = field(default_factory=lambda: [0.0] * CONCURRENCY)
    credits: int = 0
    calls: int = 0
    jobs: int = 0
    spend: list[tuple[float, int]] = field(default_factory=list)  # (time, cumulative credits)
    sends: list[tuple[float, int, int]] = field(default_factory=list)  # (done, first, last) idx
    items: list[int] = field(default_factory=list)  # change indices carried, by send

    def _log(self, t: float, credits: int, versions: list[int], done: float) -> None:
        self.credits += credits
        self.spend.append((t, self.credits))
        start = len(self.items)
        self.items.extend(versions)
        self.sends.append((done, start, len(self.items)))

    def upsert(self, t: float, versions: list[int]) -> float:
        """One call of ≤ 100 records; returns when it is answered."""
        free = heapq.heappop(self.slots)
        done = max(t, free) + UPSERT_LATENCY
        heapq.heappush(self.slots, done)
        self.calls += 1
        self._log(t, self.cost.call_credits(len(versions)), versions, done)
        return done

    def bulk(self, t: float, versions: list[int]) -> float:
        """One bulk job of ≤ 25,000 records; returns when its result is in."""
        assert 0 < len(versions) <= self.cost.bulk_batch
        done = t + self.job_seconds(len(versions))
        self.jobs += 1
        self._log(t, self.cost.bulk_job_credits, versions, done)
        return done

    def job_seconds(self, records: int) -> float:
        return self.bulk_base + records / BULK_RATE


# --------------------------------------------------------------------------------------------
# the policies: each reads the trace's reader batches and sends through the CRM


def policy_a(trace: Trace, crm: Crm) -> None:
    for t, idx in trace.batches():
        for i in idx:
            crm.upsert(t, [i])


def _buffered(trace: Trace, crm: Crm, bulk_above: int | None) -> None:
    batch, flush_every = crm.cost.upsert_batch, 600.0
    buf: dict[str, int] = {}  # key -> newest change index (insertion order = oldest first)

    def send(t: float, allow_bulk: bool) -> None:
        items = list(buf.values())
        buf.clear()
        if allow_bulk and bulk_above is not None and len(items) > bulk_above:
            for j in range(0, len(items), crm.cost.bulk_batch):
                crm.bulk(t, items[j : j + crm.cost.bulk_batch])
        else:
            for j in range(0, len(items), batch):
                crm.upsert(t, items[j : j + batch])

    next_timer = flush_every
    for t, idx in trace.batches():
        while next_timer <= t:
            if buf:
                send(next_timer, True)
            next_timer += flush_every
        for i in idx:
            key = trace.changes[i][1]
            buf.pop(key, None)
            buf[key] = i
        if bulk_above is not None and len(buf) > bulk_above:
            send(t, True)
        while len(buf) >= batch:
            keys = list(buf)[:batch]
            crm.upsert(t, [buf.pop(k) for k in keys])
    if buf:
        send(next_timer, True)


def policy_b(trace: Trace, crm: Crm) -> None:
    _buffered(trace, crm, None)


def policy_c(trace: Trace, crm: Crm) -> None:
    _buffered(trace, crm, crm.cost.break_even())


BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)


def policy_d(trace: Trace, crm: Crm, freshness: Freshness = "economy") -> None:
    """The connector's own pipeline: every change becomes a ChangeEvent in the Coalescer, the
    planner decides, sends go to the CRM, answers complete the entries (fencing included).
    The planner's latencies come from a LatencyEstimator fed with what each call and job
    really took; it starts with one full job measured (as the emitter restores it from
    ``bulk_jobs.duration_seconds`` on start), the CRM's upsert latency as its default."""
    coal = Coalescer()
    est = LatencyEstimator(default_upsert=UPSERT_LATENCY, default_bulk=120.0)
    est.observe_bulk(crm.cost.bulk_batch, crm.job_seconds(crm.cost.bulk_batch))
    keys_pk: dict[str, PendingKey] = {}
    done_heap: list[tuple[float, int, list[PendingEntry], str, float]] = []
    seq = 0
    wake: float | None = None
    batches = list(trace.batches())
    bi = 0
    # the estimator's answers change only when it observes something: asked again only then
    estimates: tuple[float, float, tuple[tuple[int, float], ...]] | None = None

    while bi < len(batches) or done_heap or len(coal):
        candidates = [math.inf]
        if bi < len(batches):
            candidates.append(batches[bi][0])
        if done_heap:
            candidates.append(done_heap[0][0])
        if wake is not None:
            candidates.append(wake)
        now = min(candidates)
        if now == math.inf:
            raise RuntimeError("policy d stalled with pending changes and nothing scheduled")
        while done_heap and done_heap[0][0] <= now:
            t_done, _, entries, kind, started = heapq.heappop(done_heap)
            if kind == "bulk":
                est.observe_bulk(len(entries), t_done - started)
            else:  # the HTTP call only, not the wait for a slot (as the emitter measures)
                est.observe_upsert(min(t_done - started, UPSERT_LATENCY))
            estimates = None
            coal.complete(entries, acked=True)
            for e in entries:  # a newer version that waited behind the fence may go now
                pk = keys_pk.get(e.key)
                if pk is not None:
                    keys_pk[e.key] = PendingKey(pk.key, pk.oldest_at, False)
        if bi < len(batches) and batches[bi][0] <= now:
            b_no = bi
            _, idx = batches[bi]
            bi += 1
            coal.tracker.register(b_no, len(idx))
            in_flight = coal.in_flight()
            for i in idx:
                t, key, op = trace.changes[i]
                ev = ChangeEvent(
                    i, "bench", Op(op), key, i, i, None, BASE_TIME + timedelta(seconds=t)
                )
                if coal.add(ev, b_no) and key not in keys_pk:
                    keys_pk[key] = PendingKey(key, t, key in in_flight)
        if estimates is None:
            estimates = (est.upsert(), *est.bulk_profile(crm.cost.bulk_batch))
        upsert_latency, full, by_size = estimates
        p = plan(
            PlannerInput(
                now=now,
                pending=list(keys_pk.values()),
                max_staleness=MAX_STALENESS,
                credits_left=BUDGET - crm.credits,
                reserve=RESERVE,
                concurrency=CONCURRENCY,
                upsert_latency=upsert_latency,
                bulk_latency=full,
                cost=crm.cost,
                freshness=freshness,
                bulk_latency_by_size=by_size,
                # the upsert calls sent and not answered, as the engine reads its limiter
                calls_ahead=sum(1 for d in done_heap if d[3] == "upsert"),
            )
        )
        wake = p.wake_at
        for group, kind in ((p.bulk, "bulk"), (p.upserts, "upsert")):
            for keys in group:
                entries = coal.take(keys)
                for e in entries:
                    del keys_pk[e.key]
                send = crm.bulk if kind == "bulk" else crm.upsert
                done = send(now, [e.event.version for e in entries])
                seq += 1
                heapq.heappush(done_heap, (done, seq, entries, kind, now))
        if p.is_empty and wake is None and bi >= len(batches) and not done_heap and len(coal):
            raise RuntimeError(f"policy d: {len(coal)} pending and no wake-up: {p.reason}")


POLICY_FUNCS: dict[str, Callable[[Trace, Crm], None]] = {
    "a": policy_a,
    "b": policy_b,
    "c": policy_c,
    "economy": lambda t, c: policy_d(t, c, "economy"),
    "balanced": lambda t, c: policy_d(t, c, "balanced"),
    "fast": lambda t, c: policy_d(t, c, "fast"),
}

# --------------------------------------------------------------------------------------------
# the lower bound


def windows(changes: list[tuple[float, str]], length: float) -> list[float]:
    """Per key, the greedy disjoint windows [c, c + length] that any schedule must hit with a
    send of that key: the first starts at the key's first change; the next at its first change
    after the previous window ends (no send in an earlier window can carry it). Returns the
    window starts, sorted. ``length`` = max_staleness minus the shortest answer time."""
    by_key: dict[str, list[float]] = {}
    for t, key in changes:
        by_key.setdefault(key, []).append(t)
    starts: list[float] = []
    for ts in by_key.values():
        ts.sort()
        end = -math.inf
        for t in ts:
            if t > end:
                starts.append(t)
                end = t + length
    starts.sort()
    return starts


def price_table(cost: CostModel, m_max: int) -> list[int]:
    """``price[m]``: the credits of the cheapest way to send m records in one go (any mix of
    full bulk jobs and 100-record upsert calls)."""
    return [cost.cheapest(m).credits if m else 0 for m in range(m_max + 1)]


def group_price(cost: CostModel, m: int, eligible: int) -> int:
    """The cheapest way to send m records at one point when only ``eligible`` of them may go by
    Bulk Write (the rest would arrive late by a job): k jobs carry min(k × bulk_batch,
    eligible) records, upsert the rest."""
    jobs = -(-min(m, eligible) // cost.bulk_batch)
    best = cost.upsert_credits(m) if m else 0
    for k in range(1, jobs + 1):
        rest = m - min(k * cost.bulk_batch, eligible)
        best = min(best, k * cost.bulk_job_credits + (cost.upsert_credits(rest) if rest else 0))
    return best


def lower_bound(
    starts: list[float], length: float, cost: CostModel, bulk_length: float | None = None
) -> int:
    """The relaxed optimum: every window needs one send point inside it; a point carrying m
    windows costs price(m). With equal-length windows sorted by start, the windows sharing a
    point are contiguous, so an optimum partitions the sorted windows into blocks of span
    ≤ ``length``: f[j] = min over blocks (i, j] of f[i] + price(j − i). f never decreases in
    j and price is a step function, so per price level only the largest block is a candidate
    (the last size of each level, plus the largest block allowed).

    ``bulk_length`` (max_staleness minus the fastest a bulk job can be answered): a window
    can go by Bulk Write only from a point at most that long after its start, so in a block
    only the windows starting within ``bulk_length`` of its last start may (``group_price``);
    None: every window may (the bound then ignores bulk latency)."""
    import numpy as np

    w = len(starts)
    if not w:
        return 0
    price = np.array(price_table(cost, w), dtype=np.int64)
    tops = np.nonzero(price[1:-1] < price[2:])[0] + 1  # m with price[m + 1] > price[m]
    up = np.array([cost.upsert_credits(m) if m else 0 for m in range(w + 1)], dtype=np.int64)
    f = np.zeros(w + 1, dtype=np.int64)
    lo = lo_b = 0
    for j in range(1, w + 1):
        while starts[j - 1] - starts[lo] > length:
            lo += 1
        big = j - lo
        e = big
        if bulk_length is not None:
            while starts[j - 1] - starts[lo_b] > bulk_length:
                lo_b += 1
            e = min(big, j - lo_b)  # the last e windows may go by bulk
        cand = tops[: np.searchsorted(tops, e, side="right")]
        best = int(f[j - e] + price[e])
        if len(cand):
            best = min(best, int((f[j - cand] + price[cand]).min()))
        if big > e:  # larger blocks: only their last e windows by bulk
            ms = np.arange(e + 1, big + 1)
            p = up[ms]
            for k in range(1, -(-e // cost.bulk_batch) + 1):
                p = np.minimum(p, k * cost.bulk_job_credits + up[ms - min(k * cost.bulk_batch, e)])
            best = min(best, int((f[j - ms] + p).min()))
        f[j] = best
    return int(f[w])


def trace_lower_bound(trace: Trace, cost: CostModel) -> int:
    length = MAX_STALENESS - UPSERT_LATENCY  # no answer comes sooner than one upsert call
    bulk_length = MAX_STALENESS - trace.bulk_base  # nor a job's sooner than its fixed part
    starts = windows([(t, k) for t, k, _ in trace.changes], length)
    return lower_bound(starts, length, cost, bulk_length)


# --------------------------------------------------------------------------------------------
# measuring


def staleness(trace: Trace, crm: Crm) -> tuple[list[float], int]:
    """Per change: when a version ≥ it was first answered, minus its capture time; and the
    number of sends that landed an older version of a key after a newer one had landed."""
    per_key: dict[str, list[tuple[int, float]]] = {}
    for done, a, b in crm.sends:
        for i in crm.items[a:b]:
            per_key.setdefault(trace.changes[i][1], []).append((i, done))
    changes_by_key: dict[str, list[int]] = {}
    for i, (_, key, _) in enumerate(trace.changes):
        changes_by_key.setdefault(key, []).append(i)
    out: list[float] = []
    regressions = 0
    for key, idx in changes_by_key.items():
        sends = sorted(per_key.get(key, []))  # by version
        versions = [v for v, _ in sends]
        suffix_min = [math.inf] * (len(sends) + 1)
        for j in range(len(sends) - 1, -1, -1):
            suffix_min[j] = min(suffix_min[j + 1], sends[j][1])
        for i in idx:
            j = bisect.bisect_left(versions, i)
            out.append(suffix_min[j] - trace.changes[i][0])
        by_done = sorted(sends, key=lambda s: (s[1], s[0]))
        top = -1
        for v, _ in by_done:
            if v < top:
                regressions += 1
            top = max(top, v)
    return out, regressions


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _simulate(trace: Trace, cost: CostModel, name: str) -> dict[str, Any]:
    crm = Crm(cost, trace.bulk_base)
    t0 = time.perf_counter()
    POLICY_FUNCS[name](trace, crm)
    wall = time.perf_counter() - t0
    st, regressions = staleness(trace, crm)
    sorted_st = sorted(st)
    return {
        "credits": crm.credits,
        "api_calls": crm.calls,
        "bulk_jobs": crm.jobs,
        "records_sent": len(crm.items),
        "staleness_p50_s": round(_pct(sorted_st, 0.5), 1),
        "staleness_p99_s": round(_pct(sorted_st, 0.99), 1),
        "staleness_max_s": round(sorted_st[-1], 1) if sorted_st else 0.0,
        "missed_max_staleness": sum(1 for s in st if s > MAX_STALENESS + 1e-6),
        "older_landed_after_newer": regressions,
        "sim_seconds": round(wall, 2),
    }


def _timed_lower_bound(trace: Trace, cost: CostModel) -> tuple[int, float]:
    t0 = time.perf_counter()
    return trace_lower_bound(trace, cost), round(time.perf_counter() - t0, 1)


def run_trace(trace: Trace, cost: CostModel) -> dict[str, Any]:
    lb, lb_s = _timed_lower_bound(trace, cost)
    return _assemble(trace, lb, lb_s, {n: _simulate(trace, cost, n) for n in POLICIES})


def _assemble(
    trace: Trace, lb: int, lb_s: float, sims: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "title": trace.title,
        "changes": len(trace.changes),
        "keys": len({k for _, k, _ in trace.changes}),
        "bulk_job_s": f"{trace.bulk_base:g} + rows/{BULK_RATE:g}",
        "lower_bound": lb,
        "lower_bound_seconds": lb_s,
        "policies": {},
    }
    for name in POLICIES:
        sim = dict(sims[name])
        sim["vs_lower_bound"] = round(sim["credits"] / lb, 4) if lb else 1.0
        res["policies"][name] = sim
    pol = res["policies"]
    eco, bal, b = pol["economy"], pol["balanced"], pol["b"]
    limit = 1.05 if eco["bulk_jobs"] or pol["c"]["bulk_jobs"] else 1.03
    res["targets"] = {
        "economy_limit_vs_lb": limit,
        "economy_within_limit": eco["credits"] <= limit * lb,
        "no_late_change": all(pol[f]["missed_max_staleness"] == 0 for f in FRESHNESS),
        "balanced_beats_b": (
            bal["credits"] <= b["credits"] and bal["staleness_p50_s"] <= b["staleness_p50_s"]
        ),
        "fast_p50_s": pol["fast"]["staleness_p50_s"],
        "fast_vs_economy_credits": round(pol["fast"]["credits"] / eco["credits"], 3),
    }
    return res


def chart(name: str, res: dict[str, Any], out: Path) -> str:
    """Credits against median staleness for every policy, and the lower bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for pol, r in res["policies"].items():
        if pol == "a":
            continue  # two orders of magnitude off the scale
        ax.scatter([r["credits"]], [r["staleness_p50_s"]], s=50, label=LABELS[pol])
        ax.annotate(pol, (r["credits"], r["staleness_p50_s"]), fontsize=8)
    ax.axvline(res["lower_bound"], color="red", linestyle="--", linewidth=1, label="lower bound")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("credits in the day")
    ax.set_ylabel("median staleness (s)")
    ax.set_title(f"{name}: {res['title']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    file = f"credits_{name}.png"
    fig.savefig(out / file, dpi=90)
    plt.close(fig)
    return file


def machine() -> dict[str, Any]:
    import os

    import matplotlib

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "matplotlib": matplotlib.__version__,
    }


# Each worker process builds the traces once (1.5 s at scale 1; deterministic from the seed)
# rather than receiving them pickled with every unit.
_WORKER_TRACES: list[Trace] = []


def _worker_init(scale: float, seed: int) -> None:
    _WORKER_TRACES[:] = make_traces(scale, seed)


def _unit(index: int, what: str) -> tuple[int, str, Any]:
    trace, cost = _WORKER_TRACES[index], CostModel()
    if what == "lower_bound":
        return index, what, _timed_lower_bound(trace, cost)
    return index, what, _simulate(trace, cost, what)


def _run_all(
    traces: list[Trace], scale: float, seed: int, cost: CostModel, jobs: int
) -> list[dict[str, Any]]:
    """Every (trace, policy) simulation and every lower bound as its own unit, spread over
    ``jobs`` processes (the units are independent and deterministic: the tables are the same
    as a sequential run's; only sim_seconds and the wall time change). ``jobs=1`` runs them
    in this process."""
    if jobs <= 1:
        return [run_trace(t, cost) for t in traces]
    units = [(i, w) for i in range(len(traces)) for w in ("lower_bound", *POLICIES)]
    # the planner's simulations are the long ones: start them first so no worker idles at the end
    units.sort(key=lambda u: u[1] not in FRESHNESS)
    found: dict[tuple[int, str], Any] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(scale, seed)
    ) as pool:
        for index, what, value in pool.map(_unit, *zip(*units, strict=True)):
            found[(index, what)] = value
    out = []
    for i, trace in enumerate(traces):
        lb, lb_s = found[(i, "lower_bound")]
        out.append(_assemble(trace, lb, lb_s, {n: found[(i, n)] for n in POLICIES}))
    return out


def run(
    scale: float = 1.0,
    seed: int = 7,
    out: Path | None = RESULTS,
    charts: bool = True,
    jobs: int = 0,
) -> dict[str, Any]:
    """``jobs``: worker processes (0: one per CPU)."""
    jobs = jobs or os.cpu_count() or 1
    cost = CostModel()
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "credits",
        "title": "Credit economy: credits and staleness per sending policy over simulated days",
        "command": "python -m benchmarks credits"
        + (f" --scale {scale}" if scale != 1 else "")
        + (f" --seed {seed}" if seed != 7 else ""),
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "parameters": {
            "scale": scale,
            "seed": seed,
            "max_staleness_s": MAX_STALENESS,
            "concurrency": CONCURRENCY,
            "upsert_latency_s": UPSERT_LATENCY,
            "bulk_job_s": f"{BULK_BASE:g} + rows/{BULK_RATE:g} (slow_bulk: 480 + rows/1,000)",
            "reader_poll_s": POLL,
            "break_even_records": cost.break_even(),
            "worker_processes": jobs,
        },
        "traces": {},
        "charts": [],
    }
    traces = make_traces(scale, seed)
    for trace, res in zip(traces, _run_all(traces, scale, seed, cost, jobs), strict=True):
        if charts and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            result["charts"].append(chart(trace.name, res, out))
        result["traces"][trace.name] = res
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["tables"] = tables(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "credits.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    cols = [
        "policy",
        "credits",
        "/ lower bound",
        "API calls",
        "bulk jobs",
        "p50 s",
        "p99 s",
        "max s",
        "late (> 10 min)",
        "older after newer",
    ]
    out = []
    for name, res in result["traces"].items():
        rows = []
        for pol, r in res["policies"].items():
            rows.append(
                [
                    LABELS[pol],
                    r["credits"],
                    f"{r['vs_lower_bound']:.3f}",
                    r["api_calls"],
                    r["bulk_jobs"],
                    r["staleness_p50_s"],
                    r["staleness_p99_s"],
                    r["staleness_max_s"],
                    r["missed_max_staleness"],
                    r["older_landed_after_newer"],
                ]
            )
        rows.append(["lower bound", res["lower_bound"], "1.000", "", "", "", "", "", "", ""])
        tg = res["targets"]
        out.append(
            {
                "title": (
                    f"{name}: {res['title']} ({res['changes']:,} changes, {res['keys']:,} keys)"
                ),
                "columns": cols,
                "rows": rows,
                "note": (
                    f"economy ≤ {tg['economy_limit_vs_lb']} × lower bound: "
                    f"{tg['economy_within_limit']}; no late change (planner): "
                    f"{tg['no_late_change']}; balanced beats (b) on credits and p50: "
                    f"{tg['balanced_beats_b']}; fast: p50 {tg['fast_p50_s']} s for "
                    f"{tg['fast_vs_economy_credits']} × economy's credits"
                ),
                "chart": f"credits_{name}.png",
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks credits", description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every trace's size")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-charts", action="store_true")
    ap.add_argument(
        "--jobs", type=int, default=0, help="worker processes (default: one per CPU; 1: none)"
    )
    args = ap.parse_args(argv)
    res = run(args.scale, args.seed, args.out, not args.no_charts, args.jobs)
    for tb in res["tables"]:
        print(tb["title"])
        for row in tb["rows"]:
            print("   ", " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in row))
        print("   ", tb["note"])
    print(f"wall {res['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
