"""Cyclic garbage collector settings for the long-running process (issue 19).

The pipeline allocates many short-lived containers per event (row images, records, stamps),
which triggers CPython's generation-0 collection every 700 net allocations, and each full
collection walks every object imported at start-up. ``tune_gc`` moves the start-up objects to
the permanent generation (``gc.freeze``: never scanned again) and raises the thresholds, so
collections run far less often. Reference counting still frees almost everything at once;
only reference cycles wait a little longer. Called by ``connector run`` after its imports and
by the ceiling benchmark (benchmarks/ceiling.py) the same way."""

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
