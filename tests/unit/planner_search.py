"""A random search of the never-late property, longer than `make test` runs it.

``python -m tests.unit.planner_search --runs 20 --examples 2000``

`tests/unit/test_planner_v2.py::test_no_change_late_under_any_latency_model` runs 50 fixed
(derandomized) examples in `make test`, so that CI does not fail by chance. This runs the same
property with fresh random examples, ``--runs`` times, and prints each run's outcome and the
first falsifying example (hypothesis shrinks it). Session 19 found four planner defects and one
known limit this way (docs/planner.md, "Searching the planner").
"""

from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_planner_v2 as t


def run(examples: int) -> str | None:
    """One search; the falsifying example (hypothesis's note) or None when none was found."""
    inner = t.test_no_change_late_under_any_latency_model.hypothesis.inner_test  # type: ignore[attr-defined]
    test = settings(
        max_examples=examples,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(
        given(
            t.arrivals,
            t.models,
            st.sampled_from([60.0, 300.0, 600.0]),
            st.integers(1, 10),
            st.sampled_from(["economy", "balanced", "fast"]),
        )(inner)
    )
    try:
        test()
    except AssertionError as exc:
        notes = getattr(exc, "__notes__", [])
        return f"{exc} {' '.join(notes)}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.unit.planner_search", description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--examples", type=int, default=2000, help="examples per run")
    args = ap.parse_args(argv)
    found = 0
    for i in range(args.runs):
        started = time.monotonic()
        failure = run(args.examples)
        took = time.monotonic() - started
        if failure is None:
            print(f"run {i + 1}: {args.examples} examples, none late ({took:.0f} s)", flush=True)
        else:
            found += 1
            print(f"run {i + 1}: LATE {failure} ({took:.0f} s)", flush=True)
    print(f"{found} of {args.runs} runs found a late change")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
