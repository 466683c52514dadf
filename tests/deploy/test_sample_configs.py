"""The sample configurations shipped in deploy/ are valid and match the emulator's Orders module."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from connector.config import load_settings, parse_settings
from connector.emulator import start_emulator
from connector.mapping_check import check_mapping
from connector.zoho.client import ZohoClient

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _configmap_toml() -> str:
    doc = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    return str(doc["data"]["connector.toml"])


SAMPLES = {
    "compose": lambda: (DEPLOY / "compose" / "connector.toml").read_text(),
    "systemd": lambda: (DEPLOY / "systemd" / "connector.toml.example").read_text(),
    "kubernetes": _configmap_toml,
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_config_is_valid(name: str) -> None:
    settings = parse_settings(tomllib.loads(SAMPLES[name]()))
    assert settings.pipelines[0].module == "Orders"


@pytest.mark.parametrize("name", sorted(SAMPLES))
async def test_sample_mapping_matches_the_emulator_module(name: str) -> None:
    settings = parse_settings(tomllib.loads(SAMPLES[name]()))
    async with start_emulator() as emu:
        client = ZohoClient(
            accounts_url=emu.url,
            api_url=emu.url,
            upload_url=emu.url,
            client_id="emulator-client-id",
            client_secret=SecretStr("emulator-client-secret"),
            refresh_token=SecretStr("emulator-refresh-token"),
        )
        async with client:
            for pipeline in settings.pipelines:
                await check_mapping(client, pipeline)


def test_compose_secrets_are_the_emulator_credentials() -> None:
    settings = load_settings(DEPLOY / "compose" / "connector.toml")
    assert settings.crm.client_id == "emulator-client-id"
    secrets = DEPLOY / "compose" / "secrets"
    assert (secrets / "zoho_refresh_token").read_text().strip() == "emulator-refresh-token"
    assert (secrets / "zoho_client_secret").read_text().strip() == "emulator-client-secret"
