"""When to send what, and by which API: a pure function of the pending set (docs/planner.md).

No I/O and no clock: ``now`` and the measured latencies are inputs, so the same function drives
the emitter, the benchmarks and the property tests.

Objective, in this order:

1. every change reaches the CRM within ``max_staleness`` of its capture, under the latencies the
   planner is given (conservative estimates: a high percentile per job size, connector/latency.py);
2. the fewest credits (economy) — or, with ``freshness`` "balanced" / "fast", changes leave once
   they are ``target_staleness`` old, in whole credits;
3. the least latency.

Waiting is what saves credits (repeated changes of a key coalesce, calls fill up, a big enough
set is cheaper by Bulk Write), and leaving early never saves any. So each change leaves at its
own latest moment, not the oldest one's: what cannot wait for a bulk job any more goes by upsert
when it is due, topped up to a whole 10-record credit with the next changes due; what can wait
is gathered into bulk jobs (chunks of a full job, by deadline) when that is cheaper, and a job
leaves when its oldest record must (economy) or is ``target_staleness`` old. A change is only
put in a job whose estimated latency still brings it in time. Below the credit reserve only
changes at their deadline are sent, and nothing is ever planned beyond the credits left.

Initial-sync rows (``PendingKey.backlog``) have no commit-to-CRM deadline of their own: they are
never forced onto a faster, costlier API. Full bulk jobs of them leave at once; the rest leaves
with the cheapest mix for its size, when the engine flushes the chunk (``hold_backlog`` is set
while a chunk is still being read) or at the latest ``max_staleness`` after capture. Live
changes keep their deadline and are planned separately.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from connector.costs import CostModel, Mix

Freshness = Literal["economy", "balanced", "fast"]
FRESHNESS: tuple[str, ...] = get_args(Freshness)
# balanced: the pending changes on the upsert way leave together once they are this share of
# a call (85 of 100); tuned with `python -m benchmarks credits` at scale 1 to beat the seed's
# recipe (b) on credits and median staleness on every trace (docs/planner.md, rule 4). At 0.8
# balanced sent keys early enough that 800 more were sent again on the e-commerce day, 20
# credits more than (b); 0.95 loses on median staleness there.
BALANCED_GROUP = 0.85


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
    upsert_latency: float  # seconds per upsert call: a high percentile of the measured ones
    bulk_latency: float  # seconds per full bulk job, creation to result: conservative estimate
    cost: CostModel = field(default_factory=CostModel)
    hold_backlog: bool = False  # a snapshot chunk is still being read: backlog only in full jobs
    freshness: Freshness = "economy"  # the pipeline's dial (target_staleness)
    # (records, seconds): a job of at most ``records`` records is answered within ``seconds``
    # (LatencyEstimator.bulk_profile); sizes above every entry take ``bulk_latency``
    bulk_latency_by_size: tuple[tuple[int, float], ...] = ()
    retry_allowance: float = 0.0  # extra seconds each call may take in retries (429 storms)
    # API calls already sent and not answered (holding a slot or waiting for one; every
    # pipeline of the client): a call planned now starts behind them. Without it a key changed
    # again while in flight behind a long queue was planned as if the slots were free and
    # arrived late (found by hypothesis, session 18: 60.5 s with a 60 s bound)
    calls_ahead: int = 0


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


def target_staleness(inp: PlannerInput) -> float:
    """How old a live change may get before it leaves (on top of the hard ``max_staleness``):
    economy: no target (every change leaves at its latest moment); balanced: 1/5 of
    ``max_staleness`` (120 s at 10 min); fast: 2 s (or less with a tiny ``max_staleness``)."""
    if inp.freshness == "balanced":
        return inp.max_staleness / 5
    if inp.freshness == "fast":
        return min(2.0, inp.max_staleness / 20)
    return math.inf


def bulk_time(inp: PlannerInput, records: int) -> float:
    """Estimated seconds until a bulk job of ``records`` records is answered: the smallest
    size-profile entry that covers it, else the full-job estimate ``bulk_latency``."""
    best = inp.bulk_latency
    for size, seconds in inp.bulk_latency_by_size:
        if size >= records:
            best = min(best, seconds)
    return best


def margin(inp: PlannerInput) -> float:
    """Safety margin kept before a deadline: one upsert round trip plus 1 % of the staleness
    budget (covers calls of an earlier flush still holding slots, the emitter's own
    scheduling, a read that lands just after a wake-up)."""
    return inp.upsert_latency + 0.01 * inp.max_staleness


def send_time(inp: PlannerInput, mix: Mix) -> float:
    """Seconds from now until every record of ``mix`` is acknowledged: upsert calls run
    ``concurrency`` at a time, bulk jobs side by side on the CRM, each within ``bulk_latency``."""
    c = max(1, inp.concurrency)
    t_upsert = 0.0
    if mix.upsert_calls:
        rounds = -(-(inp.calls_ahead + mix.upsert_calls) // c)
        t_upsert = rounds * (inp.upsert_latency + inp.retry_allowance)
    t_bulk = 0.0
    if mix.bulk_jobs:
        t_bulk = bulk_time(inp, min(mix.bulk_records, inp.cost.bulk_batch)) + inp.retry_allowance
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
    backlog = [pk for pk in free if pk.backlog]
    if not backlog:
        return _plan_live(inp, free)
    live = [pk for pk in free if not pk.backlog]
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
    ordered = sorted(free, key=_OLDEST_AT)
    keys = [pk.key for pk in ordered]
    n = len(ordered)
    full_jobs = n // cost.bulk_batch if cost.bulk_write else 0
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
    """Live changes (docs/planner.md, "The rules"): bulk jobs for what can wait for one, at the
    latest moment (economy) or when their oldest change is ``target_staleness`` old; upsert for
    what cannot, each change at its own latest moment (or at ``target_staleness``), topped up to
    whole credits with the next changes due."""
    cost = inp.cost
    now = inp.now
    spendable = inp.credits_left - inp.reserve
    tau = target_staleness(inp)
    tick = _tick(inp)  # a wake-up is never sooner than this: what is due within it goes now
    ordered = sorted(free, key=_OLDEST_AT)
    dl = _Deadlines(ordered, inp.max_staleness, margin(inp))  # arrive by

    # -- what can wait for a bulk job: a suffix (latest deadlines), in chunks of a full job
    lat_b = _bulk_eligibility_latency(inp, dl)
    e0 = bisect.bisect_left(dl, now + lat_b)
    chunks: list[tuple[int, int, float]] = []  # (start, end, leave at) of chunks worth a job
    peel_max = cost.upsert_batch  # a few stragglers go by upsert rather than hurry a job
    pos = e0
    if inp.freshness != "economy" and e0 < len(ordered):
        # what upsert delivers before a job would arrive goes by upsert (full calls leave at
        # once): a burst is never slower than by upsert alone, only the rest waits for a job
        round_s = inp.upsert_latency + inp.retry_allowance
        if round_s > 0:
            rounds = max(0, int(lat_b // round_s) - inp.calls_ahead // max(1, inp.concurrency))
            pos = min(len(ordered), e0 + rounds * cost.upsert_batch * max(1, inp.concurrency))
        else:  # an upsert round measured at 0 s: everything arrives before any job would
            pos = len(ordered)
    while pos < len(ordered):
        end = min(len(ordered), pos + cost.bulk_batch)
        if not _worth_a_job(inp, end - pos):
            break  # not cheaper by bulk (or, balanced / fast, not a full job): upsert
        # the oldest few records would make the job leave early (they were pending before
        # the burst): they go the upsert way if the job stays worth it without them
        j = 0
        while j < peel_max and _worth_a_job(inp, min(len(ordered), end + j + 1) - pos - j - 1):
            j += 1
        if j:  # as few as leave (nearly) that late: 1 % of the budget is not worth a credit
            j = bisect.bisect_left(dl, dl[pos + j] - 0.01 * inp.max_staleness, lo=pos) - pos
            end = min(len(ordered), pos + j + cost.bulk_batch)
        leave = dl[pos + j] - lat_b  # the latest moment its oldest record can leave
        if math.isfinite(tau):
            leave = now  # balanced / fast: a full job leaves at once (the upserts go first)
        chunks.append((pos + j, end, leave))
        pos = end
    jobs_now = [(a, b) for a, b, leave in chunks if leave <= now + tick]

    # -- the upsert way: everything not waiting for a job, by deadline (positions in ordered)
    ul: Sequence[int] = range(len(ordered))
    if chunks:
        ul_list: list[int] = []
        prev = 0
        for a, b, _ in chunks:
            ul_list.extend(range(prev, a))
            prev = b
        ul_list.extend(range(prev, len(ordered)))
        ul = ul_list

    def offset(p: int) -> float:  # rank p's answer, from now, if the first p+1 leave now
        call = inp.calls_ahead + p // cost.upsert_batch  # behind the calls already sent
        return (call // max(1, inp.concurrency) + 1) * (inp.upsert_latency + inp.retry_allowance)

    k_hard = 0
    last = offset(len(ul) - 1) if ul else 0.0  # the largest offset: later ones cannot be due
    for p, i in enumerate(ul):
        if dl[i] - offset(p) <= now + tick:  # due before the next look
            k_hard = p + 1
        elif dl[i] - last > now + tick:
            break
    k = k_hard
    if math.isfinite(tau):
        # ordered[i].oldest_at for i in ul is sorted (ul increases): bisect it in place
        if isinstance(ul, range):
            k_soft = bisect.bisect_right(ordered, now - tau + tick, key=_OLDEST_AT)
        else:
            k_soft = bisect.bisect_right(ul, now - tau + tick, key=lambda i: ordered[i].oldest_at)
        if k_soft > k and inp.freshness == "balanced":
            # whole credits only: a change past the target waits until it fills one
            whole = k_soft // cost.records_per_credit * cost.records_per_credit
            k = max(k, whole)
        else:
            k = max(k, k_soft)
        if inp.freshness != "economy":  # a full call leaves as soon as it is full
            k += (len(ul) - k) // cost.upsert_batch * cost.upsert_batch
        if inp.freshness == "balanced" and len(ul) - k >= BALANCED_GROUP * cost.upsert_batch:
            # enough waiting to nearly fill a call: they all leave, in whole credits
            k = max(k, len(ul) // cost.records_per_credit * cost.records_per_credit)
    if k > k_hard:
        # leaving early is for freshness: a call that would wait behind the calls already
        # queued gains none, and loses coalescing (a key changed again while its first
        # version waits in the queue is sent twice; with a 429 storm on one slot that made a
        # change 3 s late, found by hypothesis). Early calls fill the free slots only; the rest
        # are planned again when a slot frees (every answer wakes the planner)
        free_calls = max(0, max(1, inp.concurrency) - inp.calls_ahead)
        k = max(k_hard, min(k, free_calls * cost.upsert_batch))
    if k:
        k = min(len(ul), _whole_credits(cost, k))

    def offset_after(p: int, k: int) -> float:  # rank p ≥ k's answer, behind the k sent now
        call = inp.calls_ahead + -(-k // cost.upsert_batch) + (p - k) // cost.upsert_batch
        return (call // max(1, inp.concurrency) + 1) * (inp.upsert_latency + inp.retry_allowance)

    # the keys left wait behind the calls sent now, in whole calls: the last one sent may be
    # partly filled (whole credits), so rank p ≥ k is not in call p // 100 as the due test
    # took it. A key that is due behind them goes now, in that call (found by hypothesis on a
    # storm: due a moment later, it needed a call of its own one round later: 310 s > 300 s)
    while k < len(ul):
        more = 0
        last_after = offset_after(len(ul) - 1, k)
        for p in range(k, len(ul)):
            if dl[ul[p]] - offset_after(p, k) <= now + tick:
                more = p + 1
            elif dl[ul[p]] - last_after > now + tick:
                break
        if not more:
            break
        k_hard = max(k_hard, more)
        k = min(len(ul), _whole_credits(cost, more))

    up_keys = [ordered[i].key for i in ul[:k]]
    bulk_groups = [[pk.key for pk in ordered[a:b]] for a, b in jobs_now]
    ups: list[list[str]] = []
    if k_hard and ordered[ul[0]].oldest_at + inp.max_staleness - margin(inp) - now < offset(
        k_hard - 1
    ):
        # already late for the upsert way (a restart, a fault): the fastest mix for what is due,
        # the cheapest among those within the margin of the fastest (choose_mix)
        mix = choose_mix(inp, k_hard, dl[ul[0]] - now)
        if mix.bulk_jobs:
            late_ups, late_bulk = _split(inp, up_keys[:k_hard], mix)
            ups.extend(late_ups)
            bulk_groups.extend(late_bulk)
            up_keys = up_keys[k_hard:]
    ups.extend(
        up_keys[j : j + cost.upsert_batch] for j in range(0, len(up_keys), cost.upsert_batch)
    )

    need = _estimate(inp, len(ordered))
    out = Plan(ups, bulk_groups, None, "", need > spendable)
    spent = out.credits(cost)
    if spent > spendable and spent > 0:
        return _reserve(inp, ordered, ul, k_hard, offset)

    # -- when to plan again at the latest
    wakes: list[float] = [leave for _, _, leave in chunks if leave > now + tick]
    last_after = offset_after(len(ul) - 1, k) if k < len(ul) else 0.0
    first = math.inf
    for p in range(k, len(ul)):
        if dl[ul[p]] - last_after >= first:
            break  # every later one becomes due after this
        first = min(first, dl[ul[p]] - offset_after(p, k))
    if math.isfinite(first):
        wakes.append(first)
    if k < len(ul) and math.isfinite(tau):
        wakes.append(ordered[ul[k]].oldest_at + tau)
    wake = max(min(wakes), now + _tick(inp)) if wakes else None
    if out.is_empty and wake is None:
        wake = now + _tick(inp)  # cannot happen (everything sent or waiting): stay safe
    parts = []
    if bulk_groups:
        parts.append(f"{len(bulk_groups)} bulk job(s) of {sum(map(len, bulk_groups))}")
    if ups:
        parts.append(f"{len(ups)} upsert call(s) of {sum(map(len, ups))} ({k_hard} due)")
    reason = (" + ".join(parts) if parts else "wait") + f" of {len(ordered)} pending"
    return Plan(ups, bulk_groups, wake, reason, out.budget_alert)


def _bulk_eligibility_latency(inp: PlannerInput, dl: _Deadlines) -> float:
    """The bulk latency used to decide which changes can still wait for a job: the smallest
    estimate L (by size, ``bulk_latency_by_size``, else the full-job one) such that a job of
    the changes that can wait L (at most a full job) is itself estimated within L. The
    estimates are per size: a small job measured fast says nothing of a full one.

    Every size's estimate is tried, not only the full job's and then one smaller: when no
    change could wait for a *full* job any more, the full estimate was used, so changes that
    had been planned into a small job (leave at deadline − 7 s) found at that moment that
    they could not wait for any job, and left later by the already-late rule (found by
    hypothesis, session 19: 60.46 s with a 60 s bound)."""
    allowance = inp.retry_allowance
    full = bulk_time(inp, inp.cost.bulk_batch) + allowance
    for lat in sorted({s + allowance for _, s in inp.bulk_latency_by_size if s + allowance < full}):
        n = min(inp.cost.bulk_batch, len(dl) - bisect.bisect_left(dl, inp.now + lat))
        if n > 0 and bulk_time(inp, n) + allowance <= lat:
            return lat
    return full


def _worth_a_job(inp: PlannerInput, size: int) -> bool:
    """Economy: a job when it is cheaper than upsert; balanced / fast: only a full job (a
    smaller one would keep its changes waiting for a job's latency)."""
    cost = inp.cost
    if not cost.bulk_write or cost.upsert_credits(size) <= cost.bulk_job_credits:
        return False
    return inp.freshness == "economy" or size >= cost.bulk_batch


def _whole_credits(cost: CostModel, k: int) -> int:
    """``k`` topped up so that the last upsert call ends on a whole credit."""
    full, rest = divmod(k, cost.upsert_batch)
    if not rest:
        return k
    top = -(-rest // cost.records_per_credit) * cost.records_per_credit
    return full * cost.upsert_batch + min(cost.upsert_batch, top)


def _estimate(inp: PlannerInput, n: int) -> int:
    """What sending all ``n`` pending would cost at least (the cheapest mix): for the alert."""
    return _cheapest_credits(inp.cost, n) if n else 0


@functools.lru_cache(maxsize=4096)
def _cheapest_credits(cost: CostModel, n: int) -> int:
    """``cost.cheapest(n).credits``, remembered: a pure function of a frozen price list and n,
    asked at every planning step with the number pending."""
    return cost.cheapest(n).credits


def _reserve(
    inp: PlannerInput,
    ordered: list[PendingKey],
    ul: Sequence[int],
    k_hard: int,
    offset: Callable[[int], float],
) -> Plan:
    """The reserve is reached: only the changes at their deadline leave, as many as the credits
    left allow (oldest first, cheapest mix in time); the rest waits and the credits are looked
    at again after ``_budget_retry``."""
    due = [ordered[i] for i in ul[:k_hard]]
    if not due:
        wake = inp.now + _budget_retry(inp)
        if ul:
            first = ordered[ul[0]].oldest_at + inp.max_staleness - margin(inp) - offset(0)
            wake = min(wake, max(first, inp.now + _tick(inp)))
        return Plan([], [], wake, "reserve: nothing due", True)
    time_left = due[0].oldest_at + inp.max_staleness - margin(inp) - inp.now
    sent, m_due = _fit(inp, len(due), max(0, inp.credits_left), time_left)
    ups, bulk = _split(inp, [pk.key for pk in due[:sent]], m_due)
    if sent < len(due):
        reason = f"credits: {sent} of {len(due)} due changes fit in {inp.credits_left} credits left"
        return Plan(ups, bulk, inp.now + _budget_retry(inp), reason, True)
    wake = inp.now + _budget_retry(inp)
    for p in range(k_hard, len(ul)):
        at = ordered[ul[p]].oldest_at + inp.max_staleness - margin(inp) - offset(p)
        wake = min(wake, max(at, inp.now + _tick(inp)))
    return Plan(ups, bulk, wake, f"reserve: {len(due)} due sent", True)


_OLDEST_AT = operator.attrgetter("oldest_at")


class _Deadlines:
    """``dl[i] = ordered[i].oldest_at + max_staleness - margin``: each pending key's arrive-by
    time, computed when looked at. The planner only bisects it and reads a few entries near
    the front, so it is not built for every pending key at every step."""

    __slots__ = ("_minus", "_ordered", "_plus")

    def __init__(self, ordered: Sequence[PendingKey], plus: float, minus: float) -> None:
        self._ordered = ordered
        self._plus = plus
        self._minus = minus

    def __len__(self) -> int:
        return len(self._ordered)

    def __getitem__(self, i: int) -> float:
        return self._ordered[i].oldest_at + self._plus - self._minus


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
