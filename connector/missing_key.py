"""The count of capture-time MISSING_KEY dead letters (``connector_dead_letters_total``):
:class:`MissingKeyTally` and :func:`count_missing_key_letters`. Split from
``connector.state`` (issue 20), which re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connector.state_common import AnyConn, _as_dict, _first, _q

# Capture-time MISSING_KEY letters (written by the trigger in the legacy transaction, or by the
# logical decoder) never pass through the emitter, so the runtime counts them into
# connector_dead_letters_total from here. They are told apart from the emitter's letters by
# ``api IS NULL`` (the emitter always records the API; its own MISSING_KEY letters, for an empty
# key string, are counted by the emitter itself).
_MK_LETTERS = "pipeline = %(p)s AND error_code = 'MISSING_KEY' AND api IS NULL"  # capture-time only

# start-up: everything after the pipeline's last saved checkpoint (all when none was saved)
Q_MISSING_KEY_START = (
    """
WITH cp AS (
    SELECT updated_at - make_interval(secs => %(margin)s) AS updated_at
      FROM {schema}.checkpoints
     WHERE pipeline = %(p)s AND (last_id > 0 OR cardinality(pending_txids) > 0)
)
SELECT pg_current_snapshot()::text AS snap,
       pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
       (SELECT max(id) FROM {schema}.dead_letters) AS top,
       (SELECT updated_at FROM cp) AS cutoff,
       ARRAY(SELECT id FROM {schema}.dead_letters
              WHERE """
    + _MK_LETTERS
    + """
                AND created_at > coalesce((SELECT updated_at FROM cp), '-infinity')
              ORDER BY id) AS ids
"""
)

Q_MISSING_KEY_NEW = (
    """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
       (SELECT max(id) FROM {schema}.dead_letters) AS top,
       ARRAY(SELECT id FROM {schema}.dead_letters
              WHERE id > %(floor)s AND """
    + _MK_LETTERS
    + """
              ORDER BY id) AS ids
"""
)

# while the start-up window is open: also the letters at or below the floor that were created
# after the checkpoint, or (trigger capture, where source_xid is the writing transaction) that
# the start-up snapshot did not see
Q_MISSING_KEY_NEW_LATE = (
    """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
       (SELECT max(id) FROM {schema}.dead_letters) AS top,
       ARRAY(SELECT id FROM {schema}.dead_letters
              WHERE """
    + _MK_LETTERS
    + """
                AND (id > %(floor)s
                     OR created_at > coalesce(%(cutoff)s::timestamptz, '-infinity')
                     OR (%(snap)s::pg_snapshot IS NOT NULL AND source_xid IS NOT NULL
                         AND NOT pg_visible_in_snapshot(source_xid, %(snap)s::pg_snapshot)))
              ORDER BY id) AS ids
"""
)

Q_BURN_XID = "SELECT pg_current_xact_id()::text::bigint"


@dataclass(slots=True)
class MissingKeyTally:
    """Which capture-time MISSING_KEY letters of one pipeline this process has counted.

    Gap-free without assuming that ids commit in order: ``seen`` holds the counted ids above
    ``floor``, and the floor only moves to ``candidate[0]`` (the highest dead letter id visible
    in some snapshot *S*) once every transaction that was running at *S* has ended, which is
    when the snapshot's xmin reaches ``candidate[1]``, an xid assigned just after *S*. A
    letter id at or below ``candidate[0]`` was drawn before *S*, by a writer that already had
    its xid (trigger capture: the row change came first; logical capture: the pipeline's one
    decoder, serially), so that writer's letter is visible by then and is in ``seen``.

    Start-up (``started`` False): the letters created after the pipeline's last saved
    checkpoint (less ``margin``) are counted (all of them when none was saved); until the first
    candidate is confirmed, letters at or below the floor that commit late are still picked up
    (``cutoff``, and ``snapshot`` in trigger capture).
    """

    started: bool = False
    floor: int = 0
    seen: set[int] = field(default_factory=set)
    candidate: tuple[int, int] | None = None  # (floor to move to, xid the xmin must reach)
    late: bool = False  # the start-up window is open
    cutoff: datetime | None = None
    snapshot: str | None = None


async def count_missing_key_letters(
    conn: AnyConn,
    schema: str,
    pipeline: str,
    tally: MissingKeyTally,
    *,
    trigger: bool,
    margin: float = 0.0,
) -> int:
    """How many capture-time ``MISSING_KEY`` letters of ``pipeline`` became visible since the
    previous call with the same ``tally`` (which it updates). ``conn`` must be in autocommit
    (each statement its own snapshot); ``trigger``: the pipeline captures with triggers;
    ``margin``: seconds before the checkpoint's time that the first call counts from."""
    # all I/O first, then the tally is changed: a failed call (retried on the next refresh)
    # neither counts nor forgets anything
    if not tally.started:
        cur = await conn.execute(_q(Q_MISSING_KEY_START, schema), {"p": pipeline, "margin": margin})
        row = _as_dict(cur, await cur.fetchone())
        ids = {int(i) for i in row["ids"]}
        top = int(row["top"] or 0)
        burnt = await _burn_xid(conn) if top > 0 else None
        tally.started, tally.seen, tally.floor = True, ids, top
        if burnt is not None:
            tally.late, tally.cutoff = True, row["cutoff"]
            tally.snapshot = str(row["snap"]) if trigger else None
            tally.candidate = (top, burnt)
        return len(ids)
    params: dict[str, Any] = {"p": pipeline, "floor": tally.floor}
    if tally.late:
        params |= {"cutoff": tally.cutoff, "snap": tally.snapshot}
        cur = await conn.execute(_q(Q_MISSING_KEY_NEW_LATE, schema), params)
    else:
        cur = await conn.execute(_q(Q_MISSING_KEY_NEW, schema), params)
    row = _as_dict(cur, await cur.fetchone())
    new = {int(i) for i in row["ids"]} - tally.seen
    xmin, top = int(row["xmin"]), int(row["top"] or 0)
    candidate, floor = tally.candidate, tally.floor
    confirmed = False
    if candidate is not None and xmin >= candidate[1]:
        confirmed, floor = True, max(floor, candidate[0])
        candidate = None
    if candidate is None and top > floor:
        candidate = (top, await _burn_xid(conn))
    seen = tally.seen | new
    if confirmed:  # every letter at or below the new floor is in ``seen`` and counted
        seen = {i for i in seen if i > floor}
        tally.late, tally.cutoff, tally.snapshot = False, None, None
    tally.seen, tally.floor, tally.candidate = seen, floor, candidate
    return len(new)


async def _burn_xid(conn: AnyConn) -> int:
    """An xid assigned now (its own, committed, transaction): every xid below it was
    assigned earlier."""
    cur = await conn.execute(Q_BURN_XID)
    return int(_first(await cur.fetchone()))
