"""`connector config check`: a bad file exits 2 with a message naming the key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from connector.cli import main
from connector.config import load_settings, parse_duration, resolve_secrets
from connector.errors import ConfigError

GOOD = """
[crm]
data_centre = "eu"
client_id = "1000.ABC"
client_secret_env = "ZOHO_CLIENT_SECRET"
refresh_token_env = "ZOHO_REFRESH_TOKEN"

[database]
dsn_env = "LEGACY_DSN"

[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
max_staleness = "10m"
[pipelines.fields]
customer_email = { field = "Customer_Email", type = "email" }
status = { field = "Status", type = "picklist" }
amount = { field = "Amount", type = "currency" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "connector.toml"
    p.write_text(text)
    return p


def test_good_file_loads(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    p = s.pipelines[0]
    assert p.max_staleness.total_seconds() == 600
    assert p.table_parts == ("public", "orders")
    assert s.crm.resolved_accounts_url == "https://accounts.zoho.eu"
    assert s.crm.resolved_api_url == "https://www.zohoapis.eu"
    assert s.crm.concurrency == 20


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(write(tmp_path, GOOD))]) == 0
    assert "OK" in capsys.readouterr().out


# (description, edit applied to GOOD, key expected in the message, words expected)
CASES: list[tuple[str, str, str, str]] = [
    (
        "missing table",
        GOOD.replace('source_table = "public.orders"\n', ""),
        "pipelines['orders'].source_table",
        "missing",
    ),
    (
        "unknown capture mode",
        GOOD.replace('max_staleness = "10m"', 'max_staleness = "10m"\ncapture = "wal2json"'),
        "pipelines['orders'].capture",
        "triggers",
    ),
    (
        "bad duration",
        GOOD.replace('"10m"', '"ten minutes"'),
        "pipelines['orders'].max_staleness",
        "duration",
    ),
    (
        "staleness too large",
        GOOD.replace('"10m"', '"3d"'),
        "pipelines['orders'].max_staleness",
        "between",
    ),
    (
        "secret written inline",
        GOOD.replace(
            'client_secret_env = "ZOHO_CLIENT_SECRET"', 'client_secret = "hunter2-secret"'
        ),
        "crm",
        "client_secret_env",
    ),
    (
        "refresh token inline",
        GOOD.replace('refresh_token_env = "ZOHO_REFRESH_TOKEN"', 'refresh_token = "1000.xyz"'),
        "crm",
        "refresh_token_env",
    ),
    (
        "duplicate pipeline name",
        GOOD + GOOD[GOOD.index("[[pipelines]]") :],
        "pipelines",
        "duplicate pipeline name",
    ),
    (
        "unknown key",
        GOOD.replace('module = "Orders"', 'module = "Orders"\nmodul = "x"'),
        "pipelines['orders'].modul",
        "unknown key",
    ),
    ("unknown data centre", GOOD.replace('"eu"', '"mars"'), "crm.data_centre", "us"),
    ("custom DC without URLs", GOOD.replace('"eu"', '"custom"'), "crm", "accounts_url"),
    (
        "bad pipeline name",
        GOOD.replace('name = "orders"', 'name = "Orders Pipeline!"'),
        "pipelines['Orders Pipeline!'].name",
        "pattern",
    ),
    (
        "bad table name",
        GOOD.replace('"public.orders"', '"a.b.c"'),
        "pipelines['orders'].source_table",
        "schema.table",
    ),
    (
        "no fields",
        GOOD[: GOOD.index("[pipelines.fields]")],
        "pipelines['orders'].fields",
        "missing",
    ),
    (
        "field mapped twice",
        GOOD.replace('status = { field = "Status"', 'status = { field = "Amount"'),
        "pipelines['orders']",
        "mapped twice",
    ),
    (
        "unknown CRM type",
        GOOD.replace('type = "currency"', 'type = "money"'),
        "pipelines['orders'].fields.amount.type",
        "currency",
    ),
    (
        "mark without field",
        GOOD.replace('module = "Orders"', 'module = "Orders"\ndelete_mode = "mark"'),
        "pipelines['orders']",
        "delete_mark_field",
    ),
    (
        "budget too small",
        GOOD.replace('client_id = "1000.ABC"', 'client_id = "1000.ABC"\ndaily_credit_budget = 10'),
        "crm.daily_credit_budget",
        "500",
    ),
    (
        "reserve above budget",
        GOOD.replace(
            'client_id = "1000.ABC"',
            'client_id = "1000.ABC"\ndaily_credit_budget = 1000\ncredit_reserve = 2000',
        ),
        "crm",
        "credit_reserve",
    ),
    (
        "password in DSN",
        GOOD.replace('dsn_env = "LEGACY_DSN"', 'dsn = "postgresql://u:pw@h/db"'),
        "database.dsn",
        "password",
    ),
    ("no database", GOOD.replace('dsn_env = "LEGACY_DSN"', ""), "database", "dsn"),
    (
        "chunk too big",
        GOOD.replace('module = "Orders"', 'module = "Orders"\nsnapshot_chunk_size = 30000'),
        "pipelines['orders'].snapshot_chunk_size",
        "25000",
    ),
    ("no pipelines", GOOD[: GOOD.index("[[pipelines]]")], "pipelines", "missing"),
    (
        "key field mapped",
        GOOD.replace('status = { field = "Status"', 'status = { field = "parent_id"'),
        "pipelines['orders']",
        "key_field",
    ),
    ("not TOML", "[crm\nclient_id=", "connector.toml", "TOML"),
    ("wrong type for port", GOOD + '\n[server]\nport = "http"\n', "server.port", "integer"),
]


@pytest.mark.parametrize(("desc", "text", "key", "words"), CASES, ids=[c[0] for c in CASES])
def test_config_mistakes_exit_2_and_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], desc: str, text: str, key: str, words: str
) -> None:
    path = write(tmp_path, text)
    assert main(["config", "check", str(path)]) == 2, desc
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert key in err, err
    assert words in err, err
    # a secret written inline is never echoed back
    assert "hunter2-secret" not in err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_secrets_from_env_and_files(tmp_path: Path) -> None:
    text = GOOD.replace(
        'refresh_token_env = "ZOHO_REFRESH_TOKEN"', f'refresh_token_file = "{tmp_path}/rt"'
    )
    (tmp_path / "rt").write_text("1000.refresh\n")
    os.chmod(tmp_path / "rt", stat.S_IRUSR | stat.S_IWUSR)
    s = load_settings(write(tmp_path, text))
    secrets = resolve_secrets(
        s, {"ZOHO_CLIENT_SECRET": "cs-123456", "LEGACY_DSN": "postgresql:///x"}
    )
    assert secrets.refresh_token.get_secret_value() == "1000.refresh"
    assert "cs-123456" not in repr(secrets) and "1000.refresh" not in repr(secrets)


def test_missing_secret_env_names_the_key(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(s, {"LEGACY_DSN": "postgresql:///x"})
    assert exc.value.key == "crm.client_secret_env"
    assert "ZOHO_CLIENT_SECRET" in str(exc.value)


def test_world_readable_secret_file_warns(tmp_path: Path) -> None:
    text = GOOD.replace(
        'refresh_token_env = "ZOHO_REFRESH_TOKEN"', f'refresh_token_file = "{tmp_path}/rt"'
    )
    (tmp_path / "rt").write_text("1000.refresh")
    os.chmod(tmp_path / "rt", 0o644)
    s = load_settings(write(tmp_path, text))
    with pytest.warns(UserWarning, match="world-readable"):
        resolve_secrets(s, {"ZOHO_CLIENT_SECRET": "cs", "LEGACY_DSN": "postgresql:///x"})


@pytest.mark.parametrize(
    ("text", "seconds"), [("10m", 600), ("30s", 30), ("1.5h", 5400), ("500ms", 0.5), (45, 45)]
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_cli_help_lists_verbs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "connector", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for verb in [
        "init",
        "run",
        "snapshot",
        "status",
        "replay",
        "dead-letters",
        "verify",
        "emulator",
        "demo",
        "uninstall",
        "config",
    ]:
        assert verb in out


def test_unreachable_database_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.pgembed import free_port

    monkeypatch.setenv("ZOHO_CLIENT_SECRET", "cs-unreachable-secret")
    monkeypatch.setenv("ZOHO_REFRESH_TOKEN", "rt-unreachable-secret")
    monkeypatch.setenv(
        "LEGACY_DSN", f"postgresql://nobody@127.0.0.1:{free_port()}/x?connect_timeout=2"
    )
    assert main(["init", "--config", str(write(tmp_path, GOOD))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("connector: cannot reach the database:"), err
    assert "Traceback" not in err and "secret" not in err
