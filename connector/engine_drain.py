"""The drain plan: what ``Engine.drain``, ``run_snapshot``, ``replay`` and ``flush_all`` send
instead of the planner's plan. Pure (no I/O). Split from ``connector.engine`` (issue 20), which
re-exports it."""

from __future__ import annotations

import math

from connector.planner import Plan, PlannerInput, choose_mix


def drain_plan(inp: PlannerInput) -> Plan:
    """Everything pending and not in flight, now, with the cheapest mix for its size (ties go
    to fewer bulk jobs): the planner's cost rule without its waiting."""
    free = sorted((pk for pk in inp.pending if not pk.in_flight), key=lambda pk: pk.oldest_at)
    if not free:
        return Plan([], [], None, "drain: all pending keys in flight", False)
    keys = [pk.key for pk in free]
    mix = choose_mix(inp, len(keys), math.inf)
    c = inp.cost
    bulk_keys, up_keys = keys[: mix.bulk_records], keys[mix.bulk_records :]
    bulk = [bulk_keys[i : i + c.bulk_batch] for i in range(0, len(bulk_keys), c.bulk_batch)]
    ups = [up_keys[i : i + c.upsert_batch] for i in range(0, len(up_keys), c.upsert_batch)]
    return Plan(ups, bulk, None, f"drain {len(keys)}", inp.credits_left < inp.reserve)
