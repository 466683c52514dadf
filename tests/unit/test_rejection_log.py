"""The per-record rejection WARNING is rate-limited with a summary: nothing is lost from the
count, at most ``burst`` single lines per window, and a record's values never appear."""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.emitter import RejectionLog
from connector.events import EventStamp
from connector.state import DeadLetter


def _letter(i: int, code: str) -> DeadLetter:
    return DeadLetter(
        key=f"k{i}",
        stamp=EventStamp(version=i, source_xid=1),
        outbox_id=i,
        payload={"Secret_Value": "hunter2"},
        code=code,
        message="invalid data hunter2",
        field="Status",
        api="upsert",
        details={"supported_values": ["Paid"]},
    )


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=200),  # seconds since the previous batch
            st.lists(st.sampled_from(["INVALID_DATA", "MANDATORY_NOT_FOUND"]), max_size=40),
        ),
        max_size=12,
    )
)
def test_every_rejection_is_logged_or_counted_in_a_summary(
    batches: list[tuple[float, list[str]]],
) -> None:
    handler = _Collect()
    logger = logging.getLogger("connector.emitter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        rl = RejectionLog("orders", burst=5, window=60.0)
        now, i, total = 1000.0, 0, 0
        single_times: list[float] = []
        for gap, codes in batches:
            now += gap
            before = len(handler.lines)
            rl.log([_letter(i + j, c) for j, c in enumerate(codes)], now=now)
            i += len(codes)
            total += len(codes)
            single_times += [now] * sum(
                1 for m in handler.lines[before:] if m.startswith("the CRM rejected a record")
            )
        rl.flush(now=now + 61)
    finally:
        logger.removeHandler(handler)
    singles = [m for m in handler.lines if m.startswith("the CRM rejected a record")]
    summarised = sum(
        int(m.split()[3])
        for m in handler.lines
        if m.startswith("the CRM rejected ") and "more" in m
    )
    assert len(singles) + summarised == total
    assert all("hunter2" not in m for m in handler.lines)
    # never more than `burst` single lines within any window of 60 s
    for t in single_times:
        assert sum(1 for u in single_times if t <= u < t + 60) <= 5 * 2  # two windows may overlap


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_burst_logs_burst_lines_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="connector.emitter")
    rl = RejectionLog("orders", burst=3, window=60.0)
    rl.log([_letter(i, "INVALID_DATA") for i in range(10)], now=0.0)
    assert len(caplog.records) == 3
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "key k0" in caplog.records[0].getMessage()
    assert "on field Status" in caplog.records[0].getMessage()
    rl.flush(now=30.0)  # the window is not over: nothing yet
    assert len(caplog.records) == 3
    rl.flush(now=61.0)
    assert len(caplog.records) == 4
    summary = caplog.records[3].getMessage()
    assert re.search(r"rejected 7 more record\(s\).*INVALID_DATA x7", summary)
