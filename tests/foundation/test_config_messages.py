"""Configuration messages: a bad value is quoted once (no doubled "(got …)"); every mistake is
reported at once; a misspelled section is named with the one it stands for; a DSN is never
quoted and any password in a message is redacted."""

from __future__ import annotations

import pytest

from connector.config import parse_settings
from connector.config_secrets import redact
from connector.errors import ConfigError


def _data(**pipeline: object) -> dict[str, object]:
    return {
        "crm": {"client_id": "x", "client_secret_env": "A", "refresh_token_env": "B"},
        "database": {"dsn": "dbname=x"},
        "pipelines": [
            {
                "name": "orders",
                "source_table": "public.orders",
                "module": "Orders",
                "fields": {"n": {"field": "Name", "type": "text"}},
                **pipeline,
            }
        ],
    }


def test_a_bad_value_is_quoted_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(_data(max_staleness="20 seconds"))
    assert str(err.value).count("20 seconds") == 1


def test_every_mistake_at_once_and_the_misspelled_section() -> None:
    data = _data(max_staleness="soon")
    data["databse"] = data.pop("database")
    with pytest.raises(ConfigError) as err:
        parse_settings(data)
    text = str(err.value)
    assert "database: required key is missing (is 'databse' a misspelling of it?)" in text
    assert "databse: unknown key; did you mean 'database'?" in text
    assert "pipelines['orders'].max_staleness" in text


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u:hunter2@db/x", "host=db password=hunter2 dbname=x", "host=db dbname"],
)
def test_a_dsn_is_never_quoted(dsn: str) -> None:
    data = _data()
    data["database"] = {"dsn": dsn}
    with pytest.raises(ConfigError) as err:
        parse_settings(data)
    assert "hunter2" not in str(err.value) and dsn not in str(err.value)


def test_redact() -> None:
    assert redact("postgresql://u:hunter2@db/x") == "postgresql://u:***@db/x"
    assert redact("host=db password=hunter2 dbname=x") == "host=db password=*** dbname=x"
    assert redact("password='a b' x") == "password=*** x"
    assert redact("nothing here") == "nothing here"
