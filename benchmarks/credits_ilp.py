"""An exact check of the credits lower bound (issue 18): the integer program of the sending
problem on small / 1-hour slices, solved by HiGHS (``scipy.optimize.milp``).

The problem, as ``benchmarks.credits`` simulates it: a change (capture ``c``, key ``k``) is
visible from the next reader batch ``v`` (the next whole ``POLL``); it is delivered when a send
of its key at some time ``t ≥ v`` is answered by ``c + max_staleness``. An upsert is answered
after ``UPSERT_LATENCY`` at the soonest, a bulk job after its fixed part ``bulk_base`` at the
soonest (both relaxed: no queueing for a slot, no per-row part). At one moment, r records by
upsert cost ⌈r / records_per_credit⌉ (calls packed at the call limit, a multiple of it), b
records by bulk ⌈b / bulk_batch⌉ jobs.

Candidate moments: any schedule stays feasible and costs no more when each send is delayed to
the earliest deadline (by its API) of the changes it is the first to deliver, so the moments
``c + max_staleness − latency`` of every change are enough. Variables: x[k, t, api] ∈ {0, 1}
(key k sent at t by api), y[t] upsert credits at t, z[t] jobs at t (integers); every change
needs one send of its key in [v, its deadline for that api]; minimise Σ y + job credits × Σ z.

This is the optimum of a relaxation of the simulated CRM (no slot queueing, jobs as fast as
their fixed part) with the real coverage and price rules, so
``lower_bound ≤ ILP optimum ≤ any policy`` (the bound relaxes it further: per-key windows,
one point per block). ``python -m benchmarks.credits_ilp [--scale S] [--hours H ...]``
"""

from __future__ import annotations

import argparse
import bisect
import math
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import credits as bench
from connector.costs import CostModel


def _visible(t: float) -> float:
    return math.floor(t / bench.POLL) * bench.POLL + bench.POLL


def ilp_optimum(
    changes: Sequence[tuple[float, str]],
    max_staleness: float,
    cost: CostModel,
    *,
    upsert_latency: float = bench.UPSERT_LATENCY,
    bulk_base: float = bench.BULK_BASE,
    time_limit: float = 120.0,
) -> tuple[int, int]:
    """(best schedule found, proven lower bound) of the integer program above, in credits:
    equal when HiGHS proved optimality within ``time_limit`` seconds; raises if it found no
    schedule at all."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if cost.upsert_batch % cost.records_per_credit:
        raise ValueError("the program packs calls: upsert_batch must be a multiple of a credit")
    if not changes:
        return 0, 0
    apis = (("u", upsert_latency), ("b", bulk_base))
    moments = {a: sorted({c + max_staleness - lat for c, _ in changes}) for a, lat in apis}
    by_key: dict[str, list[tuple[float, float]]] = {}
    for c, k in changes:
        by_key.setdefault(k, []).append((_visible(c), c))
    var: dict[tuple[str, float, str], int] = {}  # (key, moment, api) -> column
    rows: list[list[int]] = []  # per change: the columns that deliver it
    for k, evs in by_key.items():
        for v, c in evs:
            cols = []
            for a, lat in apis:
                ts = moments[a]
                lo = bisect.bisect_left(ts, v - 1e-9)
                hi = bisect.bisect_right(ts, c + max_staleness - lat + 1e-9)
                for t in ts[lo:hi]:
                    cols.append(var.setdefault((k, t, a), len(var)))
            rows.append(cols)
    if any(not r for r in rows):
        raise ValueError("a change cannot be delivered in time by any API")
    n_x = len(var)
    pairs = [(a, t) for a, _ in apis for t in moments[a]]
    slots = {p: n_x + i for i, p in enumerate(pairs)}
    n = n_x + len(slots)
    r_i: list[int] = []
    c_i: list[int] = []
    vals: list[float] = []
    for i, cols in enumerate(rows):  # coverage: Σ x ≥ 1
        r_i += [i] * len(cols)
        c_i += cols
        vals += [1.0] * len(cols)
    base = len(rows)
    per_slot: dict[int, list[int]] = {}
    for (_, t, a), col in var.items():
        per_slot.setdefault(slots[(a, t)], []).append(col)
    for j, (key, s_col) in enumerate(slots.items()):  # capacity: cap × y − Σ x ≥ 0
        cap = cost.records_per_credit if key[0] == "u" else cost.bulk_batch
        cols = per_slot.get(s_col, [])
        r_i += [base + j] * (len(cols) + 1)
        c_i += [*cols, s_col]
        vals += [-1.0] * len(cols) + [float(cap)]
    a_mat = coo_matrix((vals, (r_i, c_i)), shape=(base + len(slots), n)).tocsr()
    lb = np.zeros(base + len(slots))
    lb[:base] = 1.0
    cons = LinearConstraint(a_mat, lb, np.full(base + len(slots), np.inf))
    obj = np.zeros(n)
    for (a, _), col in slots.items():
        obj[col] = 1.0 if a == "u" else float(cost.bulk_job_credits)
    upper = np.full(n, np.inf)
    upper[:n_x] = 1.0
    res = milp(
        obj,
        constraints=[cons],
        integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), upper),
        options={"time_limit": time_limit},
    )
    if res.x is None:
        raise RuntimeError(f"HiGHS: {res.message}")
    best = round(res.fun)
    if res.status == 0:
        return best, best
    return best, math.ceil(res.mip_dual_bound - 1e-6)  # time limit: the bound HiGHS proved


def slice_changes(trace: bench.Trace, start: float, hours: float) -> list[tuple[float, str, str]]:
    end = start + hours * 3600
    return [(t - start, k, op) for t, k, op in trace.changes if start <= t < end]


def check(
    scale: float, seed: int, picks: Sequence[tuple[str, float]], time_limit: float = 120.0
) -> list[dict[str, Any]]:
    """Per (trace, hour): lower bound, ILP optimum and the planner (economy) on that 1-hour
    slice of the trace, run alone."""
    cost = CostModel()
    traces = {t.name: t for t in bench.make_traces(scale, seed)}
    out = []
    for name, hour in picks:
        tr = traces[name]
        sl = bench.Trace(f"{name}@{hour:g}h", tr.title, slice_changes(tr, hour * 3600, 1.0))
        sl.bulk_base = tr.bulk_base
        pairs = [(t, k) for t, k, _ in sl.changes]
        lb = bench.trace_lower_bound(sl, cost)
        t0 = time.perf_counter()
        try:
            opt, proven = ilp_optimum(
                pairs, bench.MAX_STALENESS, cost, bulk_base=tr.bulk_base, time_limit=time_limit
            )
        except RuntimeError as exc:  # no schedule found within the time limit
            row = {"slice": sl.name, "changes": len(pairs), "lower_bound": lb, "ilp": str(exc)}
            out.append(row)
            continue
        secs = time.perf_counter() - t0
        crm = bench.Crm(cost, tr.bulk_base)
        bench.policy_d(sl, crm, "economy")
        out.append(
            {
                "slice": sl.name,
                "changes": len(pairs),
                "lower_bound": lb,
                "ilp_best": opt,
                "ilp_proven_bound": proven,  # = ilp_best when HiGHS proved it optimal
                "ilp_seconds": round(secs, 1),
                "economy": crm.credits,
                "optimal": opt == proven,
                "lb_le_ilp": lb <= proven if opt == proven else None,  # None: not proven
                "economy_vs_ilp": round(crm.credits / opt, 4) if opt else 1.0,
                "economy_vs_ilp_bound": round(crm.credits / proven, 4) if proven else 1.0,
            }
        )
    return out


# small slices: the program's LP relaxation is weak (credits are rounded up per moment), so
# HiGHS proves optimality quickly only for a few dozen to a few hundred changes
DEFAULT_PICKS = (("seed", 4.0), ("seed", 6.0), ("seed", 8.0), ("seed", 10.0), ("seed", 16.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.credits_ilp", description=__doc__)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--time-limit", type=float, default=120.0, help="HiGHS seconds per slice")
    args = ap.parse_args(argv)
    for row in check(args.scale, args.seed, DEFAULT_PICKS, args.time_limit):
        print(" | ".join(f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
