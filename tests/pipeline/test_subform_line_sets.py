"""Subform line sets read at send time (``connector/subforms.py``, issue 21): each parent's
complete current line set from a real PostgreSQL table, the parents a batch of line events
rewrites (moves and deletes included), and, end to end against the emulator's documented row
semantics, that writing the touched parents with their sets leaves every order's CRM rows equal
to its legacy lines after inserts, changes, a move to another order and deletes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.crm_values import dumps_json
from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from connector.errors import DataError
from connector.mapping import SUBFORM_MAX_ROWS, RecordMapper, SubformMapper
from connector.subforms import (
    LineEvent,
    parent_column_type,
    parents_touched,
    read_line_sets,
)
from tests.emulator.conftest import Api
from tests.unit.test_mapping_subform import LINES, ORDERS, emulator_config, validated

LINES_DDL = """
CREATE TABLE public.order_lines (
    id       integer PRIMARY KEY,
    order_id {parent_type},
    product  text,
    qty      integer,
    price    numeric(10, 2),
    shipped  boolean,
    due      date
)
"""

Conn = psycopg.AsyncConnection[Any]


def mapper() -> SubformMapper:
    orders, lines = validated(ORDERS, LINES)
    return SubformMapper(lines, orders)


async def _table(conn: Conn, parent_type: str = "bigint") -> None:
    await conn.execute(LINES_DDL.format(parent_type=parent_type))
    await conn.commit()


async def _insert(conn: Conn, *rows: tuple[Any, ...]) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO public.order_lines (id, order_id, product, qty, price, shipped, due)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    await conn.commit()


async def test_each_parent_gets_its_complete_line_set_in_line_order(aconn: Conn) -> None:
    await _table(aconn)
    await _insert(
        aconn,
        (10, 1, "ten", 1, Decimal("9.90"), True, "2026-12-01"),
        (2, 1, "two", 2, None, None, None),
        (3, 1, "three", None, None, False, None),
        (4, 3, "four", 4, Decimal("0.10"), None, None),
        (5, None, "orphan", 5, None, None, None),
    )
    m = mapper()
    typ = await parent_column_type(aconn, m.pipeline)
    assert typ == "bigint"
    sets = await read_line_sets(aconn, m, ["1", "2", "3", "01", "1"], column_type=typ)

    assert sets.failed == {}
    assert list(sets.values) == ["1", "2", "3", "01"]  # each key once, as asked
    assert [r["Product"] for r in sets.values["1"]] == ["two", "three", "ten"]  # 2 < 3 < 10
    assert sets.values["1"][2] == {
        "Product": "ten",
        "Qty": 1,
        "Price": Decimal("9.90"),
        "Shipped": True,
        "Due": "2026-12-01",
    }
    assert sets.values["1"][1]["Qty"] is None  # NULL → null, the row still listed
    assert sets.values["2"] == []  # no line now: [] clears the parent's subform
    assert sets.values["3"] == [
        {"Product": "four", "Qty": 4, "Price": Decimal("0.10"), "Shipped": None, "Due": None}
    ]
    assert sets.values["01"] == sets.values["1"]  # grouped under the key as asked
    assert all("orphan" not in str(v) for v in sets.values.values())
    assert sets.lines == 3 + 1 + 3  # order 1's lines read for "1" and for "01"


async def test_a_set_that_cannot_be_written_whole_fails_alone(aconn: Conn) -> None:
    await _table(aconn)
    big = [(100 + i, 5, f"p{i}", i, None, None, None) for i in range(SUBFORM_MAX_ROWS + 1)]
    await _insert(aconn, *big, (1, 6, "fine", 1, None, None, None))
    m = mapper()
    typ = await parent_column_type(aconn, m.pipeline)
    sets = await read_line_sets(
        aconn, m, ["5", "abc", "6", "99999999999999999999"], column_type=typ
    )

    assert set(sets.failed) == {"5", "abc", "99999999999999999999"}
    assert sets.failed["5"].code == "SUBFORM_LIMIT"  # never truncated to 100 rows
    assert "101 lines" in str(sets.failed["5"])
    assert sets.failed["abc"].code == "BAD_PARENT_KEY"
    assert "public.order_lines.order_id (bigint)" in str(sets.failed["abc"])
    assert sets.failed["99999999999999999999"].code == "BAD_PARENT_KEY"  # out of range
    assert sets.values == {
        "6": [{"Product": "fine", "Qty": 1, "Price": None, "Shipped": None, "Due": None}]
    }


async def test_text_parent_keys_and_the_callers_transaction(aconn: Conn) -> None:
    await _table(aconn, parent_type="text")
    await _insert(aconn, (1, "A-1", "x", 1, None, None, None), (2, "a-1", "y", 2, None, None, None))
    m = mapper()
    typ = await parent_column_type(aconn, m.pipeline)
    assert typ == "text"
    async with aconn.transaction():
        await aconn.execute(
            "INSERT INTO public.order_lines (id, order_id, product) VALUES (3, 'A-1', 'z')"
        )
        sets = await read_line_sets(aconn, m, ["A-1", "a-1", "B"], column_type=typ)
        # the caller's transaction is still usable, and its own write is seen
        await aconn.execute("SELECT 1")
    assert [r["Product"] for r in sets.values["A-1"]] == ["x", "z"]
    assert [r["Product"] for r in sets.values["a-1"]] == ["y"]
    assert sets.values["B"] == []


async def test_a_missing_parent_column_is_named(aconn: Conn) -> None:
    await aconn.execute("CREATE TABLE public.order_lines (id integer PRIMARY KEY, product text)")
    await aconn.commit()
    with pytest.raises(Exception, match=r"has no column 'order_id' \(subform_of.parent_column"):
        await parent_column_type(aconn, mapper().pipeline)


# ---- which parents a batch of line events rewrites -----------------------------------------


def _ev(key: int, op: str, order: int | None, *, full_delete: bool = True) -> LineEvent:
    if op == "delete":
        row = {"id": key, "order_id": order, "product": "p"} if full_delete else {"id": key}
        return LineEvent(str(key), op, row)
    return LineEvent(str(key), op, {"id": key, "order_id": order, "product": f"p{key}"})


def test_a_moved_line_rewrites_both_orders_and_a_deleted_one_the_order_it_left() -> None:
    m = mapper()
    touched, memory = parents_touched(
        m,
        [
            _ev(1, "update", 8),  # moved from 7 to 8
            _ev(2, "delete", None, full_delete=False),  # logical: key only
            _ev(3, "insert", 9),
            _ev(4, "update", None),  # orphaned: leaves 7
        ],
        {"1": "7", "2": "6", "4": "7"},
    )
    assert touched == {"6", "7", "8", "9"}
    assert memory == {"1": "8", "2": None, "3": "9", "4": None}


_op = st.sampled_from(["upsert", "upsert", "delete"])


@settings(max_examples=300, deadline=None)
@given(
    start=st.dictionaries(st.integers(0, 6), st.integers(0, 3), max_size=6),
    steps=st.lists(
        st.tuples(st.integers(0, 6), _op, st.one_of(st.none(), st.integers(0, 3))), max_size=12
    ),
    full_delete=st.booleans(),
)
def test_every_parent_whose_line_set_changed_is_rewritten(
    start: dict[int, int], steps: list[tuple[int, str, int | None]], full_delete: bool
) -> None:
    """From the line → order placement last written to the CRM, any sequence of inserts,
    updates (moves, orphaning) and deletes touches every order whose set of lines differs at
    the end, and the memory says where each line is now; delete images key-only (logical
    capture) or full (triggers)."""
    m = mapper()
    placed: dict[int, int | None] = dict(start)
    events: list[LineEvent] = []
    for key, op, order in steps:
        if op == "delete":
            if key not in placed:
                continue  # no row to delete
            events.append(_ev(key, "delete", placed[key], full_delete=full_delete))
            del placed[key]
        else:
            events.append(_ev(key, "insert" if key not in placed else "update", order))
            placed[key] = order
    touched, memory = parents_touched(m, events, {str(k): str(v) for k, v in start.items()})

    def lines_of(p: dict[int, Any], order: int) -> set[int]:
        return {k for k, o in p.items() if o == order}

    for order in range(4):
        if lines_of(start, order) != lines_of(placed, order):
            assert str(order) in touched
    for key, order in placed.items():
        assert memory.get(str(key), str(start.get(key))) == (None if order is None else str(order))
    for ev in events:
        if ev.op == "delete" and int(ev.key) not in placed:
            assert memory[ev.key] is None


# ---- end to end against the emulator's row semantics ---------------------------------------


@pytest.fixture
async def crm() -> AsyncIterator[tuple[EmulatorHandle, Api]]:
    async with start_emulator(emulator_config()) as emu, aiohttp.ClientSession() as s:
        api = Api(emu, s)
        await api.login()
        yield emu, api


async def _upsert(api: Api, records: list[dict[str, Any]]) -> None:
    st_, _, body = await api.call(
        "POST",
        "/crm/v8/Orders/upsert",
        data=dumps_json({"data": records, "duplicate_check_fields": ["Legacy_Id"]}),
        headers={"Content-Type": "application/json"},
    )
    assert st_ in (200, 201), body
    assert all(item["status"] == "success" for item in body["data"]), body


async def _crm_lines(emu: EmulatorHandle) -> dict[str, list[tuple[Any, Any]]]:
    return {
        r["Legacy_Id"]: [(row["Product"], row["Qty"]) for row in r.get("Lines") or []]
        for r in emu.records("Orders")
    }


async def _legacy_lines(conn: Conn) -> dict[str, list[tuple[Any, Any]]]:
    cur = await conn.execute(
        "SELECT order_id::text, product, qty FROM public.order_lines"
        " WHERE order_id IS NOT NULL ORDER BY id"
    )
    out: dict[str, list[tuple[Any, Any]]] = {}
    for order, product, qty in await cur.fetchall():
        out.setdefault(order, []).append((product, qty))
    await conn.commit()
    return out


async def test_rewriting_the_touched_orders_keeps_crm_rows_equal_to_the_legacy_lines(
    aconn: Conn, crm: tuple[EmulatorHandle, Api]
) -> None:
    emu, api = crm
    await _table(aconn)
    m = mapper()
    orders = RecordMapper(m.parent)
    typ = await parent_column_type(aconn, m.pipeline)

    async def write(parents: set[str]) -> None:
        sets = await read_line_sets(aconn, m, sorted(parents), column_type=typ)
        assert sets.failed == {}
        await _upsert(
            api,
            [
                {**orders.to_json({"id": int(p), "title": f"O{p}"}), m.field: rows}
                for p, rows in sets.values.items()
            ],
        )

    await _insert(
        aconn,
        (1, 7, "a", 1, None, None, None),
        (2, 7, "b", 2, None, None, None),
        (3, 8, "c", 3, None, None, None),
    )
    await write({"7", "8"})
    memory = {"1": "7", "2": "7", "3": "8"}
    assert await _crm_lines(emu) == await _legacy_lines(aconn)

    # line 2 moves to order 8, line 1 changes, line 3 is deleted, line 4 is new on order 9
    await aconn.execute("UPDATE public.order_lines SET order_id = 8 WHERE id = 2")
    await aconn.execute("UPDATE public.order_lines SET qty = 11 WHERE id = 1")
    await aconn.execute("DELETE FROM public.order_lines WHERE id = 3")
    await _insert(aconn, (4, 9, "d", 4, None, None, None))
    events = [
        _ev(2, "update", 8),
        LineEvent("1", "update", {"id": 1, "order_id": 7, "product": "a", "qty": 11}),
        _ev(3, "delete", None, full_delete=False),
        _ev(4, "insert", 9),
    ]
    touched, moved = parents_touched(m, events, memory)
    assert touched == {"7", "8", "9"}
    await write(touched)
    assert await _crm_lines(emu) == await _legacy_lines(aconn)
    assert (await _crm_lines(emu))["7"] == [("a", 11)]

    # every line of order 8 deleted: its rows go ([]), the order stays
    await aconn.execute("DELETE FROM public.order_lines WHERE order_id = 8")
    await aconn.commit()
    memory.update(moved)
    touched, _ = parents_touched(m, [_ev(2, "delete", None, full_delete=False)], memory)
    assert touched == {"8"}
    await write(touched)
    crm_now = await _crm_lines(emu)
    assert crm_now["8"] == []
    assert {k: v for k, v in crm_now.items() if v} == await _legacy_lines(aconn)


def test_an_image_without_the_link_column_is_refused_not_orphaned() -> None:
    """NULL in ``order_id`` is an orphan line; no ``order_id`` at all (an image from before a
    rename) is an error: read as an orphan it would delete the line's row from its order."""
    m = mapper()
    with pytest.raises(DataError, match="no column 'order_id'") as exc:
        parents_touched(m, [LineEvent("1", "update", {"id": 1, "product": "x"})], {"1": "7"})
    assert exc.value.code == "MISSING_COLUMN"
    touched, memory = parents_touched(
        m, [LineEvent("1", "update", {"id": 1, "order_id": None})], {"1": "7"}
    )
    assert (touched, memory) == ({"7"}, {"1": None})
