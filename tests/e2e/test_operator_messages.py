"""`connector VERB` as a new operator meets it: mistakes give one clear line and an exit code
(2 configuration, 1 otherwise), never a traceback; a planted DSN password never appears in any
verb's output or log; verbs that only touch the database do not need the Zoho secrets."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from connector.pgembed import free_port
from tests.e2e.helpers import ROOT, SECRETS, ConnectorProcess, Setup, emulator, prepare

PLANTED = "hunter2-planted-pw"


async def cli(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _no_traceback(rc: int, out: str, err: str, expected_rc: int) -> None:
    assert rc == expected_rc, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err


CONFIG = """\
[crm]
data_centre = "custom"
accounts_url = "http://127.0.0.1:9"
api_url = "http://127.0.0.1:9"
client_id = "x"
client_secret_env = "T_ZOHO_SECRET"
refresh_token_env = "T_ZOHO_REFRESH"

[database]
{database}

[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
[pipelines.fields]
order_number = {{ field = "Name", type = "text" }}
"""


async def test_config_mistakes_are_reported_all_at_once_without_the_password(
    tmp_path: Path,
) -> None:
    env = _base_env()
    # a password written into the file: refused, and never echoed
    f = tmp_path / "pw.toml"
    f.write_text(CONFIG.format(database=f'dsn = "postgresql://postgres:{PLANTED}@db/x"'))
    rc, out, err = await cli("config", "check", str(f), env=env)
    _no_traceback(rc, out, err, 2)
    assert "database.dsn" in err and "holds a password" in err
    assert PLANTED not in out + err
    # a misspelled section and a second mistake: both named, with the likely fix
    text = CONFIG.format(database='dsn = "dbname=x"').replace("[database]", "[databse]")
    text = text.replace('client_id = "x"', 'client_id = "x"\nedition = "platinum"')
    f = tmp_path / "typo.toml"
    f.write_text(text)
    rc, out, err = await cli("config", "check", str(f), env=env)
    _no_traceback(rc, out, err, 2)
    assert "databse: unknown key; did you mean 'database'?" in err
    assert "database: required key is missing (is 'databse' a misspelling of it?)" in err
    assert "crm.edition" in err
    # a DSN that libpq cannot parse, from the environment: `config check --secrets` is not OK
    f = tmp_path / "bad.toml"
    f.write_text(CONFIG.format(database='dsn_env = "T_DSN"'))
    env2 = {
        **env,
        "T_DSN": f"host=db password={PLANTED} dbname",
        "T_ZOHO_SECRET": "s3",
        "T_ZOHO_REFRESH": "r3",
    }
    rc, out, err = await cli("config", "check", "--secrets", str(f), env=env2)
    _no_traceback(rc, out, err, 2)
    assert "OK" not in out
    assert "database.dsn_env" in err and "not a valid PostgreSQL connection string" in err
    assert PLANTED not in out + err
    rc, out, err = await cli("status", "-c", str(f), env=env2)
    _no_traceback(rc, out, err, 2)
    assert len(err.strip().splitlines()) == 1 and PLANTED not in out + err


async def test_status_before_init_and_db_only_verbs_without_the_zoho_secret(
    empty_database: str, tmp_path: Path
) -> None:
    from connector.demo_workload import create_orders

    database = empty_database
    await create_orders(database, 5)
    f = tmp_path / "c.toml"
    f.write_text(CONFIG.format(database='dsn_env = "T_DSN"'))
    # no T_ZOHO_SECRET / T_ZOHO_REFRESH at all: a DBA's shell
    env = {**_base_env(), "T_DSN": database}
    rc, out, err = await cli("status", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 1)
    assert "run `connector init`" in err and len(err.strip().splitlines()) == 1
    rc, out, err = await cli("init", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
    assert "capture (triggers) installed" in out
    rc, out, err = await cli("status", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
    assert "NOT RUNNING" in out
    rc, out, err = await cli("dead-letters", "--config", str(f), "list", env=env)
    _no_traceback(rc, out, err, 0)
    rc, out, err = await cli("uninstall", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
    # a verb that talks to the CRM still says which secret is missing
    rc, out, err = await cli("verify", "--config", str(f), "-p", "orders", env=env)
    _no_traceback(rc, out, err, 2)
    assert "crm.client_secret_env" in err and "T_ZOHO_SECRET" in err


async def test_a_planted_dsn_password_appears_in_no_output_or_log(
    database: str, tmp_path: Path
) -> None:
    """The state/source DSN carries a password (the test cluster trusts local connections, so
    it is accepted and ignored): every verb's stdout, stderr and `run`'s log are free of it."""
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=30)
        text = setup.config.read_text()
        dsn_line = next(line for line in text.splitlines() if line.startswith("dsn = "))
        text = text.replace(dsn_line, 'dsn_env = "T_DSN"')
        config = tmp_path / "planted.toml"
        port = free_port()
        config.write_text(text.replace(f"port = {setup.port}", f"port = {port}"))
        env = {**Setup(database, config, port, emu.url).env()}
        if database.startswith("postgres"):
            env["T_DSN"] = f"{database}{'&' if '?' in database else '?'}password={PLANTED}"
        else:
            env["T_DSN"] = f"{database} password={PLANTED}"
        c = str(config)
        outputs: list[str] = []
        for args in (
            ("config", "check", "--secrets", c),
            ("init", "-c", c),
            ("status", "-c", c),
            ("status", "--json", "-c", c),
            ("dead-letters", "-c", c, "list", "--all"),
            ("replay", "-c", c, "-p", "orders", "--from-offset", "1", "--dry-run"),
            ("verify", "-c", c, "-p", "orders"),
        ):
            rc, out, err = await cli(*args, env=env)
            assert "Traceback" not in err, (args, err)
            outputs.append(f"{args}: rc {rc}\n{out}\n{err}")
        run = ConnectorProcess(Setup(database, config, port, emu.url), tmp_path, "planted")
        run.setup.env = lambda: env  # type: ignore[method-assign]
        await run.start()
        await run.wait_http("/readyz")
        _, metrics = await run.get("/metrics")
        _, ready = await run.get("/readyz")
        assert await run.stop() == 0
        outputs += [run.logs(), metrics, ready]
        rc, out, err = await cli("status", "-c", c, env=env)
        outputs.append(out + err)
    everything = "\n".join(outputs)
    assert PLANTED not in everything
    for secret in SECRETS:
        assert secret not in everything
    assert "pipeline orders" in everything  # the verbs did run


async def test_run_refuses_a_mapping_the_source_table_or_the_org_cannot_take(
    database: str, tmp_path: Path
) -> None:
    """`run` checks the mapping against the SOURCE table (not only `init`): a missing column, a
    text column mapped to a boolean field; and a module the org does not have. Exit 2, the key
    named, nothing started."""
    import pytest

    from connector.config import load_settings, resolve_secrets
    from connector.demo import DEMO_ENV
    from connector.errors import ConfigError
    from connector.runtime import Runtime

    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
        base = setup.config.read_text()

        async def refused(name: str, text: str) -> ConfigError:
            path = tmp_path / f"{name}.toml"
            path.write_text(text)
            settings = load_settings(path)
            rt = Runtime(
                settings,
                resolve_secrets(settings, dict(DEMO_ENV)),
                serve_http=False,
                handle_signals=False,
            )
            with pytest.raises(ConfigError) as err:
                await rt.run()
            return err.value

        notes = 'notes          = { field = "Notes", type = "textarea" }'
        assert notes in base
        err = await refused("missing", base.replace(notes, notes.replace("notes ", "remarks")))
        assert err.key == "pipelines['orders'].fields.remarks"
        assert "column 'remarks' does not exist in 'public.orders'" in str(err)

        err = await refused("module", base.replace('module = "Orders"', 'module = "Order"'))
        assert err.key == "pipelines['orders'].module"
        assert "'Order'" in str(err) and "INVALID_MODULE" in str(err)

        import psycopg

        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute(
                "ALTER TABLE public.orders ALTER COLUMN is_gift TYPE text USING is_gift::text"
            )
        err = await refused("text-bool", base)
        assert err.key == "pipelines['orders'].fields.is_gift"
        assert "column 'is_gift' is text, which cannot feed type 'boolean'" in str(err)
        # the command line: exit 2, one line
        rc, out, err_text = await cli("run", "--config", str(setup.config), env=setup.env())
        _no_traceback(rc, out, err_text, 2)
        last = err_text.strip().splitlines()[-1]  # (after the info log lines of the start)
        assert last.startswith("connector: configuration error: pipelines['orders'].fields.is_gift")


async def test_two_runs_of_one_configuration_on_one_host(
    database: str, tmp_path: Path, monkeypatch: object
) -> None:
    """The second `run` finds the HTTP port taken: it says so, stands by without HTTP, takes
    the pipeline over when the first stops, and binds the port once it is free."""
    import logging

    import aiohttp
    import pytest

    from connector import runtime
    from connector.config import load_settings, resolve_secrets
    from connector.demo import DEMO_ENV
    from connector.metrics import Metrics
    from connector.runtime import Runtime

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setattr(runtime, "HTTP_RETRY_INTERVAL", 0.3, raising=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("connector.runtime").addHandler(handler)
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
        settings = load_settings(setup.config)
        secrets = resolve_secrets(settings, dict(DEMO_ENV))

        def make() -> Runtime:
            return Runtime(
                settings, secrets, metrics=Metrics(), handle_signals=False, lease_retry=0.2
            )

        first, second = make(), make()
        t1 = asyncio.create_task(first.run())
        try:
            for _ in range(300):
                if first.runners.get("orders") and first.runners["orders"].owned:
                    break
                await asyncio.sleep(0.1)
            t2 = asyncio.create_task(second.run())
            for _ in range(300):
                if "orders" in second.runners:
                    break
                assert not t2.done(), t2
                await asyncio.sleep(0.1)
            assert any(
                "is in use (another connector on this host?)" in r.getMessage() for r in records
            )
            assert second.runners["orders"].state == "standby"
        finally:
            first.request_stop()
            assert await t1 == 0
        try:
            for _ in range(300):
                if second.runners["orders"].owned and not second._bind_later:
                    break
                await asyncio.sleep(0.1)
            assert second.runners["orders"].owned
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{setup.port}/metrics") as resp,
            ):
                assert resp.status == 200
        finally:
            second.request_stop()
            assert await t2 == 0
            logging.getLogger("connector.runtime").removeHandler(handler)


async def test_missing_privileges_and_capture_are_named(database: str, tmp_path: Path) -> None:
    """A role without TRIGGER (init) or SELECT (run) on the table is told which GRANT it needs;
    `run` before `init` (capture not installed) says to run `init` instead of capturing
    nothing."""
    import psycopg
    import pytest

    from connector import admin
    from connector.config import load_settings, resolve_secrets
    from connector.demo import DEMO_ENV
    from connector.errors import ConnectorError
    from connector.mapping_check import check_source_columns
    from connector.runtime import Runtime

    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5, capture="logical")
        settings = load_settings(setup.config)
        secrets = resolve_secrets(settings, dict(DEMO_ENV))
        pipeline = settings.pipelines[0]
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute("CREATE ROLE weak_operator")
            await conn.execute("SET ROLE weak_operator")
            with pytest.raises(ConnectorError, match="lacks the SELECT privilege") as err:
                await check_source_columns(conn, pipeline)
            assert "GRANT SELECT ON" in str(err.value) and "weak_operator" in str(err.value)
            with pytest.raises(ConnectorError, match="lacks the TRIGGER privilege") as err:
                await admin._need_trigger_privilege(conn, pipeline)
            assert "GRANT TRIGGER ON" in str(err.value)
            await conn.execute("RESET ROLE")
        # the capture was never installed (or was removed): `run` refuses and says why
        await admin.uninstall(settings, secrets)
        rt = Runtime(settings, secrets, serve_http=False, handle_signals=False)
        with pytest.raises(ConnectorError, match="run `connector init` first") as err:
            await rt.run()
        assert "slot and publication missing" in str(err.value)


async def test_init_after_a_dropped_publication_names_what_it_skipped(
    database: str, tmp_path: Path
) -> None:
    """Logical mode, connector stopped: a change is pending on the slot, a DBA drops the
    publication, another change is made. `connector init` re-creates the publication, finds the
    slot cannot decode past the gap (PostgreSQL < 18), advances it, and says on stderr which
    range was not captured and the verify to run; a second init has nothing to say."""
    import psycopg

    from connector.demo_workload import create_orders

    await create_orders(database, 3)
    f = tmp_path / "c.toml"
    f.write_text(
        CONFIG.format(database='dsn_env = "T_DSN"').replace(
            'module = "Orders"', 'module = "Orders"\ncapture = "logical"'
        )
    )
    env = {**_base_env(), "T_DSN": database}
    rc, out, err = await cli("init", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
    assert "capture (logical) installed" in out and "NOT captured" not in err
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        # the test cluster commits asynchronously, and a slot decodes only flushed WAL: the
        # second init must see both changes (failed in make test without this)
        await conn.execute("SET synchronous_commit = on")
        await conn.execute("UPDATE public.orders SET quantity = quantity + 1 WHERE id = 1")
        cur = await conn.execute("SELECT pubname FROM pg_publication")
        (pub,) = await cur.fetchone() or ("",)
        await conn.execute(f'DROP PUBLICATION "{pub}"')
        await conn.execute("UPDATE public.orders SET quantity = quantity + 1 WHERE id = 2")
        cur = await conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (pub,),
        )
        (before,) = await cur.fetchone() or ("",)
    rc, out, err = await cli("init", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
    assert "capture (logical) installed" in out
    lines = [line for line in err.splitlines() if "NOT captured" in line]
    assert len(lines) == 1, err
    assert f"advanced from {before} to " in lines[0] and pub in lines[0]
    assert "connector verify --pipeline orders --repair" in lines[0]
    rc, out, err = await cli("init", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
    assert "NOT captured" not in err
    rc, out, err = await cli("uninstall", "--config", str(f), env=env)
    _no_traceback(rc, out, err, 0)
