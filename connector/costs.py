"""The CRM's price list as a pure cost model (DESIGN.md §1, zoho-crm-api.md §4.2).

Shared by the planner, the benchmarks and the Zoho client (:class:`CreditCosts`), so that all
three charge the same (the emulator stands alone and keeps its own table, same defaults):

* Insert / Update / Upsert: at most ``upsert_batch`` records per call, 1 credit per
  ``records_per_credit`` records of the call, rounded up;
* Bulk Write: at most ``bulk_batch`` records per job, ``bulk_job_credits`` per job (charged when
  the job is created).

Nothing here is a constant of the decision: ``break_even`` and ``cheapest`` are derived from the
four prices, so a different price list gives consistent answers.

:class:`CreditCosts` is what the Zoho client charges each call it makes; its record and bulk-job
prices are the :class:`CostModel`'s, so the client and the planner count from one price list.
"""

from __future__ import annotations

from dataclasses import dataclass


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Mix:
    """How to send ``records`` distinct records: ``bulk_records`` of them in ``bulk_jobs`` jobs,
    the other ``upsert_records`` in ``upsert_calls`` upsert calls packed at the call limit."""

    records: int
    bulk_jobs: int
    bulk_records: int
    upsert_calls: int
    upsert_records: int
    credits: int


@dataclass(frozen=True, slots=True)
class CostModel:
    upsert_batch: int = 100
    records_per_credit: int = 10
    bulk_batch: int = 25_000
    bulk_job_credits: int = 500
    #: whether Bulk Write may carry this pipeline's records: False for a subform pipeline
    #: (Zoho's Bulk Write takes no subform column, zoho-crm-api.md; the emulator refuses one):
    #: then every mix is upsert only
    bulk_write: bool = True

    def __post_init__(self) -> None:
        for name in ("upsert_batch", "records_per_credit", "bulk_batch", "bulk_job_credits"):
            if getattr(self, name) < 1:
                raise ValueError(f"CostModel.{name} must be at least 1")

    # -- upsert -----------------------------------------------------------------------------
    def call_credits(self, k: int) -> int:
        """Credits of one upsert call carrying ``k`` records (1 ≤ k ≤ upsert_batch)."""
        if not 0 < k <= self.upsert_batch:
            raise ValueError(f"an upsert call carries 1..{self.upsert_batch} records, not {k}")
        return _ceil_div(k, self.records_per_credit)

    def upsert_calls(self, n: int) -> int:
        """Calls needed for ``n`` records packed ``upsert_batch`` to a call."""
        _check_n(n)
        return _ceil_div(n, self.upsert_batch)

    def upsert_credits(self, n: int) -> int:
        """Credits for ``n`` records packed ``upsert_batch`` to a call (full calls, then one
        partial call)."""
        _check_n(n)
        full, rest = divmod(n, self.upsert_batch)
        return full * self.call_credits(self.upsert_batch) + (
            self.call_credits(rest) if rest else 0
        )

    # -- bulk -------------------------------------------------------------------------------
    def bulk_jobs(self, n: int) -> int:
        _check_n(n)
        return _ceil_div(n, self.bulk_batch)

    def bulk_credits(self, n: int) -> int:
        return self.bulk_jobs(n) * self.bulk_job_credits

    # -- decisions --------------------------------------------------------------------------
    def mix(self, n: int, jobs: int) -> Mix:
        """The mix that sends ``n`` records with ``jobs`` bulk jobs, each as full as possible,
        and the rest by upsert."""
        _check_n(n)
        if jobs < 0:
            raise ValueError("jobs must be non-negative")
        bulk = min(n, jobs * self.bulk_batch)
        jobs = _ceil_div(bulk, self.bulk_batch)  # never an empty job
        rest = n - bulk
        return Mix(
            records=n,
            bulk_jobs=jobs,
            bulk_records=bulk,
            upsert_calls=self.upsert_calls(rest),
            upsert_records=rest,
            credits=jobs * self.bulk_job_credits + self.upsert_credits(rest),
        )

    def mixes(self, n: int) -> list[Mix]:
        """Every sensible mix for ``n`` records: 0 … ⌈n / bulk_batch⌉ bulk jobs (none without
        ``bulk_write``)."""
        if not self.bulk_write:
            return [self.mix(n, 0)]
        return [self.mix(n, j) for j in range(self.bulk_jobs(n) + 1)]

    def cheapest(self, n: int) -> Mix:
        """The mix of fewest credits; on a tie the one with fewer bulk jobs (upsert answers in
        about a second, a bulk job in a minute or more)."""
        best = self.mix(n, 0)
        for m in self.mixes(n)[1:]:
            if m.credits < best.credits:
                best = m
        return best

    def break_even(self) -> int:
        """The largest number of records for which upsert costs no more than one bulk job.

        Above it a bulk job is strictly cheaper (5,000 with the default prices). Derived by
        bisection on ``upsert_credits``, which never decreases with n.
        """
        lo, hi = 0, self.bulk_job_credits * self.upsert_batch + 1  # upsert_credits(hi) > job
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.upsert_credits(mid) <= self.bulk_job_credits:
                lo = mid
            else:
                hi = mid
        return lo


@dataclass(frozen=True, slots=True)
class CreditCosts:
    """The credits of each CRM API call the client makes (zoho-crm-api.md §4.2; DESIGN.md §1):
    a records call and a bulk job at the ``model``'s prices, the rest as listed here."""

    model: CostModel = CostModel()
    # Zoho's API-limits page lists the calls that cost more than one credit and says "All other
    # APIs: 1"; upload, job details and the result download are not listed, so each costs 1
    # (zoho-crm-api.md §4.2; the specific value is not stated anywhere: counting 1 fails safe)
    bulk_upload: int = 1
    bulk_job_details: int = 1
    bulk_download: int = 1
    default: int = 1
    # COQL by LIMIT (zoho-crm-api.md §4.2, third-party quotes of the v8 page): (max limit, cost)
    coql_tiers: tuple[tuple[int, int], ...] = ((200, 1), (1_000, 2), (2_000, 3))

    @property
    def records_per_credit(self) -> int:
        return self.model.records_per_credit

    @property
    def bulk_job(self) -> int:
        """Credits of one bulk write job (charged when the job is created)."""
        return self.model.bulk_job_credits

    def records(self, n: int) -> int:
        """Credits of one insert / update / upsert / delete call of ``n`` records (at least 1)."""
        return max(1, _ceil_div(n, self.model.records_per_credit))

    def coql(self, limit: int) -> int:
        for top, cost in self.coql_tiers:
            if limit <= top:
                return cost
        return self.coql_tiers[-1][1]


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError("a number of records must be non-negative")
