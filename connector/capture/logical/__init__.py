"""Logical-replication capture: a publication, a ``pgoutput`` slot, and a streaming consumer.

``install`` / ``uninstall`` / ``slot_lag_bytes`` / ``slot_status`` manage the server objects;
``LogicalCapture.run`` streams the slot through a psycopg 3.3 ``replication="database"``
connection (``START_REPLICATION`` returns a CopyBoth cursor; its ``pgconn`` reads CopyData and
sends standby status updates), decodes pgoutput (``pgoutput.py``), converts values
(``values.py``) and appends outbox rows with COPY, many source transactions per outbox
transaction. The position is confirmed to the server only after the outbox transaction holding
those rows (and ``capture_state.last_commit_lsn``) has committed, and only at commit boundaries;
source commits whose end LSN is ``<= last_commit_lsn`` are replays and are dropped. See
docs/capture-logical.md for the design and its trade-offs.
"""

from connector.capture.logical.admin import (
    ORIGIN_MIN_SERVER,
    ORIGIN_PREFIX,
    SlotStatus,
    check_source,
    create_slot,
    foreign_origin,
    install,
    object_name,
    origin_name,
    slot_lag_bytes,
    slot_status,
    uninstall,
)
from connector.capture.logical.decode import TOAST_CANDIDATE
from connector.capture.logical.model import CaptureStats
from connector.capture.logical.stream import HEARTBEAT_PREFIX, LogicalCapture

__all__ = [
    "HEARTBEAT_PREFIX",
    "ORIGIN_MIN_SERVER",
    "ORIGIN_PREFIX",
    "TOAST_CANDIDATE",
    "CaptureStats",
    "LogicalCapture",
    "SlotStatus",
    "check_source",
    "create_slot",
    "foreign_origin",
    "install",
    "object_name",
    "origin_name",
    "slot_lag_bytes",
    "slot_status",
    "uninstall",
]
