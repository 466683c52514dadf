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
  d  this connector: connector.coalesce.Coalescer + connector.planner.plan;
  ref  clairvoyant reference: knows the trace, flushes everything pending exactly when the
     oldest pending change must leave to arrive at its deadline, cheapest API mix per flush.

``python -m benchmarks credits [--scale S] [--seed N] [--out DIR] [--no-charts]``
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from connector.coalesce import Coalescer, PendingEntry
from connector.costs import CostModel, Mix
from connector.events import ChangeEvent, Op
from connector.planner import PendingKey, PlannerInput, plan

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
POLICIES = ("a", "b", "c", "d", "ref")
LABELS = {
    "a": "(a) one call per change",
    "b": "(b) 100 or 10 min, upsert",
    "c": "(c) b + bulk above 5,000",
    "d": "(d) this planner",
    "ref": "clairvoyant reference",
}

# --------------------------------------------------------------------------------------------
# traces: (time, key, op) sorted by time; version = position in the trace


@dataclass
class Trace:
    name: str
    title: str
    changes: list[tuple[float, str, str]]  # (captured_at seconds, key, op)

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
    ]


# --------------------------------------------------------------------------------------------
# the simulated CRM, identical for every policy


@dataclass
class Crm:
    cost: CostModel
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
        done = t + BULK_BASE + len(versions) / BULK_RATE
        self.jobs += 1
        self._log(t, self.cost.bulk_job_credits, versions, done)
        return done

    def send_time(self, mix: Mix) -> float:
        """Exact time for a mix on an idle CRM (used by the clairvoyant reference)."""
        t_up = math.ceil(mix.upsert_calls / CONCURRENCY) * UPSERT_LATENCY
        t_bulk = BULK_BASE + min(mix.bulk_records, self.cost.bulk_batch) / BULK_RATE
        return max(t_up, t_bulk if mix.bulk_jobs else 0.0)


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


def policy_d(trace: Trace, crm: Crm) -> None:
    """The connector's own pipeline: every change becomes a ChangeEvent in the Coalescer, the
    planner decides, sends go to the CRM, answers complete the entries (fencing included)."""
    coal = Coalescer()
    keys_pk: dict[str, PendingKey] = {}
    done_heap: list[tuple[float, int, list[PendingEntry]]] = []
    seq = 0
    wake: float | None = None
    batches = list(trace.batches())
    bi = 0

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
            _, _, entries = heapq.heappop(done_heap)
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
        p = plan(
            PlannerInput(
                now=now,
                pending=list(keys_pk.values()),
                max_staleness=MAX_STALENESS,
                credits_left=BUDGET - crm.credits,
                reserve=RESERVE,
                concurrency=CONCURRENCY,
                upsert_latency=UPSERT_LATENCY,
                bulk_latency=BULK_BASE + crm.cost.bulk_batch / BULK_RATE,
                cost=crm.cost,
            )
        )
        wake = p.wake_at
        for group, send in ((p.bulk, crm.bulk), (p.upserts, crm.upsert)):
            for keys in group:
                entries = coal.take(keys)
                for e in entries:
                    del keys_pk[e.key]
                done = send(now, [e.event.version for e in entries])
                seq += 1
                heapq.heappush(done_heap, (done, seq, entries))
        if p.is_empty and wake is None and bi >= len(batches) and not done_heap and len(coal):
            raise RuntimeError(f"policy d: {len(coal)} pending and no wake-up: {p.reason}")


def policy_ref(trace: Trace, crm: Crm) -> None:
    """Knows when the next change arrives, so it can wait exactly until the oldest pending
    change must leave (deadline minus the exact send time of the cheapest mix)."""
    cost = crm.cost
    pending: dict[str, int] = {}
    oldest = math.inf
    batches = list(trace.batches())

    def mix_for(n: int, time_left: float) -> Mix:
        ok = [m for m in cost.mixes(n) if crm.send_time(m) <= time_left]
        if ok:
            return min(ok, key=lambda m: (m.credits, m.bulk_jobs))
        return min(cost.mixes(n), key=lambda m: (crm.send_time(m), m.credits))

    def flush(t: float) -> None:
        nonlocal oldest
        items = list(pending.values())
        mix = mix_for(len(items), oldest + MAX_STALENESS - t)
        for j in range(0, mix.bulk_records, cost.bulk_batch):
            crm.bulk(t, items[j : min(j + cost.bulk_batch, mix.bulk_records)])
        for j in range(mix.bulk_records, len(items), cost.upsert_batch):
            crm.upsert(t, items[j : j + cost.upsert_batch])
        pending.clear()
        oldest = math.inf

    prev_t = 0.0
    for t, idx in batches:
        # would the flush have to leave before this batch arrives? then it leaves exactly then
        if pending:
            deadline = oldest + MAX_STALENESS
            mix = mix_for(len(pending), deadline - prev_t)
            leave = deadline - crm.send_time(mix)
            if leave < t:
                flush(max(leave, prev_t))
        prev_t = t
        for i in idx:
            _, key, _ = trace.changes[i]
            oldest = min(oldest, trace.changes[i][0])
            pending.pop(key, None)
            pending[key] = i
    while pending:
        mix = mix_for(len(pending), oldest + MAX_STALENESS)
        flush(max(oldest + MAX_STALENESS - crm.send_time(mix), batches[-1][0]))


POLICY_FUNCS: dict[str, Callable[[Trace, Crm], None]] = {
    "a": policy_a,
    "b": policy_b,
    "c": policy_c,
    "d": policy_d,
    "ref": policy_ref,
}

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


def run_trace(trace: Trace, cost: CostModel) -> dict[str, Any]:
    res: dict[str, Any] = {
        "title": trace.title,
        "changes": len(trace.changes),
        "keys": len({k for _, k, _ in trace.changes}),
        "policies": {},
    }
    curves: dict[str, Any] = {}
    for name in POLICIES:
        crm = Crm(cost)
        t0 = time.perf_counter()
        POLICY_FUNCS[name](trace, crm)
        wall = time.perf_counter() - t0
        st, regressions = staleness(trace, crm)
        sorted_st = sorted(st)
        res["policies"][name] = {
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
        curves[name] = (crm.spend, sorted_st)
    d, ref = res["policies"]["d"], res["policies"]["ref"]
    res["targets"] = {
        "d_not_above_b": d["credits"] <= res["policies"]["b"]["credits"],
        "d_not_above_c": d["credits"] <= res["policies"]["c"]["credits"],
        "d_no_staleness_violation": d["missed_max_staleness"] == 0,
        "d_vs_reference": round(d["credits"] / ref["credits"], 4) if ref["credits"] else 1.0,
        "d_within_5pct_of_reference": d["credits"] <= 1.05 * ref["credits"],
    }
    res["_curves"] = curves
    return res


def chart(name: str, res: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for pol, (spend, st) in res["_curves"].items():
        xs = [0.0] + [t / 3600 for t, _ in spend]
        ys = [0] + [c for _, c in spend]
        xs.append(max(24.0, xs[-1]))
        ys.append(ys[-1])
        ax1.step(xs, ys, where="post", label=f"{LABELS[pol]}: {ys[-1]:,}")
        if st:
            step = max(1, len(st) // 2000)
            sample = [*st[::step], st[-1]]
            ax2.plot(sample, [k / (len(sample) - 1) for k in range(len(sample))], label=LABELS[pol])
    ax1.set_yscale("symlog", linthresh=100)
    ax1.set_xlabel("hour of day")
    ax1.set_ylabel("cumulative credits")
    ax1.set_xlim(0, 24.5)
    ax1.legend(fontsize=8)
    ax1.set_title(f"{name}: credits through the day")
    ax2.axvline(MAX_STALENESS, color="red", linestyle="--", linewidth=1, label="max_staleness")
    ax2.set_xscale("symlog", linthresh=10)
    ax2.set_xlim(left=0)
    ax2.set_xlabel("staleness (s, commit → answered by the CRM)")
    ax2.set_ylabel("fraction of changes")
    ax2.set_title(f"{name}: staleness distribution (CDF)")
    ax2.legend(fontsize=8)
    fig.suptitle(res["title"], fontsize=10)
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


def run(
    scale: float = 1.0, seed: int = 7, out: Path | None = RESULTS, charts: bool = True
) -> dict[str, Any]:
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
            "bulk_job_s": f"{BULK_BASE:g} + rows/{BULK_RATE:g}",
            "reader_poll_s": POLL,
            "break_even_records": cost.break_even(),
        },
        "traces": {},
        "charts": [],
    }
    for trace in make_traces(scale, seed):
        res = run_trace(trace, cost)
        if charts and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            result["charts"].append(chart(trace.name, res, out))
        del res["_curves"]
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
        "API calls",
        "bulk jobs",
        "p50 s",
        "p99 s",
        "max s",
        "missed 10 min",
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
                    r["api_calls"],
                    r["bulk_jobs"],
                    r["staleness_p50_s"],
                    r["staleness_p99_s"],
                    r["staleness_max_s"],
                    r["missed_max_staleness"],
                    r["older_landed_after_newer"],
                ]
            )
        tg = res["targets"]
        out.append(
            {
                "title": (
                    f"{name}: {res['title']} ({res['changes']:,} changes, {res['keys']:,} keys)"
                ),
                "columns": cols,
                "rows": rows,
                "note": (
                    f"(d)/reference = {tg['d_vs_reference']:.3f}; "
                    f"(d) ≤ (b): {tg['d_not_above_b']}; "
                    f"(d) ≤ (c): {tg['d_not_above_c']}; (d) no violation: "
                    f"{tg['d_no_staleness_violation']}"
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
    args = ap.parse_args(argv)
    res = run(args.scale, args.seed, args.out, not args.no_charts)
    for tb in res["tables"]:
        print(tb["title"])
        for row in tb["rows"]:
            print("   ", " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in row))
        print("   ", tb["note"])
    print(f"wall {res['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
