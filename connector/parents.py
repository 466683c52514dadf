"""Parents first: the order of related pipelines and which child changes may leave now, a pure
function of what the engine knows (issue 21, docs/related-tables.md "Engine design").

No I/O and no clock: ``now``, the pending children and a view of their parents' state are
inputs, so the same functions can drive the engine and the property tests. The emitter's gate
(``connector/emitter_parents.py``) calls :func:`parents_first` for every write of a pipeline
with lookups; the other functions are not wired yet (docs/related-tables.md).

- :func:`pipeline_order`: pipelines in dependency order (a lookup's pipeline and a
  ``subform_of`` parent before the pipeline that names them), ties in config order; a cycle is
  a ``ValueError`` naming it (config validation refuses cycles first: this is defence).
- :func:`parents_first`: per child change, :class:`Send` (every non-NULL parent is in the CRM:
  its CRM ids, ready for ``RecordMapper.to_json``'s resolver), :class:`Wait` (a parent is not
  in the CRM yet; a pending parent's deadline is pulled forward to ``min(own, child's - one
  flush)`` so both meet their ``max_staleness``), :class:`Hold` (a dead letter
  ``PARENT_NOT_SYNCED`` naming the parent) or :class:`Ask` (a parent nobody knows, at the
  child's deadline: ask the CRM once by COQL on the parent's unique key field). A child's
  deadline is never extended: a parent that is not in the CRM by then holds it, visibly.
- :func:`hold_parent_deletes` and :func:`order_flush`: a parent delete (``delete_mode``
  "delete") waits while children still name it (``PARENT_HAS_CHILDREN``); within a flush,
  writes go parents first and deletes children first, so no delete of a parent is sent
  before a write or delete of its children.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple, TypeVar

from connector.config_relations import PipelineLinks, parent_pipelines

PARENT_NOT_SYNCED = "PARENT_NOT_SYNCED"
PARENT_HAS_CHILDREN = "PARENT_HAS_CHILDREN"


# ---- dependency order ---------------------------------------------------------------------


def pipeline_order(pipelines: Sequence[PipelineLinks]) -> list[str]:
    """The pipeline names, every parent (:func:`~connector.config_relations.parent_pipelines`)
    before each of its children; among pipelines free to go, the earliest in ``pipelines``
    first, so the order is the config order wherever the dependencies allow. A parent that is
    not given, a repeated name or a cycle is a ``ValueError`` (naming the cycle)."""
    index: dict[str, int] = {}
    for i, p in enumerate(pipelines):
        if index.setdefault(p.name, i) != i:
            raise ValueError(f"pipeline {p.name!r} is given twice")
    parents = {p.name: parent_pipelines(p) for p in pipelines}
    children: dict[str, list[str]] = {name: [] for name in index}
    for name, named in parents.items():
        for parent in named:
            if parent not in index:
                raise ValueError(
                    f"pipeline {name!r} depends on pipeline {parent!r}, which is not given"
                )
            children[parent].append(name)
    missing = {name: len(named) for name, named in parents.items()}
    ready = [index[name] for name, n in missing.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = pipelines[heapq.heappop(ready)].name
        order.append(name)
        for child in children[name]:
            missing[child] -= 1
            if missing[child] == 0:
                heapq.heappush(ready, index[child])
    if len(order) < len(pipelines):
        raise ValueError(
            f"pipelines depend on each other in a cycle: {_cycle(pipelines, parents, order)}"
            " (each depends on the next); parents must be synced before their children"
        )
    return order


def _cycle(
    pipelines: Sequence[PipelineLinks], parents: Mapping[str, list[str]], done: list[str]
) -> str:
    """A cycle among the pipelines left out of the order, as ``a -> b -> a``: each of them
    still waits for a parent that is left out too, so following parents must loop."""
    left = {p.name for p in pipelines} - set(done)
    path = [next(p.name for p in pipelines if p.name in left)]
    while path.count(path[-1]) < 2:
        path.append(next(parent for parent in parents[path[-1]] if parent in left))
    return " -> ".join(path[path.index(path[-1]) :])


# ---- parents-first gate --------------------------------------------------------------------


class RecordRef(NamedTuple):
    """One record of a pipeline: its legacy key text (``RecordMapper.key_of``)."""

    pipeline: str
    key: str

    def __str__(self) -> str:
        return f"{self.pipeline}/{self.key}"


@dataclass(frozen=True, slots=True)
class Synced:
    """The parent is in the CRM (``key_state`` synced, not deleted), at any version: a newer
    change of it still pending does not matter to a lookup."""

    crm_id: str


@dataclass(frozen=True, slots=True)
class Pending:
    """The parent is not in the CRM yet; its creating change is pending with this deadline
    (``oldest_at + max_staleness`` of its pipeline), or already in flight."""

    deadline: float
    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class Dead:
    """The parent's change is dead-lettered, with the dead letter's reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Deleted:
    """The parent was deleted (``key_state`` deleted)."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """Nothing is known of the parent key (no ``key_state`` row); ``asked``: the CRM was asked
    by COQL on the parent's unique key field and has no such record."""

    asked: bool = False


ParentState = Synced | Pending | Dead | Deleted | Unknown


@dataclass(frozen=True, slots=True)
class ChildChange:
    """A pending change of a child pipeline in one flush: its key, its deadline
    (``oldest_at + max_staleness``) and, per lookup field (CRM api name, the dead letter's
    ``error_field``), the parent its latest row image names (None: the column is NULL)."""

    key: str
    deadline: float
    parents: Mapping[str, RecordRef | None]


@dataclass(frozen=True, slots=True)
class Send:
    """Every non-NULL parent is in the CRM. ``resolved``: lookup field → the parent's CRM id
    (NULL lookups are absent: the mapper sends null); :meth:`resolve` is a ``LookupResolver``
    for ``RecordMapper.to_json``."""

    key: str
    resolved: Mapping[str, str]
    ids: Mapping[RecordRef, str]

    def resolve(self, pipeline: str, key: str) -> str | None:
        return self.ids.get(RecordRef(pipeline, key))


@dataclass(frozen=True, slots=True)
class Wait:
    """A parent is not in the CRM yet and the child's deadline is not reached: it stays
    pending (its deadline unchanged). ``parents``: those it waits for."""

    key: str
    parents: tuple[RecordRef, ...]


@dataclass(frozen=True, slots=True)
class Hold:
    """A dead letter ``PARENT_NOT_SYNCED``: ``parent`` (named in lookup ``field``) is
    dead-lettered or deleted, or not in the CRM at the child's deadline. Re-queued when that
    parent is acknowledged (the replay path)."""

    code: ClassVar[str] = PARENT_NOT_SYNCED
    key: str
    field: str
    parent: RecordRef
    message: str


@dataclass(frozen=True, slots=True)
class Ask:
    """The child's deadline is reached and these parents are unknown: ask the CRM for each
    once (found: record it as synced; not found: mark it ``Unknown(asked=True)``)."""

    key: str
    parents: tuple[RecordRef, ...]


Decision = Send | Wait | Hold | Ask
_D = TypeVar("_D", Send, Wait, Hold, Ask)


@dataclass(frozen=True, slots=True)
class GateResult:
    """One decision per child change, in input order; ``pull_forward``: each pending parent a
    waiting child needs (not in flight) → its new deadline, the minimum of its own and every
    such child's deadline less one flush; ``ask``: the parents to look up, each once."""

    decisions: tuple[Decision, ...]
    pull_forward: Mapping[RecordRef, float] = field(default_factory=dict)
    ask: tuple[RecordRef, ...] = ()

    def of(self, kind: type[_D]) -> list[_D]:
        """The decisions of one kind, in input order."""
        return [d for d in self.decisions if isinstance(d, kind)]


def parents_first(
    children: Iterable[ChildChange],
    parents: Mapping[RecordRef, ParentState],
    *,
    now: float,
    flush_interval: float,
) -> GateResult:
    """Decide, for one flush of a child pipeline, which changes may leave (docs/related-tables.md
    "Parents first"). ``parents``: the state of each parent key (absent: :class:`Unknown`).

    Per child, over its non-NULL parents in field order (a NULL parent never blocks): a parent
    :class:`Dead` or :class:`Deleted` → :class:`Hold` at once; else, at the child's deadline
    (``now >= deadline``), a parent still :class:`Pending` or asked and not found →
    :class:`Hold`, unknown ones not yet asked → :class:`Ask`; before it, any parent not
    :class:`Synced` → :class:`Wait`; all synced → :class:`Send`. The dead letter names a dead
    or deleted parent if there is one, else the first blocking parent in field order."""
    if not flush_interval >= 0:
        raise ValueError(f"flush_interval must be >= 0 seconds, got {flush_interval!r}")
    decisions: list[Decision] = []
    pull: dict[RecordRef, float] = {}
    ask: dict[RecordRef, None] = {}
    for child in children:
        decision = _decide(child, parents, now)
        decisions.append(decision)
        if isinstance(decision, Ask):
            ask.update(dict.fromkeys(decision.parents))
        if not isinstance(decision, Wait):
            continue
        for ref in decision.parents:
            state = parents.get(ref, Unknown())
            if isinstance(state, Pending) and not state.in_flight:
                at = min(state.deadline, child.deadline - flush_interval)
                pull[ref] = min(pull.get(ref, math.inf), at)
    return GateResult(tuple(decisions), pull, tuple(ask))


def _decide(child: ChildChange, parents: Mapping[RecordRef, ParentState], now: float) -> Decision:
    due = now >= child.deadline
    named = [
        (lookup, ref, parents.get(ref, Unknown()))
        for lookup, ref in child.parents.items()
        if ref is not None
    ]
    blocked = [(b, lookup, ref) for lookup, ref, state in named if (b := _blocked(state, due))]
    if blocked:  # a dead or deleted parent first, then in field order
        (_, why), lookup, ref = min(blocked, key=lambda b: b[0][0])
        return Hold(child.key, lookup, ref, f"parent {ref} {why}")
    ids = {ref: state.crm_id for _, ref, state in named if isinstance(state, Synced)}
    if len(ids) == len({ref for _, ref, _ in named}):
        return Send(child.key, {lookup: ids[ref] for lookup, ref, _ in named}, ids)
    waiting = tuple(dict.fromkeys(ref for _, ref, state in named if not isinstance(state, Synced)))
    return Ask(child.key, waiting) if due else Wait(child.key, waiting)


def _blocked(state: ParentState, due: bool) -> tuple[int, str] | None:
    """Why ``state`` holds a child whose deadline is (``due``) or is not yet reached, ranked:
    0 a parent that stays out of the CRM until it changes, 1 one that is late."""
    if isinstance(state, Dead):
        return 0, f"is dead-lettered: {state.reason}"
    if isinstance(state, Deleted):
        return 0, "is deleted"
    if due and isinstance(state, Unknown) and state.asked:
        return 1, "is not in the CRM"
    if due and isinstance(state, Pending):
        return 1, "is not in the CRM by the child's deadline (its change is still pending)"
    return None


# ---- deletes of parents ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldDelete:
    """A parent delete that waits ``PARENT_HAS_CHILDREN``: these child records (sorted) still
    name it."""

    code: ClassVar[str] = PARENT_HAS_CHILDREN
    parent: RecordRef
    children: tuple[RecordRef, ...]

    @property
    def message(self) -> str:
        """Names the first child and the count."""
        n = len(self.children)
        others = f" and {n - 1} more" if n > 1 else ""
        return (
            f"parent {self.parent} is still named by {n} child record(s) in the legacy tables"
            f" ({self.children[0]}{others}); its delete waits until none names it"
        )


@dataclass(frozen=True, slots=True)
class DeleteHolds:
    """The parent deletes that may go in this flush and those held, each in input order."""

    go: tuple[RecordRef, ...]
    held: tuple[HeldDelete, ...]


def hold_parent_deletes(
    deletes: Iterable[RecordRef],
    children: Mapping[RecordRef, Collection[RecordRef]],
    delete_modes: Mapping[str, str],
) -> DeleteHolds:
    """Split pending deletes into those that may go and those held ``PARENT_HAS_CHILDREN``
    (docs/related-tables.md "Deletes of parents").

    ``children``: per parent, the child records that still name it in the legacy tables. A
    delete of a pipeline whose ``delete_mode`` is "mark" or "ignore" always goes (the CRM
    record stays, its children's lookups stay valid); with "delete" (also for a pipeline not
    in ``delete_modes``: the safe side) it is held while any child names it. The message
    names the first child (by pipeline, key) and the count."""
    go: list[RecordRef] = []
    held: list[HeldDelete] = []
    for ref in deletes:
        named = tuple(sorted(set(children.get(ref, ()))))
        if delete_modes.get(ref.pipeline, "delete") != "delete" or not named:
            go.append(ref)
        else:
            held.append(HeldDelete(ref, named))
    return DeleteHolds(tuple(go), tuple(held))


BatchOp = Literal["upsert", "delete"]


class FlushBatch(NamedTuple):
    """One batch of a flush: writes (upsert calls or a bulk job) or deletes of one pipeline."""

    pipeline: str
    op: BatchOp
    keys: tuple[str, ...] = ()


def order_flush(batches: Iterable[FlushBatch], order: Sequence[str]) -> list[FlushBatch]:
    """The batches in the order they are sent, each after the one before is answered: all
    writes, parents' pipelines first (``order``, from :func:`pipeline_order`), then all
    deletes, children's pipelines first. So a child is written after its parent is in the
    CRM, and no parent delete goes before a write or delete of its children. Batches of one
    pipeline and op keep their order."""
    rank = {name: i for i, name in enumerate(order)}
    given = list(batches)
    for b in given:
        if b.pipeline not in rank:
            raise ValueError(f"batch of pipeline {b.pipeline!r}, which is not in the order")
        if b.op not in ("upsert", "delete"):
            raise ValueError(f"batch op {b.op!r} is neither 'upsert' nor 'delete'")
    writes = sorted((b for b in given if b.op == "upsert"), key=lambda b: rank[b.pipeline])
    deletes = sorted((b for b in given if b.op == "delete"), key=lambda b: -rank[b.pipeline])
    return writes + deletes
