"""The chaos run of `make test`: about three minutes of faults against a real PostgreSQL, the
emulator and `connector run` as subprocesses, then the end-state, dead-letter, history, credit
and secret checks (``scenario.py``). Seeded: ``CHAOS_SEED`` (default 20240917),
``CHAOS_MINUTES`` (default 3), ``CHAOS_CAPTURE`` (default logical: the mode with the extra
outbox-committed / slot-not-confirmed window; `make soak` alternates both modes by seed). A
failure prints the seed and the command that reruns it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.scenario import Params, run_pair

SEED = int(os.environ.get("CHAOS_SEED", "20240917"))
MINUTES = float(os.environ.get("CHAOS_MINUTES", "3"))
CAPTURE = os.environ.get("CHAOS_CAPTURE", "logical")


@pytest.mark.skipif(
    bool(os.environ.get("CONNECTOR_TEST_DSN")) and not os.environ.get("CHAOS_FORCE"),
    reason="the chaos run restarts its own embedded PostgreSQL clusters",
)
async def test_chaos_run(tmp_path: Path) -> None:
    params = Params(seed=SEED, minutes=MINUTES, capture=CAPTURE)
    result = await run_pair(params, tmp_path)
    chaos = result.chaos
    assert result.ok, result.failure_text()
    # the faults did happen (a run that injected nothing would prove nothing)
    assert chaos.injected["postgres_restart"] >= 1, result.failure_text()
    kills = sum(v for k, v in chaos.injected.items() if k.startswith("kill"))
    assert kills >= 1, result.failure_text()
    assert len(chaos.injected) >= 5, result.failure_text()
    assert chaos.workload["mass_updates"] >= 1 and chaos.workload["long_open"] >= 1
    assert chaos.report is not None and chaos.report.invalid_rows > 0
