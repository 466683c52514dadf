"""Every test carries exactly one tier marker (tests/conftest.py): `unit` when nothing of it asks
for PostgreSQL, `db` when it does, `e2e` / `chaos` by directory; `make test-fast` relies on it."""

from __future__ import annotations

import pytest

from tests.conftest import TIERS


def _tiers(request: pytest.FixtureRequest) -> list[str]:
    return [t for t in TIERS if request.node.get_closest_marker(t) is not None]


def test_a_test_without_a_database_is_unit(request: pytest.FixtureRequest) -> None:
    assert _tiers(request) == ["unit"]
    assert request.node.get_closest_marker("slow") is None


def test_a_test_with_a_database_is_db(database: str, request: pytest.FixtureRequest) -> None:
    assert _tiers(request) == ["db"]


@pytest.mark.db
def test_a_tier_set_by_hand_is_kept(request: pytest.FixtureRequest) -> None:
    assert _tiers(request) == ["db"]
