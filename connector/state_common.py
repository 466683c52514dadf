"""What the state modules share (``connector.state``, ``connector.bulk_state``,
``connector.snapshot_state``, ``connector.missing_key``): the connection type, the schema
substitution and the row helpers. Split from ``connector.state`` (issue 20)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from connector.crm_values import dumps_json
from connector.events import EventStamp, SnapshotVisibility

AnyConn = psycopg.AsyncConnection[Any]


def _q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(schema=sql.Identifier(schema))


def _snap_text(snapshot: SnapshotVisibility | None) -> str | None:
    return None if snapshot is None else str(snapshot)


def _stamp(version: Any, source_xid: Any, snapshot: Any) -> EventStamp | None:
    if version is None:
        return None
    snap = SnapshotVisibility.parse(str(snapshot)) if snapshot is not None else None
    return EventStamp(int(version), int(source_xid) if source_xid is not None else 0, snap)


def _as_dict(cur: Any, row: Any) -> dict[str, Any]:
    """Rows as dicts whatever the connection's row factory (tuple or dict_row)."""
    if isinstance(row, dict):
        return row
    names = [d.name for d in cur.description]
    return dict(zip(names, row, strict=True))


def _first(row: Any) -> Any:
    if isinstance(row, dict):
        return next(iter(row.values()))
    return row[0]


def _pairs(cur: Any, rows: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        vals = list(_as_dict(cur, r).values())
        out[str(vals[0])] = int(vals[1])
    return out


def _dumps(obj: Any) -> str:
    """JSON for payloads holding Decimal / date values (never through binary floats)."""
    return dumps_json(obj).decode()
