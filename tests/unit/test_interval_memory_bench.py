"""The interval-sync memory benchmark at a tiny size: it merges, hands out in bulk-sized
groups and completes every key, and reports a per-key figure."""

from __future__ import annotations

from benchmarks import interval_memory


def test_child_merges_and_flushes_every_key() -> None:
    out = interval_memory.child(30_000)
    assert out["keys"] == 30_000
    assert out["bulk_jobs"] == 2  # 25,000 + 5,000
    assert out["rss_peak_mb"] >= out["rss_pending_mb"] >= out["rss_base_mb"]


def test_child_without_images_holds_no_row_and_flushes_every_key() -> None:
    """The lead's measurement: the same events with no row image still merge and flush."""
    out = interval_memory.child(30_000, images=False)
    assert out["images"] is False and out["keys"] == 30_000 and out["bulk_jobs"] == 2
