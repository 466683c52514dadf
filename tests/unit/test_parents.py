"""Parents first (issue 21 part 2b-i, connector/parents.py): the dependency order of pipelines,
the per-child gate (send / wait / hold / ask, parents' deadlines pulled forward), held parent
deletes and the order of a flush's batches. Pure: no PostgreSQL, no emulator."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.config import PipelineConfig
from connector.config_relations import check_lookups
from connector.errors import ConfigError
from connector.mapping import RecordMapper
from connector.parents import (
    PARENT_HAS_CHILDREN,
    PARENT_NOT_SYNCED,
    Ask,
    ChildChange,
    Dead,
    Deleted,
    FlushBatch,
    GateResult,
    Hold,
    ParentState,
    Pending,
    RecordRef,
    Send,
    Synced,
    Unknown,
    Wait,
    hold_parent_deletes,
    order_flush,
    parents_first,
    pipeline_order,
)
from tests.unit.relations import CUSTOMERS, ORDERS

LINES: dict[str, Any] = {
    "name": "order_lines",
    "source_table": "public.order_lines",
    "key_column": "id",
    "module": "Orders",
    "subform_of": {"pipeline": "orders", "field": "Lines", "parent_column": "order_id"},
    "fields": {"product": "Product"},
}
NOTES: dict[str, Any] = {
    **CUSTOMERS,
    "name": "notes",
    "source_table": "public.notes",
    "module": "Notes",
    "fields": {"body": "Body"},
}


def configs(*raw: dict[str, Any]) -> list[PipelineConfig]:
    return [PipelineConfig.model_validate(copy.deepcopy(p)) for p in raw]


def lookup(name: str, *parents: str) -> dict[str, Any]:
    """A pipeline ``name`` with one lookup column per parent."""
    return {
        **copy.deepcopy(NOTES),
        "name": name,
        "fields": {
            "body": "Body",
            **{f"{p}_id": {"field": f"Ref_{p}", "type": "lookup", "pipeline": p} for p in parents},
        },
    }


C42 = RecordRef("customers", "42")
C43 = RecordRef("customers", "43")
V7 = RecordRef("vendors", "7")


def child(key: str = "1", deadline: float = 100.0, **parents: RecordRef | None) -> ChildChange:
    return ChildChange(key, deadline, parents or {"Account": C42})


def gate(
    children: list[ChildChange],
    view: dict[RecordRef, ParentState],
    now: float = 0.0,
    flush: float = 5.0,
) -> GateResult:
    return parents_first(children, view, now=now, flush_interval=flush)


def only(result: GateResult) -> Any:
    (decision,) = result.decisions
    return decision


# ---- dependency order ---------------------------------------------------------------------


def test_order_puts_parents_first_whatever_the_config_order() -> None:
    assert pipeline_order(configs(LINES, ORDERS, NOTES, CUSTOMERS)) == [
        "notes",
        "customers",
        "orders",
        "order_lines",
    ]
    assert pipeline_order(configs(CUSTOMERS, ORDERS, LINES)) == [
        "customers",
        "orders",
        "order_lines",
    ]


def test_order_keeps_config_order_between_unrelated_pipelines() -> None:
    raw = [lookup("b", "c"), lookup("a"), lookup("c"), lookup("d", "a")]
    assert pipeline_order(configs(*raw)) == ["a", "c", "b", "d"]
    assert pipeline_order(configs(lookup("z"), lookup("y"), lookup("x"))) == ["z", "y", "x"]


def test_order_refuses_a_cycle_naming_it() -> None:
    raw = [lookup("a"), lookup("b", "c"), lookup("c", "d"), lookup("d", "b")]
    with pytest.raises(ValueError, match=r"cycle: b -> c -> d -> b \(each depends on the next\)"):
        pipeline_order(configs(*raw))
    with pytest.raises(ValueError, match=r"cycle: a -> a"):
        pipeline_order(configs(lookup("a", "a")))


def test_order_refuses_a_missing_parent_and_a_repeated_name() -> None:
    with pytest.raises(ValueError, match=r"'orders' depends on pipeline 'customers', which is not"):
        pipeline_order(configs(ORDERS))
    with pytest.raises(ValueError, match=r"'notes' is given twice"):
        pipeline_order(configs(NOTES, NOTES))


# ---- the gate: examples -------------------------------------------------------------------


def test_send_carries_the_parents_crm_ids_for_the_mapper() -> None:
    decision = only(gate([child(Account=C42, Vendor=V7)], {C42: Synced("c1"), V7: Synced("v1")}))
    assert isinstance(decision, Send)
    assert decision.resolved == {"Account": "c1", "Vendor": "v1"}
    assert decision.resolve("customers", "42") == "c1"
    assert decision.resolve("customers", "43") is None
    orders, customers = configs(ORDERS, CUSTOMERS)
    mapper = RecordMapper(orders, parents={"customers": customers})
    record = mapper.to_json({"id": 7, "title": "O7", "customer_id": 42}, decision.resolve)
    assert record["Account"] == {"id": "c1"}


def test_a_null_parent_never_blocks() -> None:
    decision = only(gate([child(Account=None, Vendor=V7)], {V7: Synced("v1")}))
    assert decision == Send("1", {"Vendor": "v1"}, {V7: "v1"})
    assert isinstance(only(gate([child(Account=None)], {})), Send)


def test_a_pending_parent_makes_the_child_wait_and_is_pulled_forward() -> None:
    view: dict[RecordRef, ParentState] = {C42: Pending(deadline=200.0)}
    result = gate([child("1", 100.0), child("2", 80.0), child("3", 300.0)], view, flush=5.0)
    assert result.decisions == (Wait("1", (C42,)), Wait("2", (C42,)), Wait("3", (C42,)))
    assert result.pull_forward == {C42: 75.0}  # min(200, 100 - 5, 80 - 5, 300 - 5)
    late_child = gate([child("1", 300.0)], {C42: Pending(deadline=90.0)})
    assert late_child.pull_forward == {C42: 90.0}  # never later than its own deadline


def test_a_parent_in_flight_makes_the_child_wait_without_a_pull() -> None:
    result = gate([child()], {C42: Pending(deadline=200.0, in_flight=True)})
    assert result.decisions == (Wait("1", (C42,)),)
    assert result.pull_forward == {}


def test_a_dead_parent_holds_the_child_naming_it() -> None:
    decision = only(gate([child(Account=C42)], {C42: Dead("INVALID_DATA: Account_Name")}))
    assert decision == Hold(
        "1", "Account", C42, "parent customers/42 is dead-lettered: INVALID_DATA: Account_Name"
    )
    assert decision.code == PARENT_NOT_SYNCED


def test_a_deleted_parent_holds_the_child() -> None:
    decision = only(gate([child()], {C42: Deleted()}))
    assert isinstance(decision, Hold)
    assert decision.message == "parent customers/42 is deleted"


def test_an_unknown_parent_waits_then_is_asked_once_then_holds() -> None:
    children = [child("1", 50.0), child("2", 40.0), child("3", 90.0)]
    early = gate(children, {}, now=10.0)
    assert [type(d) for d in early.decisions] == [Wait, Wait, Wait]
    assert early.pull_forward == {} and early.ask == ()
    due = gate(children, {}, now=50.0)
    assert due.decisions == (Ask("1", (C42,)), Ask("2", (C42,)), Wait("3", (C42,)))
    assert due.ask == (C42,)  # asked once for both children
    asked = gate(children, {C42: Unknown(asked=True)}, now=50.0)
    assert asked.decisions[0] == Hold("1", "Account", C42, "parent customers/42 is not in the CRM")
    assert isinstance(asked.decisions[2], Wait)  # its own deadline is not reached yet


def test_a_parent_still_pending_at_the_childs_deadline_holds_it() -> None:
    result = gate([child("1", 100.0)], {C42: Pending(deadline=60.0)}, now=100.0)
    decision = only(result)
    assert isinstance(decision, Hold) and decision.parent == C42
    assert decision.message.startswith("parent customers/42 is not in the CRM by the child's")
    assert result.pull_forward == {}


def test_a_dead_parent_holds_before_a_pending_one_and_the_first_field_names_it() -> None:
    view: dict[RecordRef, ParentState] = {C42: Pending(200.0), V7: Dead("x"), C43: Deleted()}
    decision = only(gate([child(Account=C42, Vendor=V7, Other=C43)], view))
    assert isinstance(decision, Hold) and decision.field == "Vendor" and decision.parent == V7
    result = gate([child(Account=C42, Vendor=V7)], {C42: Pending(200.0), V7: Synced("v")})
    assert result.decisions == (Wait("1", (C42,)),)
    due = only(gate([child(Account=C42, Vendor=V7)], view, now=100.0))  # C42 is late too
    assert isinstance(due, Hold) and due.parent == V7 and due.message.endswith("dead-lettered: x")
    late = {C42: Pending(200.0), C43: Unknown(asked=True)}
    due = only(gate([child(Account=C42, Other=C43)], late, now=100.0))
    assert isinstance(due, Hold) and due.field == "Account"


def test_gate_refuses_a_negative_flush_interval() -> None:
    with pytest.raises(ValueError, match="flush_interval"):
        gate([child()], {}, flush=-1.0)


def test_result_lists_decisions_by_kind() -> None:
    view: dict[RecordRef, ParentState] = {C42: Synced("c"), C43: Deleted()}
    result = gate([child("1"), child("2", Account=C43), child("3", Account=V7)], view)
    assert [d.key for d in result.of(Send)] == ["1"]
    assert [d.key for d in result.of(Hold)] == ["2"]
    assert [d.key for d in result.of(Wait)] == ["3"]


# ---- parent deletes -----------------------------------------------------------------------


def test_a_parent_delete_is_held_while_children_name_it() -> None:
    kids = {C42: {RecordRef("orders", "9"), RecordRef("orders", "10"), RecordRef("orders", "7")}}
    holds = hold_parent_deletes([C42, C43], kids, {"customers": "delete"})
    assert holds.go == (C43,)
    (held,) = holds.held
    assert held.parent == C42 and len(held.children) == 3 and held.code == PARENT_HAS_CHILDREN
    assert held.message == (
        "parent customers/42 is still named by 3 child record(s) in the legacy tables"
        " (orders/10 and 2 more); its delete waits until none names it"
    )
    one = hold_parent_deletes([C42], {C42: [RecordRef("orders", "7")]}, {})
    assert "(orders/7);" in one.held[0].message  # a pipeline not listed: the safe side


def test_mark_and_ignore_deletes_never_wait_for_children() -> None:
    kids = {C42: [RecordRef("orders", "7")]}
    for mode in ("mark", "ignore"):
        assert hold_parent_deletes([C42], kids, {"customers": mode}).go == (C42,)


def test_flush_order_writes_parents_first_and_deletes_children_first() -> None:
    order = ["customers", "orders", "order_lines"]
    batches = [
        FlushBatch("customers", "delete", ("1",)),
        FlushBatch("order_lines", "upsert", ("5",)),
        FlushBatch("orders", "delete", ("2",)),
        FlushBatch("customers", "upsert", ("3",)),
        FlushBatch("orders", "upsert", ("4",)),
        FlushBatch("order_lines", "delete", ("6",)),
    ]
    assert [(b.pipeline, b.op) for b in order_flush(batches, order)] == [
        ("customers", "upsert"),
        ("orders", "upsert"),
        ("order_lines", "upsert"),
        ("order_lines", "delete"),
        ("orders", "delete"),
        ("customers", "delete"),
    ]
    with pytest.raises(ValueError, match="'notes', which is not in the order"):
        order_flush([FlushBatch("notes", "upsert")], order)


# ---- properties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _F:
    field: str
    type: str = "lookup"
    pipeline: str | None = None


@dataclass(frozen=True)
class _Sub:
    pipeline: str
    field: str = "Lines"
    parent_column: str = "parent_id"


@dataclass(frozen=True)
class _Link:
    """What pipeline_order reads of a pipeline (config_relations.PipelineLinks)."""

    name: str
    fields: dict[str, _F] = field(default_factory=dict)
    subform_of: _Sub | None = None


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[_Link], dict[str, set[str]]]:
    """A random DAG of pipelines in a random config order: (pipelines, parents of each)."""
    n = draw(st.integers(1, 8))
    names = [f"p{i}" for i in range(n)]  # p_i may depend on p_j only for j < i
    parents: dict[str, set[str]] = {}
    links = []
    for i, name in enumerate(names):
        ps = draw(st.sets(st.sampled_from(names[:i]), max_size=3)) if i else set()
        sub = draw(st.sampled_from(sorted(ps))) if ps and draw(st.booleans()) else None
        fields = {f"{p}_id": _F(f"Ref_{p}", pipeline=p) for p in sorted(ps) if p != sub}
        fields["plain"] = _F("Plain", type="text")
        links.append(_Link(name, fields, _Sub(sub) if sub else None))
        parents[name] = ps
    return draw(st.permutations(links)), parents


def _ancestors(parents: dict[str, set[str]], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(parents[name])
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(parents[p])
    return seen


@settings(deadline=None, max_examples=200)
@given(case=dags())
def test_order_puts_every_parent_before_its_children(
    case: tuple[list[_Link], dict[str, set[str]]],
) -> None:
    links, parents = case
    order = pipeline_order(links)
    assert sorted(order) == sorted(parents)
    position = {name: i for i, name in enumerate(order)}
    for name, ps in parents.items():
        for p in ps:
            assert position[p] < position[name], (p, name, order)
    assert pipeline_order(links) == order  # the same again
    assert pipeline_order(list(links)) == order


@settings(deadline=None, max_examples=150)
@given(edges=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=8))
def test_order_and_config_validation_agree_on_cycles(edges: list[tuple[int, int]]) -> None:
    """On lookups alone, pipeline_order fails on a cycle exactly when check_lookups does."""
    raw = [lookup(f"p{i}", *sorted({f"p{b}" for a, b in edges if a == i})) for i in range(5)]
    pipelines = configs(*raw)
    try:
        check_lookups(pipelines, engine_supports=True)
        valid = True
    except ConfigError as e:
        assert "cycle" in str(e) or "its own pipeline" in str(e)
        valid = False
    if valid:
        pipeline_order(pipelines)
    else:
        with pytest.raises(ValueError, match=r"cycle: (p\d -> )+p\d "):
            pipeline_order(pipelines)


_REFS = [C42, C43, V7, RecordRef("vendors", "8")]
_states = st.one_of(
    st.builds(Synced, st.sampled_from(["c1", "c2", "c3"])),
    st.builds(Pending, st.floats(0, 200), st.booleans()),
    st.builds(Dead, st.sampled_from(["INVALID_DATA", "MANDATORY_NOT_FOUND"])),
    st.just(Deleted()),
    st.builds(Unknown, st.booleans()),
)
_children = st.lists(
    st.builds(
        ChildChange,
        st.text("0123456789", min_size=1, max_size=3),
        st.floats(0, 200),
        st.dictionaries(
            st.sampled_from(["Account", "Vendor", "Other"]),
            st.one_of(st.none(), st.sampled_from(_REFS)),
            max_size=3,
        ),
    ),
    max_size=8,
)
_views = st.dictionaries(st.sampled_from(_REFS), _states)


@dataclass(frozen=True)
class _GateCase:
    children: list[ChildChange]
    view: dict[RecordRef, ParentState]
    now: float
    flush: float

    def run(self) -> GateResult:
        return parents_first(self.children, self.view, now=self.now, flush_interval=self.flush)


_gate_cases = st.builds(_GateCase, _children, _views, st.floats(0, 200), st.floats(0, 30))


@settings(deadline=None, max_examples=300)
@given(case=_gate_cases)
def test_send_only_when_every_named_parent_is_synced(case: _GateCase) -> None:
    children, view, now = case.children, case.view, case.now
    result = case.run()
    assert [d.key for d in result.decisions] == [c.key for c in children]
    for c, d in zip(children, result.decisions, strict=True):
        named = {f: ref for f, ref in c.parents.items() if ref is not None}
        all_synced = all(isinstance(view.get(ref), Synced) for ref in named.values())
        assert isinstance(d, Send) == all_synced
        if isinstance(d, Send):
            for f, ref in named.items():
                state = view[ref]
                assert isinstance(state, Synced)
                assert d.resolved[f] == state.crm_id == d.resolve(*ref)
            assert set(d.resolved) == set(named)
        if isinstance(d, Hold):
            assert d.code == PARENT_NOT_SYNCED and c.parents[d.field] == d.parent
            assert d.message.startswith(f"parent {d.parent} ")
        if isinstance(d, Wait):
            assert now < c.deadline  # waiting never runs past the child's own deadline
        if isinstance(d, Ask):
            assert now >= c.deadline
            assert all(view.get(r, Unknown()) == Unknown() for r in d.parents)


@settings(deadline=None, max_examples=300)
@given(case=_gate_cases)
def test_pulled_forward_deadlines_meet_parent_and_every_waiting_child(case: _GateCase) -> None:
    children, view, flush = case.children, case.view, case.flush
    result = case.run()
    waiting_on: dict[RecordRef, list[float]] = {}
    for c, d in zip(children, result.decisions, strict=True):
        if isinstance(d, Wait):
            for ref in d.parents:
                waiting_on.setdefault(ref, []).append(c.deadline)
    for ref, at in result.pull_forward.items():
        state = view[ref]
        assert isinstance(state, Pending) and not state.in_flight
        assert at <= state.deadline
        for deadline in waiting_on[ref]:
            assert at <= deadline - flush
    for ref, deadlines in waiting_on.items():
        state = view.get(ref, Unknown())
        if isinstance(state, Pending) and not state.in_flight:
            assert result.pull_forward[ref] == min(state.deadline, *(d - flush for d in deadlines))


_OPS = st.sampled_from(["upsert", "delete"])


@settings(deadline=None, max_examples=200)
@given(case=dags(), data=st.data())
def test_flush_order_never_deletes_a_parent_before_a_child_write(
    case: tuple[list[_Link], dict[str, set[str]]], data: st.DataObject
) -> None:
    links, parents = case
    order = pipeline_order(links)
    names = sorted(parents)
    batches = data.draw(
        st.lists(st.builds(FlushBatch, st.sampled_from(names), _OPS, st.just(())), max_size=12)
    )
    out = order_flush(batches, order)
    assert sorted(out) == sorted(batches)
    for i, first in enumerate(out):
        for later in out[i + 1 :]:
            above_later = _ancestors(parents, later.pipeline)
            # a parent delete never before any write or delete of a (grand)child
            assert not (first.op == "delete" and first.pipeline in above_later)
            # a child write never before its parent's write
            if first.op == later.op == "upsert":
                assert later.pipeline not in _ancestors(parents, first.pipeline)


@settings(deadline=None, max_examples=200)
@given(
    deletes=st.lists(st.sampled_from(_REFS), unique=True),
    kids=st.dictionaries(
        st.sampled_from(_REFS),
        st.sets(st.builds(RecordRef, st.just("orders"), st.text("0123456789", min_size=1))),
    ),
    modes=st.dictionaries(
        st.sampled_from(["customers", "vendors"]), st.sampled_from(["delete", "mark", "ignore"])
    ),
)
def test_only_deletes_nobody_names_go(
    deletes: list[RecordRef], kids: dict[RecordRef, set[RecordRef]], modes: dict[str, str]
) -> None:
    holds = hold_parent_deletes(deletes, kids, modes)
    assert sorted([*holds.go, *(h.parent for h in holds.held)]) == sorted(deletes)
    for h in holds.held:
        assert modes.get(h.parent.pipeline, "delete") == "delete"
        assert set(h.children) == kids[h.parent] and h.children
        assert f"by {len(h.children)} child record(s) in the legacy tables ({h.children[0]}" in (
            h.message
        )
    for ref in holds.go:
        assert not kids.get(ref) or modes.get(ref.pipeline) not in (None, "delete")
