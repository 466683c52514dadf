"""What an emitter call returns (``EmitOutcome``) and what it gathers before one state
transaction (``_Results``): shared by the upsert path (connector/emitter.py) and the bulk-job
lifecycle (connector/emitter_bulk.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from connector import state
from connector.coalesce import PendingEntry
from connector.events import ChangeEvent, EventStamp, Op, stamp_of

_DELETE = Op.DELETE
_SNAPSHOT = Op.SNAPSHOT


@dataclass
class EmitOutcome:
    """What became of the entries handed to one emitter call."""

    done: list[PendingEntry] = field(default_factory=list)  # acknowledged or dead-lettered
    retry: list[PendingEntry] = field(default_factory=list)  # transient failure: pending again
    # one record refused for now (RECORD_LOCKED, …): pending again behind its own fence (in
    # ``fences``), without slowing the rest of the pipeline
    later: list[PendingEntry] = field(default_factory=list)
    acked: int = 0
    dead: int = 0
    added: int = 0
    updated: int = 0
    # bulk jobs that may run on the CRM unknown to us: (bulk_jobs.id, keys, seconds to fence)
    fences: list[state.BulkFence] = field(default_factory=list)

    def merge(self, other: EmitOutcome) -> None:
        self.done.extend(other.done)
        self.retry.extend(other.retry)
        self.later.extend(other.later)
        self.fences.extend(other.fences)
        self.acked += other.acked
        self.dead += other.dead
        self.added += other.added
        self.updated += other.updated


@dataclass
class _Results:
    """Acknowledgements and dead letters gathered before one state transaction."""

    acks: list[state.Ack] = field(default_factory=list)
    dead: list[state.DeadLetter] = field(default_factory=list)
    snapshot_sent: int = 0
    snapshot_added: int = 0
    snapshot_updated: int = 0
    snapshot_skipped: int = 0
    added: int = 0
    updated: int = 0
    acked_events: list[ChangeEvent] = field(default_factory=list)

    def ack(
        self,
        event: ChangeEvent,
        crm_id: str | None,
        action: str | None = None,
        sent_hash: bytes | None = None,
    ) -> None:
        op = event.op
        self.acks.append(
            state.Ack(
                event.key,
                # stamp_of(event), inlined: once per acknowledged event (issue 19)
                EventStamp(event.version, event.source_xid, event.snapshot),
                crm_id,
                op is _DELETE,
                sent_hash,
            )
        )
        self.acked_events.append(event)
        if action == "insert":
            self.added += 1
        elif action == "update":
            self.updated += 1
        if op is _SNAPSHOT:
            self.snapshot_sent += 1
            if action == "insert":
                self.snapshot_added += 1
            elif action == "update":
                self.snapshot_updated += 1

    def reject(  # noqa: PLR0917
        self,
        event: ChangeEvent,
        code: str,
        message: str,
        field_name: str | None,
        api: str,
        payload: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.dead.append(
            state.DeadLetter(
                key=event.key,
                stamp=stamp_of(event),
                outbox_id=event.offset,
                payload=payload if payload is not None else event.row,
                code=code,
                message=message,
                field=field_name,
                api=api,
                details=details or None,
            )
        )
        if event.op is Op.SNAPSHOT:
            self.snapshot_skipped += 1
