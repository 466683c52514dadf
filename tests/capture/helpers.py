"""Shared helpers for the capture tests, trigger and logical: the MISSING_KEY dead letters that a
row with a NULL key leaves (invariant 8)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.rows import dict_row


async def dead_letters(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT pipeline, key, version, source_xid::text AS source_xid, payload, error_code,"
        " error_field, error_message, status FROM connector.dead_letters ORDER BY id"
    )
    return await cur.fetchall()


def assert_missing_key_letters(
    letters: list[dict[str, Any]], payloads: list[dict[str, Any]]
) -> None:
    """``letters`` are open MISSING_KEY dead letters of the orders pipeline, one per payload in
    order, each naming the NULL key column ``id`` and carrying its source transaction."""
    assert [(d["key"], d["error_code"], d["status"], d["pipeline"]) for d in letters] == [
        ("", "MISSING_KEY", "open", "orders")
    ] * len(payloads)
    assert [d["payload"] for d in letters] == payloads
    for d in letters:
        assert "'id'" in d["error_message"] and "NULL" in d["error_message"]
        assert d["error_field"] == "parent_id"
        assert d["source_xid"] is not None


def stream_order(
    events: Iterable[tuple[int, str]], letters: list[dict[str, Any]], column: str
) -> list[str]:
    """The events (``(version, "op:key")``) and the dead letters (``"dead:<payload[column]>"``)
    by version: where the outbox sequence placed each in the stream."""
    named = [*events, *((d["version"], f"dead:{d['payload'][column]}") for d in letters)]
    return [name for _, name in sorted(named)]
