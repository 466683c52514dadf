"""When to send what, and by which API: a pure function of the pending set (docs/planner.md).

No I/O and no clock: ``now`` and the measured latencies are inputs, so the same function drives
the emitter, the benchmarks and the property tests.

Objective, in this order:

1. every change reaches the CRM within ``max_staleness`` of its capture (while the CRM answers
   at the measured latencies);
2. the fewest credits;
3. the least latency.

Waiting is what saves credits (repeated changes of a key coalesce, calls fill up, a big enough
flush is cheaper by Bulk Write), so the plan is to *wait* until the oldest pending change must
leave to arrive in time, then flush everything that is pending with the cheapest mix of APIs
that still arrives in time. A full bulk job's worth of records leaves at once: nothing can make
it cheaper per record. Below the credit reserve only changes at their deadline are sent, and
nothing is ever planned beyond the credits left.

Initial-sync rows (``PendingKey.backlog``) have no commit-to-CRM deadline of their own: they are
never forced onto a faster, costlier API. Full bulk jobs of them leave at once; the rest leaves
with the cheapest mix for its size, when the engine flushes the chunk (``hold_backlog`` is set
while a chunk is still being read) or at the latest ``max_staleness`` after capture. Live
changes keep their deadline and are planned exactly as before, separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from connector.costs import CostModel, Mix


@dataclass(frozen=True, slots=True)
class PendingKey:
    key: str
    oldest_at: float  # seconds, same clock as PlannerInput.now
    in_flight: bool = False  # or otherwise not to be sent now (fenced)
    backlog: bool = False  # initial-sync rows only: no arrival deadline (cheapest API)


@dataclass(frozen=True, slots=True)
class PlannerInput:
    now: float
    pending: Sequence[PendingKey]
    max_staleness: float
    credits_left: int
    reserve: int
    concurrency: int
    upsert_latency: float  # seconds per upsert call, measured
    bulk_latency: float  # seconds per bulk job, upload to result, measured
    cost: CostModel = field(default_factory=CostModel)
    hold_backlog: bool = False  # a snapshot chunk is still being read: backlog only in full jobs


@dataclass(frozen=True, slots=True)
class Plan:
    upserts: list[list[str]]  # each at most cost.upsert_batch keys
    bulk: list[list[str]]  # each at most cost.bulk_batch keys
    wake_at: float | None  # when to plan again at the latest (None: nothing pending)
    reason: str
    budget_alert: bool

    @property
    def is_empty(self) -> bool:
        return not self.upserts and not self.bulk

    def credits(self, cost: CostModel) -> int:
        return sum(cost.call_credits(len(c)) for c in self.upserts) + len(self.bulk) * (
            cost.bulk_job_credits
        )


def margin(inp: PlannerInput) -> float:
    """Safety margin kept before a deadline: one upsert round trip plus 1 % of the staleness
    budget (covers calls of an earlier flush still holding slots, the emitter's own
    scheduling, a read that lands just after a wake-up)."""
    return inp.upsert_latency + 0.01 * inp.max_staleness


def send_time(inp: PlannerInput, mix: Mix) -> float:
    """Seconds from now until every record of ``mix`` is acknowledged: upsert calls run
    ``concurrency`` at a time, bulk jobs side by side on the CRM, each within ``bulk_latency``."""
    c = max(1, inp.concurrency)
    t_upsert = -(-mix.upsert_calls // c) * inp.upsert_latency
    t_bulk = inp.bulk_latency if mix.bulk_jobs else 0.0
    return max(t_upsert, t_bulk)


def choose_mix(inp: PlannerInput, n: int, time_left: float) -> Mix:
    """The cheapest mix for ``n`` records that is acknowledged within ``time_left``; ties go to
    fewer bulk jobs. If none is fast enough (already late: after a restart or a fault), the
    fastest one (staleness comes first) — but among the mixes within ``margin`` of the
    fastest, the cheapest: a 500-credit job is not bought to arrive a fraction of a second
    less late than one upsert call."""
    mixes = inp.cost.mixes(n)
    in_time = [m for m in mixes if send_time(inp, m) <= time_left]
    if in_time:
        return min(in_time, key=lambda m: (m.credits, m.bulk_jobs))
    fastest = min(send_time(inp, m) for m in mixes)
    near = [m for m in mixes if send_time(inp, m) <= fastest + margin(inp)]
    return min(near, key=lambda m: (m.credits, send_time(inp, m), m.bulk_jobs))


def leave_at(inp: PlannerInput, oldest: float, n: int) -> tuple[float, Mix]:
    """When a flush of ``n`` records whose oldest change was captured at ``oldest`` must
    leave, and with which mix: its deadline minus the margin minus its send time."""
    deadline = oldest + inp.max_staleness - margin(inp)
    mix = choose_mix(inp, n, deadline - inp.now)
    return deadline - send_time(inp, mix), mix


def _split(inp: PlannerInput, keys: list[str], mix: Mix) -> tuple[list[list[str]], list[list[str]]]:
    """Bulk jobs get the first ``mix.bulk_records`` keys (full jobs), upsert calls the rest."""
    cost = inp.cost
    bulk_keys, up_keys = keys[: mix.bulk_records], keys[mix.bulk_records :]
    bulk = [bulk_keys[i : i + cost.bulk_batch] for i in range(0, len(bulk_keys), cost.bulk_batch)]
    ups = [up_keys[i : i + cost.upsert_batch] for i in range(0, len(up_keys), cost.upsert_batch)]
    return ups, bulk


def _fit(inp: PlannerInput, n: int, credits: int, time_left: float) -> tuple[int, Mix]:
    """The largest m ≤ n whose chosen mix costs at most ``credits``, with that mix (bisection:
    the cost of the chosen mix never decreases with m)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if choose_mix(inp, mid, time_left).credits <= credits:
            lo = mid
        else:
            hi = mid - 1
    return lo, choose_mix(inp, lo, time_left)


def plan(inp: PlannerInput) -> Plan:
    free = [pk for pk in inp.pending if not pk.in_flight]
    if not free:
        reason = "all pending keys are in flight" if inp.pending else "nothing pending"
        return Plan([], [], None, reason, inp.credits_left < inp.reserve)
    live = [pk for pk in free if not pk.backlog]
    backlog = [pk for pk in free if pk.backlog]
    if not backlog:
        return _plan_live(inp, live)
    p_live = _plan_live(inp, live) if live else None
    spent = p_live.credits(inp.cost) if p_live is not None else 0
    p_back = _plan_backlog(inp, backlog, spent)
    if p_live is None:
        return p_back
    wakes = [w for w in (p_live.wake_at, p_back.wake_at) if w is not None]
    return Plan(
        p_live.upserts + p_back.upserts,
        p_live.bulk + p_back.bulk,
        min(wakes) if wakes else None,
        f"{p_live.reason}; backlog: {p_back.reason}",
        p_live.budget_alert or p_back.budget_alert,
    )


def _plan_backlog(inp: PlannerInput, free: list[PendingKey], already: int) -> Plan:
    """Initial-sync rows: no arrival deadline, so always the cheapest mix for their number;
    full bulk jobs at once, the rest when the chunk is read (not ``hold_backlog``) and its
    oldest row is ``max_staleness`` old (the engine's chunk flush sends it sooner). Only what
    the credits above the reserve allow, after ``already`` (the live changes' flush)."""
    cost = inp.cost
    spendable = inp.credits_left - inp.reserve - already
    ordered = sorted(free, key=lambda pk: pk.oldest_at)
    keys = [pk.key for pk in ordered]
    n = len(ordered)
    full_jobs = n // cost.bulk_batch
    if full_jobs:
        m = cost.mix(full_jobs * cost.bulk_batch, full_jobs)
        if m.credits > spendable:
            return Plan([], [], inp.now + _budget_retry(inp), "full jobs held by credits", True)
        ups, bulk = _split(inp, keys[: m.records], m)
        rest = ordered[m.records :]
        wake = None
        if rest and not inp.hold_backlog:
            wake = max(inp.now, rest[0].oldest_at + inp.max_staleness - margin(inp))
        return Plan(ups, bulk, wake, f"{full_jobs} full bulk job(s) of {n} backlog", False)
    go_at = ordered[0].oldest_at + inp.max_staleness - margin(inp)
    if inp.hold_backlog:
        return Plan([], [], None, f"hold {n} backlog: chunk being read", False)
    mix = choose_mix(inp, n, math.inf)
    if inp.now < go_at:
        return Plan([], [], go_at, f"wait: {n} backlog, {_describe(mix)}", False)
    if mix.credits > spendable:
        return Plan([], [], inp.now + _budget_retry(inp), f"{n} backlog held by credits", True)
    ups, bulk = _split(inp, keys, mix)
    return Plan(ups, bulk, None, f"backlog {n}: {_describe(mix)}", False)


def _plan_live(inp: PlannerInput, free: list[PendingKey]) -> Plan:
    cost = inp.cost

    n = len(free)
    oldest = min(pk.oldest_at for pk in free)
    go_at, mix = leave_at(inp, oldest, n)
    spendable = inp.credits_left - inp.reserve  # what can go without touching the reserve
    full_jobs = n // cost.bulk_batch

    if inp.now < go_at and not full_jobs:
        return Plan([], [], go_at, f"wait: {n} pending, {_describe(mix)}", mix.credits > spendable)

    ordered = sorted(free, key=lambda pk: pk.oldest_at)
    keys = [pk.key for pk in ordered]

    if inp.now < go_at:
        # full bulk jobs leave at once: waiting cannot make them cheaper per record
        m = cost.mix(full_jobs * cost.bulk_batch, full_jobs)
        if m.credits <= spendable:
            ups, bulk = _split(inp, keys[: m.records], m)
            rest = ordered[m.records :]
            nxt = leave_at(inp, rest[0].oldest_at, len(rest))[0] if rest else None
            return Plan(ups, bulk, nxt, f"{full_jobs} full bulk job(s) of {n} pending", False)
        return Plan([], [], go_at, "wait: full bulk job held back by the credit reserve", True)

    # the oldest change must leave now: flush everything with the cheapest mix in time
    time_left = oldest + inp.max_staleness - margin(inp) - inp.now
    if mix.credits <= spendable:
        # a partial last call is charged per started 10 records: the newest few that would
        # start a new 10 stay for the next flush if they are not due themselves
        hold = mix.upsert_records % cost.records_per_credit if mix.upsert_records else 0
        if 0 < hold < mix.upsert_records:
            rest = ordered[n - hold :]
            nxt = leave_at(inp, rest[0].oldest_at, hold)[0]
            if nxt > inp.now + _tick(inp):
                sent = n - hold
                m2 = choose_mix(inp, sent, time_left)
                if m2.credits < mix.credits:
                    ups, bulk = _split(inp, keys[:sent], m2)
                    why = f"flush {sent} at deadline, {hold} newest wait: {_describe(m2)}"
                    return Plan(ups, bulk, nxt, why, False)
        ups, bulk = _split(inp, keys, mix)
        return Plan(ups, bulk, None, f"flush {n} at deadline: {_describe(mix)}", False)

    # the reserve is reached: send only the changes at their deadline, within the credits
    # left; the others wait. "At their deadline": due before every pending change could be
    # sent by upsert, plus one round trip, from now.
    window = send_time(inp, cost.mix(n, 0)) + inp.upsert_latency + margin(inp)
    limit = inp.now + window - inp.max_staleness
    due = 0
    while due < n and ordered[due].oldest_at <= limit:
        due += 1
    sent, m_due = _fit(inp, due, max(0, inp.credits_left), time_left)
    ups, bulk = _split(inp, keys[:sent], m_due)
    rest = ordered[sent:]
    if sent < due:
        wake: float | None = inp.now + _budget_retry(inp)
        reason = f"credits: {sent} of {due} due changes fit in {inp.credits_left} credits left"
    else:
        wake = None
        if rest:
            # the earliest a remaining change becomes due, never sooner than one round trip
            wake = max(rest[0].oldest_at + inp.max_staleness - window, inp.now + _tick(inp))
        reason = f"reserve: {due} due of {n} pending sent, {_describe(m_due)}"
    return Plan(ups, bulk, wake, reason, True)


def _tick(inp: PlannerInput) -> float:
    return max(inp.upsert_latency, 1e-3)


def _budget_retry(inp: PlannerInput) -> float:
    """How long to wait before looking at the credits again when they ran out."""
    return max(_tick(inp), inp.max_staleness / 20)


def _describe(mix: Mix) -> str:
    parts = []
    if mix.bulk_jobs:
        parts.append(f"{mix.bulk_jobs} bulk job(s) of {mix.bulk_records}")
    if mix.upsert_calls:
        parts.append(f"{mix.upsert_calls} upsert call(s) of {mix.upsert_records}")
    return " + ".join(parts or ["nothing"]) + f" = {mix.credits} credits"
