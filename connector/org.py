"""One Zoho org, several pipelines (issue 21, "the planner plans across the pipelines of one org"):
what each pipeline's planner must know of the others.

The pipelines of one org share one client: one credit allowance (every engine reads the whole
org's ledger, ``state.credits_spent``) and one concurrency limit (the client's
``AdaptiveLimiter``). The planner of each pipeline (``connector.planner.plan``) schedules its own
upsert calls backwards from their deadlines, counting ``calls_ahead``: calls that will hold the
limiter's slots before its own. Reading only the limiter's queue, each pipeline saw the calls
already sent, not those the other pipelines are about to send for the same moments: three
pipelines due together each planned as if it had every slot, and their calls queued behind one
another past the deadline.

:class:`OrgBoard` is the shared view: every engine publishes, at each plan, the arrive-by
deadlines of its live pending keys (``publish``); a planner then counts, as calls ahead of its
own, the calls the other pipelines need for keys due no later than its own first key plus the
time the org's pending calls take on the slots (``calls_ahead``). The count is conservative
(each of two pipelines due together counts the other's calls ahead of its own, so both start
early) and costs no API call. The board is found by the limiter (:func:`board_for`): the
pipelines that share a concurrency limit share a board, with no wiring to get wrong.
Simulated in ``tests/unit/planner_sim.py`` (``simulate_org``): docs/planner.md, "One org".
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

__all__ = ["OrgBoard", "board_for"]


@dataclass(frozen=True, slots=True)
class _Due:
    deadlines: tuple[float, ...]  # sorted arrive-by moments (epoch seconds) of live pending keys
    batch: int  # records per upsert call of that pipeline


class OrgBoard:
    """What the pipelines of one org have due, by pipeline (in-process, per limiter)."""

    def __init__(self) -> None:
        self._due: dict[str, _Due] = {}

    def publish(self, pipeline: str, deadlines: list[float], batch: int) -> None:
        """``pipeline``'s live pending keys not in flight, by arrive-by deadline (any order)."""
        if not deadlines:
            self._due.pop(pipeline, None)
            return
        self._due[pipeline] = _Due(tuple(sorted(deadlines)), max(1, batch))

    def forget(self, pipeline: str) -> None:
        """The pipeline stopped (or lost its lease): its keys are no one's calls here now."""
        self._due.pop(pipeline, None)

    def calls_due_by(self, pipeline: str, moment: float) -> int:
        """Upsert calls the *other* pipelines need for their keys due by ``moment``: each
        pipeline's count of such keys in whole calls of its batch size."""
        calls = 0
        for name, due in self._due.items():
            if name == pipeline:
                continue
            keys = bisect.bisect_right(due.deadlines, moment)
            calls += -(-keys // due.batch)
        return calls

    def calls_ahead(
        self, pipeline: str, first: float, round_s: float, concurrency: int, own_calls: int
    ) -> int:
        """The calls of the other pipelines that may hold the slots before ``pipeline``'s own
        whose first key is due at ``first``: those due by ``first`` plus the time the whole
        org's pending calls take on the slots (``own_calls`` and every other pipeline's, one
        ``round_s`` per ``concurrency`` calls) plus one round. Not only those due by
        ``first``: a pipeline due a little later that counts this one's calls starts
        earlier, and the limiter is first come, first served (found by the property test:
        one key due at 40.5 s queued behind three calls due at 42 s that started at 36.9 s)."""
        total = own_calls + sum(
            -(-len(d.deadlines) // d.batch) for n, d in self._due.items() if n != pipeline
        )
        rounds = 1 + -(-total // max(1, concurrency))
        return self.calls_due_by(pipeline, first + rounds * round_s)

    def pipelines(self) -> list[str]:
        return sorted(self._due)


_BOARDS: weakref.WeakKeyDictionary[object, OrgBoard] = weakref.WeakKeyDictionary()


def board_for(limiter: object) -> OrgBoard:
    """The board of the org whose concurrency ``limiter`` is (made on first use)."""
    board = _BOARDS.get(limiter)
    if board is None:
        board = _BOARDS[limiter] = OrgBoard()
    return board
