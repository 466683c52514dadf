"""The way past a publication that was missing while the slot lived (PostgreSQL < 18).

pgoutput before PostgreSQL 18 looks its publications up in the catalog *as of each decoded
change* (a historic snapshot). A change decoded while the publication did not exist fails the
walsender with ``publication "…" does not exist``, and it fails again at the same position on
every reconnect, even after the publication is created again: the catalog as of that change
still has none. PostgreSQL 18 skips a missing publication instead (release notes, "Allow
logical decoding to ignore missing publications"; ``pgoutput`` ``LoadPublications``).

``connector init`` re-creates the publication; when the slot outlived it, ``pass_gap`` checks
whether the slot's pending changes still decode (peeking them through pgoutput, the same code
the walsender runs) and, only when they do not, advances the slot to the position right after
the publication was re-created. ``pg_replication_slot_advance`` decodes without the output
plugin, so it passes the gap. The changes it skipped were never publishable; the caller tells
the operator the range and that ``connector verify --repair`` re-captures them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from connector.db import fetch_value
from connector.errors import PermanentError

log = logging.getLogger("connector.capture.logical")


@dataclass(frozen=True)
class GapSkipped:
    """The slot was advanced over changes that could not be decoded."""

    slot: str
    from_lsn: str | None  # the slot's confirmed position before (None: never confirmed)
    to_lsn: str  # where it stands now (just after the publication was re-created)


def _missing_publication(exc: psycopg.Error, publication: str) -> bool:
    text = str(exc)
    return (
        isinstance(exc, psycopg.errors.UndefinedObject)
        and "publication" in text
        and publication in text
    )


async def end_slot_holder(conn: psycopg.AsyncConnection[Any], slot: str) -> int | None:
    """End the walsender (or backend) that holds ``slot``, when one does; returns its pid
    (None: the slot is free or gone). Ending another role's backend may not be permitted:
    then the caller waits for it to let go. A capture reconnects by itself and resumes from
    the slot's confirmed position, so nothing is lost."""
    pid = await fetch_value(
        conn,
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s AND active",
        (slot,),
    )
    if pid is None:
        return None
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return int(pid)


async def _while_in_use(
    conn: psycopg.AsyncConnection[Any],
    slot: str,
    step: Callable[[], Awaitable[None]],
    timeout: float,
) -> None:
    """Run ``step`` on the slot. A running connector's capture holds it (a walsender streams
    it, or reconnects in a loop when stuck): end that walsender (:func:`end_slot_holder`, as
    ``uninstall`` does) and try again before the capture reconnects; give up after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    told = False
    while True:
        try:
            await step()
            return
        except psycopg.errors.ObjectInUse as e:
            pid = await end_slot_holder(conn, slot)
            if pid is not None and not told:
                log.info(
                    "connector init ended the running capture's stream (walsender pid %s) "
                    "for a moment to check replication slot %s; it reconnects by itself",
                    pid,
                    slot,
                )
                told = True
            if loop.time() >= deadline:
                raise PermanentError(
                    f"replication slot {slot!r} stayed in use for {timeout:.0f} s, so "
                    f"`connector init` could not check it for changes made while its "
                    f"publication was missing; stop the connector and run `connector init` "
                    f"again ({e.diag.message_primary or type(e).__name__})"
                ) from e
            await asyncio.sleep(0.02)


async def pass_gap(
    conn: psycopg.AsyncConnection[Any],
    slot: str,
    publication: str,
    *,
    timeout: float = 60.0,
) -> GapSkipped | None:
    """Call right after re-creating ``publication`` for an existing pgoutput ``slot``.

    Peek the slot's pending changes up to the current WAL position through pgoutput. If they
    decode, nothing is skipped (None). If decoding fails on the missing publication, advance
    the slot to that position and return what was skipped. ``conn``: autocommit, a role
    allowed to use the slot (the capture role)."""
    upto = str(await fetch_value(conn, "SELECT pg_current_wal_lsn()::text"))
    stuck = False

    async def peek() -> None:
        nonlocal stuck
        try:
            # count(*): decode everything pending up to `upto`, return nothing of it
            await conn.execute(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, NULL, 'proto_version', '1', 'publication_names', %s)",
                (slot, upto, publication),
            )
        except psycopg.errors.UndefinedObject as e:
            if not _missing_publication(e, publication):
                raise
            stuck = True

    await _while_in_use(conn, slot, peek, timeout)
    if not stuck:
        return None
    before = await fetch_value(
        conn,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )

    async def advance() -> None:
        await conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, upto))

    await _while_in_use(conn, slot, advance, timeout)
    return GapSkipped(slot, before, upto)
