"""The operator verbs against a running connector (the real runtime, in-process): status,
verify / verify --repair, replay (dry run and real), dead-letters list / show / retry /
discard."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connector import operate, operate_replay
from connector.config import Settings, load_settings, resolve_secrets
from connector.demo import DEMO_ENV
from connector.metrics import Metrics
from connector.runtime import Runtime
from tests.e2e.helpers import Setup, emulator, prepare, verify_now, wait_in_sync


def ns(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"pipeline": None, "json": False}
    base.update(kw)
    return argparse.Namespace(**base)


class Running:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.settings: Settings = load_settings(setup.config)
        self.secrets = resolve_secrets(self.settings, dict(DEMO_ENV))
        self.runtime = Runtime(
            self.settings,
            self.secrets,
            metrics=Metrics(),
            serve_http=False,
            handle_signals=False,
            lease_retry=0.2,
        )
        self.task: asyncio.Task[int] | None = None


async def _snapshot_done(dsn: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT status FROM connector.snapshots WHERE pipeline = 'orders'"
            )
            row = await cur.fetchone()
            if row is not None and row[0] == "done":
                return
            assert asyncio.get_running_loop().time() < deadline, f"snapshot still {row}"
            await asyncio.sleep(0.2)


@pytest.fixture
async def running(database: str, tmp_path: Path) -> AsyncIterator[tuple[Running, Any]]:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=120, max_staleness="1s")
        r = Running(setup)
        r.task = asyncio.create_task(r.runtime.run())
        await wait_in_sync(setup, None)
        # the CRM can match the table a moment before the initial sync records itself done
        await _snapshot_done(setup.dsn)
        try:
            yield r, emu
        finally:
            r.runtime.request_stop()
            assert await r.task == 0


async def test_status_verify_and_repair(running: tuple[Running, Any], capsys: Any) -> None:
    r, emu = running
    assert await operate.status(r.settings, r.secrets, ns(json=True)) == 0
    doc = json.loads(capsys.readouterr().out)["pipelines"][0]
    assert doc["running"] is True
    assert doc["capture"]["mode"] == "triggers"
    assert doc["snapshot"]["status"] == "done"
    assert doc["dead_letters_open"] == 0
    assert doc["credits"]["spent_24h"] > 0
    assert await operate.status(r.settings, r.secrets, ns()) == 0
    text = capsys.readouterr().out
    assert "pipeline orders" in text and "RUNNING" in text and "checkpoint" in text

    # someone edits one record and deletes another in the CRM by hand
    store = emu.state.store("Orders")
    rids = sorted(store.records)
    store.records[rids[0]]["Amount"] = 0.01
    store.delete(rids[1])
    assert await operate.verify(r.settings, r.secrets, ns(pipeline="orders", repair=False)) == 1
    out = capsys.readouterr().out
    assert "missing 1, extra 0, different 1" in out
    # a successful repair exits 0 (issue 14 §4: it used to exit 1)
    assert await operate.verify(r.settings, r.secrets, ns(pipeline="orders", repair=True)) == 0
    assert "re-captured 2 key(s)" in capsys.readouterr().out
    await wait_in_sync(r.setup, None)
    assert await operate.verify(r.settings, r.secrets, ns(pipeline="orders", repair=False)) == 0


async def _versions(dsn: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT key, version FROM connector.key_state")
        return {str(k): int(v) for k, v in await cur.fetchall()}


async def test_replay_is_idempotent_and_never_older(
    running: tuple[Running, Any], capsys: Any
) -> None:
    r, _ = running
    dsn = r.secrets.dsn
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE public.orders SET status = 'Paid' WHERE id <= 10")
        await conn.execute("UPDATE public.orders SET status = 'Shipped' WHERE id <= 5")
    await wait_in_sync(r.setup, None)
    before = await _versions(dsn)
    args = ns(pipeline="orders", from_offset=1, since=None, to=None, key=None, dry_run=True)
    assert await operate_replay.replay(r.settings, r.secrets, args) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out
    assert "120 keys; 120 to re-send" in out  # newest event per key, none older than acked
    assert "would send 120 record(s) by upsert (2 call(s), 12 credits)" in out
    assert await _versions(dsn) == before
    args.dry_run = False
    args.key = "3"
    assert await operate_replay.replay(r.settings, r.secrets, args) == 0
    out = capsys.readouterr().out
    assert "a running connector owns the pipeline" in out and "(1 row(s), 0 delete(s)" in out
    for _ in range(300):  # the running connector sends the re-captured event
        after = await _versions(dsn)
        if after["3"] > before["3"]:
            break
        await asyncio.sleep(0.1)
    assert after["3"] > before["3"]
    assert all(after[k] >= v for k, v in before.items())
    rep = await verify_now(r.setup)
    assert rep.mismatches == 0


async def test_dead_letters_retry_sends_the_current_row(
    running: tuple[Running, Any], capsys: Any
) -> None:
    r, _ = running
    dsn = r.secrets.dsn
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # 'Lost' is not a value of the CRM's Status picklist: the CRM rejects the record
        await conn.execute("UPDATE public.orders SET status = 'Lost' WHERE id = 7")
    for _ in range(200):
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT id FROM connector.dead_letters WHERE key = '7' AND status = 'open'"
            )
            row = await cur.fetchone()
        if row:
            break
        await asyncio.sleep(0.1)
    assert row is not None
    letter = int(row[0])
    assert await operate.dead_letters(r.settings, r.secrets, ns(dl_verb="list", all=False)) == 0
    out = capsys.readouterr().out
    assert f"{letter:>6}" in out and "INVALID_DATA" in out
    assert await operate.dead_letters(r.settings, r.secrets, ns(dl_verb="show", id=letter)) == 0
    assert json.loads(capsys.readouterr().out)["key"] == "7"
    # the source is fixed without a change event (e.g. by a bulk repair with triggers off)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE public.orders SET status = 'Cancelled' WHERE id = 7")
    retry = ns(dl_verb="retry", ids=[letter], all=False)
    assert await operate.dead_letters(r.settings, r.secrets, retry) == 0
    assert "1 letter(s) retried" in capsys.readouterr().out
    await wait_in_sync(r.setup, None)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT status FROM connector.dead_letters WHERE id = %s", (letter,)
        )
        row = await cur.fetchone()
    assert row is not None and row[0] == "resolved"
    # discard: nothing open any more to discard
    discard = ns(dl_verb="discard", ids=[letter])
    assert await operate.dead_letters(r.settings, r.secrets, discard) == 1
    assert "0 dead letter(s) discarded" in capsys.readouterr().out


async def test_replay_without_a_running_connector_sends_through_its_own_engine(
    running: tuple[Running, Any], capsys: Any
) -> None:
    r, emu = running
    r.runtime.request_stop()
    assert r.task is not None and await r.task == 0
    upserts = emu.usage()["by_api"]["upsert"]["records"]
    args = ns(pipeline="orders", from_offset=1, since=None, to=None, key=None, dry_run=False)
    assert await operate_replay.replay(r.settings, r.secrets, args) == 0
    out = capsys.readouterr().out
    assert "the newest version of 120 key(s) sent again" in out
    assert emu.usage()["by_api"]["upsert"]["records"] == upserts + 120
    rep = await verify_now(r.setup)
    assert rep.mismatches == 0


async def test_status_tells_the_truth_when_idle(running: tuple[Running, Any], capsys: Any) -> None:
    """Idle: no open transaction; a deleted key is counted as deleted, not synced; the owner's
    pid is the connector process's, not its PostgreSQL session's."""
    import os

    r, _ = running
    async with await psycopg.AsyncConnection.connect(r.secrets.dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM public.orders WHERE id = 5")
    await wait_in_sync(r.setup, None)
    for _ in range(100):  # the checkpoint passes the delete
        assert await operate.status(r.settings, r.secrets, ns(json=True)) == 0
        doc = json.loads(capsys.readouterr().out)["pipelines"][0]
        if doc["keys"].get("deleted") == 1 and doc["pending_keys"] == 0:
            break
        await asyncio.sleep(0.1)
    assert doc["keys"] == {"synced": 119, "deleted": 1}
    assert doc["checkpoint"]["pending_transactions"] == 0
    assert doc["owner"]["pid"] == os.getpid()  # the runtime runs in this process
    assert doc["owner"]["backend_pid"] != os.getpid()
    assert doc["owner"]["id"] == r.runtime.owner
    assert await operate.status(r.settings, r.secrets, ns()) == 0
    text = capsys.readouterr().out
    assert "0 open transactions tracked" in text
    assert "synced 119" in text and "deleted 1" in text
    assert "1 chunk," in text or "1 chunk\n" in text or text.rstrip().endswith("1 chunk")


async def test_a_rejection_is_logged_and_its_details_are_kept(
    running: tuple[Running, Any], capsys: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The CRM's rejection: one WARNING naming pipeline, key, code and field (not the value);
    the CRM's ``details`` (here the picklist's supported_values) in `dead-letters show`."""
    import logging

    caplog.set_level(logging.INFO, logger="connector")
    r, _ = running
    async with await psycopg.AsyncConnection.connect(r.secrets.dsn, autocommit=True) as conn:
        await conn.execute("UPDATE public.orders SET status = 'Xyzzy-Lost' WHERE id = 9")
    row = None
    for _ in range(200):
        async with await psycopg.AsyncConnection.connect(r.secrets.dsn) as conn:
            cur = await conn.execute(
                "SELECT id FROM connector.dead_letters WHERE key = '9' AND status = 'open'"
            )
            row = await cur.fetchone()
        if row:
            break
        await asyncio.sleep(0.1)
    assert row is not None
    assert await operate.dead_letters(r.settings, r.secrets, ns(dl_verb="show", id=row[0])) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "Paid" in shown["error_details"]["supported_values"]
    assert shown["error_details"]["api_name"] == "Status"
    lines = [
        rec for rec in caplog.records if rec.name == "connector.emitter" and "rejected" in rec.msg
    ]
    assert len(lines) == 1
    rec = lines[0]
    assert rec.levelno == logging.WARNING
    text = rec.getMessage()
    assert "key 9" in text and "INVALID_DATA" in text and "Status" in text
    assert getattr(rec, "pipeline", None) == "orders"
    assert "Xyzzy" not in text and "Xyzzy" not in str(vars(rec))


async def test_uninstall_under_a_running_connector_is_refused_and_noticed(
    running: tuple[Running, Any], caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """`uninstall` refuses while a `run` owns the pipeline; with --force the running connector
    notices within a gauge refresh: not ready, connector_capture_missing 1, an ERROR line; and
    recovers when `init` reinstalls the capture."""
    import logging

    from connector import admin, probes
    from connector.errors import ConnectorError

    caplog.set_level(logging.INFO, logger="connector")
    monkeypatch.setattr(probes, "GAUGE_INTERVAL", 0.2)  # read by the gauge loop
    r, _ = running
    with pytest.raises(ConnectorError, match="owned by a running connector"):
        await admin.uninstall(r.settings, r.secrets)
    assert (await r.runtime.readiness()).ok
    assert await admin.uninstall(r.settings, r.secrets, force=True) == ["orders"]

    def missing() -> float | None:
        return r.runtime.metrics.registry.get_sample_value(
            "connector_capture_missing", {"pipeline": "orders"}
        )

    for _ in range(300):
        if missing() == 1.0:
            break
        await asyncio.sleep(0.1)
    assert missing() == 1.0
    ready = await r.runtime.readiness()
    assert not ready.ok and ready.detail["checks"]["capture_missing"] == {"orders": "trigger"}
    assert any(
        rec.levelno == logging.ERROR and "capture is gone (trigger missing)" in rec.getMessage()
        for rec in caplog.records
    )
    await admin.init(r.settings, r.secrets)
    for _ in range(300):
        if missing() == 0.0:
            break
        await asyncio.sleep(0.1)
    assert missing() == 0.0 and (await r.runtime.readiness()).ok


async def test_replay_verify_and_dead_letters_say_what_they_do(
    running: tuple[Running, Any], capsys: Any
) -> None:
    """Impossible replay ranges and unknown keys are errors, not "0 events"; a real replay
    does not print "would send"; verify needs no -p with one pipeline; a retried letter can be
    discarded; `--config` after the dead-letters sub-verb; the KEY column fits a uuid."""
    from connector.cli import build_parser
    from connector.errors import ConfigError, ConnectorError

    r, _ = running
    base = {"pipeline": None, "since": None, "to": None, "key": None, "dry_run": True}
    with pytest.raises(ConnectorError, match="past the end of orders's outbox"):
        await operate_replay.replay(r.settings, r.secrets, ns(**{**base, "from_offset": 10**9}))
    with pytest.raises(ConfigError, match="before --from-offset"):
        await operate_replay.replay(
            r.settings, r.secrets, ns(**{**base, "from_offset": 10, "to": "5"})
        )
    with pytest.raises(ConnectorError, match="holds no event of id 'no-such-key'"):
        await operate_replay.replay(
            r.settings, r.secrets, ns(**{**base, "from_offset": 1, "key": "no-such-key"})
        )
    capsys.readouterr()
    real = ns(**{**base, "from_offset": 1, "key": "3", "dry_run": False})
    assert await operate_replay.replay(r.settings, r.secrets, real) == 0
    out = capsys.readouterr().out
    assert "would send" not in out and "re-captured" in out
    assert await operate.verify(r.settings, r.secrets, ns(repair=False)) == 0
    assert "verify orders:" in capsys.readouterr().out

    # a letter with a uuid-sized key, retried, then discarded
    key = "5b1f3c9e-2d4a-4f6b-9c8d-7e6f5a4b3c2d"
    async with await psycopg.AsyncConnection.connect(r.secrets.dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "INSERT INTO connector.dead_letters (pipeline, key, version, error_code,"
            " error_message, status) VALUES ('orders', %s, 1, 'INVALID_DATA', 'bad', 'retried')"
            " RETURNING id",
            (key,),
        )
        row = await cur.fetchone()
        assert row is not None
        letter = int(row[0])
    assert await operate.dead_letters(r.settings, r.secrets, ns(dl_verb="list", all=True)) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    mine = next(line for line in lines if key in line)
    assert mine.index("retried") == header.index("STATUS")
    discard = ns(dl_verb="discard", ids=[letter, 10**9])
    assert await operate.dead_letters(r.settings, r.secrets, discard) == 0
    out = capsys.readouterr().out
    assert "1 dead letter(s) discarded" in out and f"letter {10**9}: no such dead letter" in out
    args = build_parser().parse_args(["dead-letters", "list", "-c", "x.toml", "-p", "orders"])
    assert args.config == "x.toml" and args.pipeline == "orders"


async def test_a_retried_letter_rejected_again_is_opened_again(
    running: tuple[Running, Any], capsys: Any
) -> None:
    """`dead-letters retry` of a row that is still invalid: the same letter is open again with
    the new attempt (docs/operations-cli.md), not a second letter beside a `retried` one."""
    r, _ = running
    dsn = r.secrets.dsn
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE public.orders SET status = 'Lost' WHERE id = 11")

    async def letters() -> list[tuple[int, str, int]]:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT id, status, attempts FROM connector.dead_letters WHERE key = '11'"
                " ORDER BY id"
            )
            return [(int(a), str(b), int(c)) for a, b, c in await cur.fetchall()]

    for _ in range(200):
        if await letters():
            break
        await asyncio.sleep(0.1)
    [(letter, status, attempts)] = await letters()
    assert status == "open" and attempts == 1
    retry = ns(dl_verb="retry", ids=[letter], all=False)
    assert await operate.dead_letters(r.settings, r.secrets, retry) == 0
    for _ in range(200):
        now = await letters()
        if now and now[-1][1] == "open" and now[-1][2] == 2:
            break
        await asyncio.sleep(0.1)
    assert await letters() == [(letter, "open", 2)]
