"""The embedded server's stop reports a slow stop instead of raising, so a caller's fall-back
(the chaos runner's ``immediate`` stop, with the processes left as evidence) runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.pgembed import EmbeddedPostgres
from tests.chaos.scenario import _children

pytestmark = pytest.mark.db


def test_a_stop_that_does_not_finish_in_time_returns_false(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        pid = pg.pid()
        assert pid is not None
        assert any("checkpointer" in p for p in _children(pid))  # what the runner records
        # pg_ctl -t 0 gives up at once, the server still shutting down: no exception
        stopped = pg.stop("fast", wait=0)
        assert stopped is (not (pg.datadir / "postmaster.pid").exists())  # the truth, either way
        assert pg.stop("fast") is True
        assert pg.pid() is None
    finally:
        pg.stop("immediate")
