"""The access token is only ever sent to the CRM's own hosts (bulk result download links)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from connector.errors import PermanentError
from connector.zoho.client import ZohoClient


def client() -> ZohoClient:
    return ZohoClient(
        accounts_url="https://accounts.zoho.eu",
        api_url="https://www.zohoapis.eu",
        upload_url="http://127.0.0.1:8799",
        client_id="id",
        client_secret=SecretStr("secret-value"),
        refresh_token=SecretStr("refresh-value"),
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://download-accl.zoho.com/v2/crm/1/bulk-write/2/2.zip",
        "https://download.zoho.eu/x.zip",
        "https://www.zohoapis.eu/crm/v8/x.zip",
        "http://127.0.0.1:8799/download/x.zip",
    ],
)
def test_zoho_and_configured_hosts_are_trusted(url: str) -> None:
    assert client()._url("absolute", url) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/x.zip",
        "https://zoho.com.evil.example/x.zip",
        "http://169.254.169.254/latest/meta-data",
        "https://notzoho.com/x.zip",
    ],
)
def test_foreign_hosts_are_refused(url: str) -> None:
    with pytest.raises(PermanentError, match="untrusted host"):
        client()._url("absolute", url)
