"""Where the median staleness of a burst trace comes from: the p50 of the burst's own rows and of
the seed-day rows beside them, per policy (b), balanced and fast (issue 18's p50 ties).

    python -m benchmarks.credits_p50_split bursts young_burst twice after_flush

Prints one line per (trace, policy); not part of ``python -m benchmarks all`` (it repeats three
of the credits benchmark's simulations per trace, ~1-2 minutes each at scale 1).
"""

from __future__ import annotations

import statistics
import sys

from benchmarks import credits as c
from connector.costs import CostModel


def _q(values: list[float], p: float) -> float | None:
    return round(values[int(p * (len(values) - 1))], 1) if values else None


def main(argv: list[str]) -> int:
    traces = {t.name: t for t in c.make_traces(1.0, 7)}
    seed_keys = {k for _, k, _ in traces["seed"].changes}
    for name in argv or ["bursts", "young_burst", "twice", "after_flush"]:
        tr = traces[name]
        for f in ("b", "balanced", "fast"):
            crm = c.Crm(CostModel(), tr.bulk_base)
            c.POLICY_FUNCS[f](tr, crm)
            st, _ = c.staleness(tr, crm)
            rows = list(zip(st, tr.changes, strict=True))
            burst = sorted(s for s, (_, k, _) in rows if k not in seed_keys)
            other = sorted(s for s, (_, k, _) in rows if k in seed_keys)
            print(
                f"{name} {f}: all p50 {statistics.median(st):.1f} s | burst rows {len(burst):,}"
                f" p50 {_q(burst, 0.5)} s | seed-day rows {len(other):,} p50 {_q(other, 0.5)} s"
                f" | credits {crm.credits:,}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
