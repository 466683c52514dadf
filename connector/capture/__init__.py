"""Capture: getting committed row changes of the legacy table into the outbox.

``triggers.py`` (AFTER ROW trigger, transactional outbox) and ``logical/`` (pgoutput slot) write
the same outbox row format (docs/architecture.md); ``snapshot.py`` writes the initial-sync rows.
"""

from __future__ import annotations

from typing import Any

import psycopg

# What to_jsonb() prints depends on these settings. The capture trigger pins them on its
# function (SET clauses), logical mode on its replication session (values.SESSION_OPTIONS);
# every other reader of row images (snapshot chunks, sync flag, verify, replay) pins them with
# ``pin_image_settings`` so that one row has one image whoever reads it.
IMAGE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
)

# A transactional logical message with this prefix marks a transaction of the connector's own
# that writes only to the legacy table's ignored columns (the sync flag): logical capture skips
# that transaction's row changes, as the trigger skips updates of ignored columns only.
OWN_WRITE_PREFIX = "connector-own-write"


async def pin_image_settings(conn: psycopg.AsyncConnection[Any]) -> None:
    """Set IMAGE_SETTINGS for the current transaction (call it inside one)."""
    for name, value in IMAGE_SETTINGS:
        await conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (name, value))
