"""Cyclic garbage collector settings for the long-running process (issue 19).

The pipeline allocates many short-lived containers per event (row images, records, stamps),
which triggers CPython's generation-0 collection every 700 net allocations, and each full
collection walks every object imported at start-up. ``tune_gc`` moves the start-up objects to
the permanent generation (``gc.freeze``: never scanned again) and raises the thresholds, so
collections run far less often. Reference counting still frees almost everything at once;
what only the cyclic collector can free (reference cycles) waits for a full collection, and
with these thresholds that comes rarely (every 50,000 × 20 × 20 net allocations at most, and
only once the long-lived objects grew by a quarter): so code on the per-event path must make
no cycle that holds a batch. One did (a rejected row's caught exception, whose traceback held
the emitter's frame and its whole group): a fault-free connector's RSS grew ~25 MB a minute
(session 15; ``DataError.detached``, tests/pipeline/test_reference_cycles.py). Called by
``connector run`` after its imports and by the ceiling benchmark (benchmarks/ceiling.py) the
same way."""

from __future__ import annotations

import gc

#: generation-0 threshold (CPython's default: 700), then generations 1 and 2 (default 10, 10)
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> tuple[int, int, int]:
    """Collect once, freeze what survives (the start-up imports and configuration), raise the
    collector's thresholds. Returns the thresholds that were in force before."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return before
