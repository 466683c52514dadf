"""The README's examples are true: configuration validates, verbs exist, links resolve."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from connector.cli import build_parser
from connector.config import parse_settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README, flags=re.S)


def test_readme_has_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README


@pytest.mark.parametrize("block", range(len(toml_blocks())))
def test_readme_configuration_validates(block: int) -> None:
    settings = parse_settings(tomllib.loads(toml_blocks()[block]))
    assert settings.pipelines


def test_readme_verbs_exist() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    verbs = set(sub.choices)  # type: ignore[arg-type]
    for verb in re.findall(r"`connector ([a-z-]+)", README):
        assert verb in verbs, verb


def test_readme_links_resolve() -> None:
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if link.startswith("http"):
            continue
        assert (ROOT / link).exists(), link
