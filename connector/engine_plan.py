"""The engine's planning step (docs/planner.md): what is pending goes to the planner with what it
must know (deadlines, a waiting child's pull, latencies, credits, the calls ahead of it in this
pipeline and across the org: connector/org.py), and the plan is dispatched to the emitter.

``Planning`` is a mixin of :class:`connector.engine.Engine`, which holds the state it uses
(declared below for the type checker). Split from ``connector.engine`` (session 22, moves
only)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from connector.coalesce import Coalescer, PendingEntry
from connector.config import PipelineConfig
from connector.costs import CostModel
from connector.emitter import EmitOutcome, Emitter
from connector.engine_common import Clock, EngineOptions, _earliest
from connector.engine_drain import drain_plan
from connector.latency import LatencyEstimator
from connector.metrics import Metrics
from connector.org import board_for
from connector.planner import PendingKey, Plan, PlannerInput, plan
from connector.zoho.client import ZohoClient

# the engine's logger: records keep the name they had before the split
log = logging.getLogger("connector.engine")


class Planning:
    """Plan and dispatch: a mixin of ``Engine``."""

    pipeline: PipelineConfig
    client: ZohoClient
    clock: Clock
    metrics: Metrics | None
    options: EngineOptions
    cost: CostModel
    budget: int
    reserve: int
    coalescer: Coalescer
    emitter: Emitter | None
    _retry_until: float
    _flushing: bool
    _drain_all: bool
    _drain_once: bool
    _pulled: dict[str, float]
    _bulk_out: bool
    _spent_24h: int
    _calls_seen: int
    _calls_seen_at: float
    _tasks: set[asyncio.Task[EmitOutcome]]
    _bulk_tasks: set[asyncio.Task[EmitOutcome]]

    if TYPE_CHECKING:  # defined by Engine and its mixins OrphanFences, SnapshotRuns

        def _expire_fences(self, now: float) -> float | None: ...
        def _holding_backlog(self) -> bool: ...
        def _spawn(
            self,
            send: Callable[[list[PendingEntry]], Awaitable[EmitOutcome]],
            entries: list[PendingEntry],
            kind: str,
        ) -> None: ...

    def _dispatch(self, now: float) -> float | None:
        fence_end = self._expire_fences(now)
        if now < self._retry_until:
            return _earliest(self._retry_until, fence_end)
        self._flushing = False
        p = self._plan(now)
        if p is None:
            return fence_end
        assert self.emitter is not None
        for keys in p.bulk:
            entries = self.coalescer.take(keys)
            if entries:
                self._spawn(self.emitter.send_bulk, entries, "bulk")
        for keys in p.upserts:
            entries = self.coalescer.take(keys)
            if entries:
                self._spawn(self.emitter.send_upsert, entries, "upsert")
        if p.upserts or p.bulk:
            log.debug(
                "plan dispatched",
                extra={
                    "pipeline": self.pipeline.name,
                    "reason": p.reason,
                    "upsert_calls": len(p.upserts),
                    "bulk_jobs": len(p.bulk),
                },
            )
        if self.metrics is not None:
            self.metrics.api_credits_below_reserve.set(1 if p.budget_alert else 0)
        return _earliest(p.wake_at, fence_end)

    def _plan(self, now: float) -> Plan | None:
        pending = self.coalescer.pending()
        if not pending:
            self._drain_once = False
            return None
        in_flight = self.coalescer.in_flight()
        fenced = self.coalescer.fenced()
        max_staleness = self.pipeline.max_staleness.total_seconds()
        pulled = self._pulled  # a waiting child's need: never later than the key's own deadline
        keys = [
            PendingKey(
                e.key,
                min(
                    (e.live_at or e.oldest_at).timestamp(),
                    pulled.get(e.key, math.inf) - max_staleness,
                ),
                e.key in in_flight or e.key in fenced,
                backlog=e.live_at is None,
            )
            for e in pending.values()
        ]
        assert self.emitter is not None
        est = self.emitter.latency  # high percentiles, bulk by job size (connector/latency.py)
        est.default_upsert = self.options.default_upsert_latency
        bulk_full, bulk_by_size = est.bulk_profile(self.cost.bulk_batch, now)
        if est.typical_bulk(1) is not None:  # measured: the default alone is not a finding
            self._note_bulk_out(bulk_full, max_staleness)
        inp = PlannerInput(
            now=now,
            pending=keys,
            max_staleness=max_staleness,
            credits_left=self._credits_left,
            reserve=self.reserve,
            concurrency=self.client.limiter.limit,
            upsert_latency=est.upsert(),
            bulk_latency=bulk_full,
            cost=self.cost,
            hold_backlog=self._holding_backlog(),
            freshness=self.pipeline.freshness,
            bulk_latency_by_size=bulk_by_size,
            retry_allowance=self.pipeline.retry_allowance.total_seconds(),
            calls_ahead=self._calls_ahead() + self._org_calls_ahead(keys, max_staleness, est),
        )
        if self._drain_all or self._drain_once:
            self._flushing = self._drain_once
            self._drain_once = False
            return drain_plan(inp)
        return plan(inp)

    def _org_calls_ahead(
        self, keys: list[PendingKey], max_staleness: float, est: LatencyEstimator
    ) -> int:
        """One org (connector/org.py): publish this pipeline's live pending keys by deadline,
        and count the calls the org's other pipelines need for keys due by this one's first
        deadline plus the time the org's pending calls take (``OrgBoard.calls_ahead``): they
        may hold the shared slots before its own calls."""
        deadlines = [
            pk.oldest_at + max_staleness for pk in keys if not pk.in_flight and not pk.backlog
        ]
        board = board_for(self.client.limiter)
        board.publish(self.pipeline.name, deadlines, self.cost.upsert_batch)
        if not deadlines:
            return 0
        round_s = est.upsert() + self.pipeline.retry_allowance.total_seconds()
        own = -(-len(deadlines) // self.cost.upsert_batch)
        return board.calls_ahead(
            self.pipeline.name, min(deadlines), round_s, self.client.limiter.limit, own
        )

    def _calls_ahead(self) -> int:
        """API calls a call planned now starts behind: those at the shared limiter (holding a
        slot or waiting for one, every pipeline), or this engine's upsert calls not answered
        yet when more (a spawned call may still be on its way to the limiter)."""
        own = sum(1 for t in self._tasks if not t.done() and t not in self._bulk_tasks)
        return max(self.client.limiter.queued, own)

    def _note_bulk_out(self, estimate: float, max_staleness: float) -> None:
        """Say when a full bulk job's estimate (with ``retry_allowance``) reaches
        ``max_staleness``, so no live change can wait for a job, and when it no longer does:
        otherwise the only sign is the credits (connector/latency.py, the estimate trap)."""
        out = estimate + self.pipeline.retry_allowance.total_seconds() >= max_staleness
        if out == self._bulk_out:
            return
        self._bulk_out = out
        extra = {
            "pipeline": self.pipeline.name,
            "estimate_seconds": round(estimate, 1),
            "max_staleness_seconds": max_staleness,
        }
        if out:
            log.warning(
                "bulk jobs are estimated slower than max_staleness: live changes go by upsert"
                " until a job is measured faster or the slow measurements age (15 minutes)",
                extra=extra,
            )
        else:
            log.info("bulk jobs fit max_staleness again", extra=extra)

    @property
    def _credits_left(self) -> int:
        left = self.budget - self._spent_24h
        remaining = self.client.credits_remaining
        if remaining is not None and self._crm_remaining_fresh():
            left = min(left, remaining)
        return left

    def _crm_remaining_fresh(self) -> bool:
        """The CRM's remaining count is a reading at the last call. Without calls it never
        changes, so a 0 read when the allowance ran out would stop sending for good although
        the CRM's window rolls on: after ``credit_probe_interval`` without a call it is not
        used (the ledger is), and the next flush's answer reads it again."""
        calls = int(getattr(self.client, "calls", 0))
        now = self.clock.monotonic()
        if calls != self._calls_seen:
            self._calls_seen, self._calls_seen_at = calls, now
        return now - self._calls_seen_at < self.options.credit_probe_interval
