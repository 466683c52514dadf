"""connector.gcsetup.tune_gc (issue 19): it freezes the start-up objects and raises the
collector's thresholds, as `connector run` and the ceiling benchmark use it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from connector import cli
from connector.gcsetup import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_and_raises_thresholds() -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    assert gc.get_freeze_count() == 0
    before = tune_gc()
    assert before == (700, 10, 10)
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    # a generation-0 collection now waits for 50,000 net allocations, not 700
    assert GC_THRESHOLDS[0] >= 50_000


@pytest.mark.usefixtures("restore_gc")
def test_connector_run_tunes_gc_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from connector import operate

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    seen: dict[str, object] = {}

    async def fake_run(settings: object, secrets: object, args: object) -> int:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        return 0

    monkeypatch.setattr(cli, "_load", lambda args: (object(), object()))
    monkeypatch.setattr(operate, "run", fake_run)
    assert cli.HANDLERS["run"](cli.build_parser().parse_args(["run"])) == 0
    assert seen["threshold"] == GC_THRESHOLDS
    assert isinstance(seen["frozen"], int)
    assert seen["frozen"] > 0
