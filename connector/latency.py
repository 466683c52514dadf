"""Conservative latency estimates for the planner (docs/planner.md, "Latency estimates").

The planner promises that no change arrives later than ``max_staleness`` *under the latencies
it is given*, so those must not be averages: an average of upsert calls hides the slow ones
(429 storms, retried calls), and an average of bulk jobs measured on small jobs says nothing of
a full one (the running average the planner was fed before let whole jobs arrive late).

* Upsert: the ``quantile`` (nearest rank, 95 % by default) of the last ``window`` measured
  calls, start to answer (the client's retries included). With fewer than 20 samples that is
  the slowest one.
* Bulk, by job size: a job of *n* records is assumed to take no longer than the ``quantile``
  of the jobs measured with at least *n* records (a bigger job is not faster). A size larger
  than every measured job is extrapolated in proportion to its records from the largest jobs
  measured (an upper bound whenever a job's time is a fixed part plus a part per record). The
  configured default is used only while no job was measured: it must not override a
  measurement (one initial-sync job of 24,918 records answered in 5.5 s made every later full
  job "120 s", so no full job ever went by bulk and none was measured again — a 60-minute soak
  with 30 s ``max_staleness`` spent 3x the credits on its mass updates). Both fail safe: a
  too-high bulk estimate only costs credits (the changes go by upsert instead), a too-low one
  makes changes late. But a too-high one corrects itself only through a new measurement, which
  it forbids: the measurements must be honest (a lost callback noticed at a late poll is not the
  CRM's time: the emitter polls at 1.5x :meth:`typical_bulk`) and a restart restores the whole
  window (docs/planner.md, "the bulk-estimate trap").
* Bulk measurements age: one older than ``bulk_fresh_for`` (15 minutes) no longer counts in the
  high percentile. The estimate is the high percentile of the fresh ones, never below the
  median of all kept ones, and that median alone when none is fresh. Without it a slow spell
  of the CRM (a soak measured jobs of 24-28 s against a 30 s ``max_staleness``, under latency
  windows or lost callbacks) left the estimate above the bound for good, since it forbids
  the jobs that would measure it again. The price: while the CRM stays slow, one job per
  ``bulk_fresh_for`` is planned with the median, and may arrive late.

Pure: samples are pushed in (each bulk one with its time, ``at``), nothing is timed here; the
caller passes ``now`` (a measurement or a ``now`` of ``None`` never ages).
"""

from __future__ import annotations

import math
from collections import deque

UPSERT_WINDOW = 200
BULK_WINDOW = 100
#: seconds a bulk measurement counts in the high percentile (then only in the median)
BULK_FRESH_FOR = 900.0


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank ``q`` quantile of ``values`` (not empty)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class LatencyEstimator:
    def __init__(
        self,
        default_upsert: float = 2.0,
        default_bulk: float = 120.0,
        quantile: float = 0.95,
        upsert_window: int = UPSERT_WINDOW,
        bulk_window: int = BULK_WINDOW,
        *,
        bulk_fresh_for: float = BULK_FRESH_FOR,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError("quantile must be in (0, 1]")
        self.default_upsert = default_upsert
        self.default_bulk = default_bulk
        self.q = quantile
        self._upsert: deque[float] = deque(maxlen=upsert_window)
        self.bulk_fresh_for = bulk_fresh_for
        self._bulk: deque[tuple[int, float, float | None]] = deque(maxlen=bulk_window)

    def observe_upsert(self, seconds: float) -> None:
        self._upsert.append(max(0.0, seconds))

    def observe_bulk(self, records: int, seconds: float, at: float | None = None) -> None:
        """A job of ``records`` took ``seconds``, measured at ``at`` (epoch seconds; None:
        never ages)."""
        self._bulk.append((max(1, records), max(0.0, seconds), at))

    def forget_bulk(self) -> None:
        """Drop every bulk measurement (before they are restored from the state tables)."""
        self._bulk.clear()

    def upsert(self) -> float:
        """Seconds one upsert call is assumed to take."""
        if not self._upsert:
            return self.default_upsert
        return quantile(list(self._upsert), self.q)

    def bulk(self, records: int, now: float | None = None) -> float:
        """Seconds a bulk job of ``records`` records is assumed to take at ``now``: the high
        percentile of the fresh measurements, at least the median of all (that alone when none
        is fresh)."""
        if not self._bulk:
            return self.default_bulk
        every = [(r, s) for r, s, _ in self._bulk]
        typical = _size_quantile(every, records, 0.5)
        fresh = [
            (r, s)
            for r, s, at in self._bulk
            if now is None or at is None or now - at <= self.bulk_fresh_for
        ]
        if not fresh:
            return typical
        return max(typical, _size_quantile(fresh, records, self.q))

    def typical_bulk(self, records: int) -> float | None:
        """The median of the jobs measured for ``records`` records (by the same size rule as
        :meth:`bulk`), ``None`` before any job was measured: when a job's callback is late.
        A median, not the planner's high percentile, so that one slow measurement does not
        move the safety-net poll that measures the next jobs (docs/planner.md, "Latency
        estimates")."""
        if not self._bulk:
            return None
        return _size_quantile([(r, s) for r, s, _ in self._bulk], records, 0.5)

    def bulk_profile(
        self, full_job: int, now: float | None = None
    ) -> tuple[float, tuple[tuple[int, float], ...]]:
        """The planner's inputs at ``now``: (estimate for a job of ``full_job`` records,
        entries (records, seconds) for each measured job size below it)."""
        sizes = sorted({r for r, _, _ in self._bulk if r < full_job})
        return self.bulk(full_job, now), tuple((r, self.bulk(r, now)) for r in sizes)


def _size_quantile(jobs: list[tuple[int, float]], records: int, q: float) -> float:
    """The ``q`` quantile of the jobs (records, seconds) with at least ``records`` records;
    above every one, in proportion to records from the largest (``jobs`` not empty)."""
    larger = [s for r, s in jobs if r >= records]
    if larger:
        return quantile(larger, q)
    top = max(r for r, _ in jobs)
    return quantile([s for r, s in jobs if r == top], q) * records / top
