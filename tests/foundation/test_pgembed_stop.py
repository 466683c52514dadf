"""The embedded server's stop reports a slow stop instead of raising, so a caller's fall-back
(the chaos runner's ``immediate`` stop, with the processes left as evidence) runs."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from connector.pgembed import EmbeddedPostgres
from tests.chaos.scenario import _children, restart_postgres

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


def test_a_restart_whose_stops_fail_kills_the_server_and_starts_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos runner's restart when ``pg_ctl stop`` cannot stop the server (seen once in
    `make test`: the start then failed on the running server's lock file): the postmaster and
    its processes are killed, the server starts again (crash recovery) and keeps its data, and
    the evidence says what happened."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            # the cluster commits asynchronously (synchronous_commit = off): a kill loses what
            # the WAL writer has not written yet, so this commit waits for its WAL
            conn.execute("SET synchronous_commit = on")
            conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        old = pg.pid()
        assert old is not None
        pg.last_error = "pg_ctl exited 1: (simulated)"
        monkeypatch.setattr(pg, "stop", lambda *a, **k: False)  # pg_ctl stop fails every time
        evidence = restart_postgres(pg)
        monkeypatch.undo()
        assert evidence is not None
        assert any(f"could not stop postmaster {old}" in e and "killed" in e for e in evidence)
        assert "(simulated)" in evidence[-1]
        new = pg.pid()
        assert new is not None and new != old
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT v FROM kept").fetchone()
        assert row == (42,)
    finally:
        pg.stop("immediate")
