"""The chaos checks fail when their property is broken (plain data, no processes)."""

from __future__ import annotations

import dataclasses
import os
import random
from decimal import Decimal
from typing import Any

from tests.chaos import checker
from tests.chaos.model import BAD_KINDS, Row, field_differences, invalid_reason, make_row


def _record(row: Row) -> dict[str, Any]:
    return {
        "id": f"r{row['id']}",
        "parent_id": str(row["id"]),
        "Name": row["name"],
        "Customer_Email": row["customer_email"],
        "Status": row["status"],
        "Amount": float(row["amount"]),
        "Quantity": row["quantity"],
        "Order_Date": row["order_date"].isoformat(),
        "Placed_At": row["placed_at"].isoformat(),
        "Notes": row["notes"],
        "Is_Gift": row["is_gift"],
        "Rev": row["rev"],
    }


def _rows(n: int = 50) -> dict[int, Row]:
    rng = random.Random(3)
    return {k: make_row(k, 1, rng, 0.0) for k in range(1, n + 1)}


def test_every_bad_kind_is_recognised_and_good_rows_are_not() -> None:
    rng = random.Random(1)
    seen = set()
    for k in range(3000):
        row = make_row(k, 1, rng, 0.5)
        why = invalid_reason(row)
        if why:
            seen.add(why)
    assert seen == set(BAD_KINDS)
    assert all(invalid_reason(r) is None for r in _rows().values())
    # payloads come back as JSON (strings for dates, numbers or "NaN" for numerics)
    assert invalid_reason({"name": "x", "amount": "NaN"}) == "amount_nan"
    assert invalid_reason({"name": "x", "order_date": "1899-06-01"}) == "date_1899"


def test_identical_state_passes() -> None:
    rows = _rows()
    report = checker.Report()
    checker.check_end_state(rows, [_record(r) for r in rows.values()], [], report)
    assert report.ok, report.summary()


def test_missing_different_extra_and_duplicate_are_found() -> None:
    rows = _rows()
    crm = [_record(r) for r in rows.values()]
    crm.pop(0)  # key 1 missing
    crm[0] = dict(crm[0], Amount=float(rows[2]["amount"] + Decimal("0.01")))  # key 2 differs
    crm.append(dict(_record(rows[3]), id="dup"))  # key 3 twice
    crm.append(dict(_record(rows[4]), id="x", parent_id="999"))  # deleted row left
    report = checker.Report()
    checker.check_end_state(rows, crm, [], report)
    assert set(report.counts) == {
        "missing_in_crm",
        "different_in_crm",
        "duplicate_in_crm",
        "deleted_row_left_in_crm",
    }


def test_invalid_rows_need_a_dead_letter_and_dead_letters_need_a_data_reason() -> None:
    rows = _rows()
    rows[5] = dict(rows[5], status="Lost")
    crm = [_record(r) for k, r in rows.items() if k != 5]
    report = checker.Report()
    checker.check_end_state(rows, crm, [], report)
    assert set(report.counts) == {"invalid_row_not_dead_lettered"}

    dl = checker.DeadLetter("5", 9, "INVALID_DATA", "Status", "invalid data", "open", rows[5])
    report = checker.Report()
    checker.check_end_state(rows, crm, [dl], report)
    checker.check_dead_letters([dl], report)
    assert report.ok, report.summary()

    transient = checker.DeadLetter("6", 3, "INTERNAL_ERROR", None, "boom", "open", rows[6])
    valid = checker.DeadLetter("7", 3, "INVALID_DATA", "Name", "bad", "resolved", rows[7])
    report = checker.Report()
    checker.check_dead_letters([transient, valid], report)
    assert set(report.counts) == {"dead_letter_for_transient_fault", "dead_letter_for_valid_row"}


def test_field_comparison_is_by_meaning() -> None:
    row = _rows(1)[1]
    rec = _record(row)
    rec["Amount"] = str(row["amount"])  # a string with the same digits
    rec["Placed_At"] = row["placed_at"].isoformat().replace("+00:00", "Z")
    assert field_differences(row, rec) == []
    rec["Rev"] = 0
    assert field_differences(row, rec) == ["Rev: expected 1, CRM has 0"]


def _h(ts: float, rev: int, key: str = "1", api: str = "upsert") -> dict[str, Any]:
    return {"timestamp": ts, "api": api, "values": {"parent_id": key, "Rev": rev}}


def test_history_going_back_is_found_across_records() -> None:
    good = {
        "a": [_h(1, 1), _h(2, 2), _h(3, 2), _h(4, 2, api="delete")],
        "b": [_h(5, 4), _h(6, 5)],  # re-inserted after a delete: a new record, higher Rev
    }
    report = checker.Report()
    checker.check_history(good, report)
    assert report.ok and report.history_writes == 5
    bad = {"a": [_h(1, 1), _h(2, 3)], "b": [_h(3, 2)]}  # a later write of an older Rev
    report = checker.Report()
    checker.check_history(bad, report)
    assert set(report.counts) == {"record_moved_to_older_version"}


def test_workload_record_must_equal_the_table() -> None:
    rows = _rows(5)
    report = checker.Report()
    checker.check_model(rows, {k: v for k, v in rows.items() if k != 2}, report)
    assert report.counts["model_vs_table"] == 1


def test_lag_timeline_is_folded_into_peaks_per_window() -> None:
    from tests.chaos.scenario import lag_peaks, parse_lag

    text = (
        "# HELP connector_outbox_lag_events x\n"
        'connector_outbox_lag_events{pipeline="orders"} 12.0\n'
        'connector_outbox_lag_events{pipeline="customers"} 30.0\n'
        'connector_pending_keys{pipeline="orders"} 3.0\n'
        'connector_api_calls_total{api="upsert"} 9.0\n'
    )
    assert parse_lag(text) == {
        "outbox_lag_events": 30.0,
        "outbox_lag_events:orders": 12.0,
        "outbox_lag_events:customers": 30.0,
        "pending_keys": 3.0,
        "pending_keys:orders": 3.0,
    }
    timeline = [
        {"t": 10.0, "outbox_lag_events": 5.0, "cpu_connector": 1.0, "rss_mb_connector": 90.0},
        {"t": 320.0, "outbox_lag_events": 50.0, "cpu_connector": 3.0, "rss_mb_connector": 120.0},
        {"t": 400.0, "outbox_lag_events": 7.0, "cpu_connector": 4.0, "rss_mb_connector": 110.0},
    ]
    assert lag_peaks(timeline) == [
        {
            "until_s": 300.0,
            "outbox_lag_events": 5.0,
            "cpu_connector": 1.0,
            "rss_mb_connector": 90.0,
        },
        {
            "until_s": 600.0,
            "outbox_lag_events": 50.0,
            "cpu_connector": 4.0,
            "rss_mb_connector": 120.0,
        },
    ]


def test_rss_is_read_from_proc_and_a_gone_process_reads_minus_one() -> None:
    import subprocess
    import sys

    from tests.chaos.scenario import rss_mb

    here = rss_mb(os.getpid())
    assert 1.0 < here < 100_000.0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert rss_mb(child.pid) == -1.0


async def test_the_runner_restarts_a_connector_that_exited_by_itself(monkeypatch: Any) -> None:
    """systemd restarts the deployed service 5 s after it exits (Restart=on-failure); the
    chaos runner does the same during the faults, so one exit (a start-up check failing while
    the credits are out) does not leave the rest of a soak without a connector. A deliberate
    kill (the kill lock held) is not an exit."""
    import asyncio
    from types import SimpleNamespace

    from tests.chaos import scenario

    monkeypatch.setattr(scenario, "RESTART_SEC", 0.05)
    monkeypatch.setattr(scenario, "SUPERVISE_POLL", 0.01)

    class Child:
        def __init__(self) -> None:
            self.running, self.starts = True, 0
            self.proc = SimpleNamespace(returncode=None)

        async def start(self) -> None:
            self.running, self.starts = True, self.starts + 1

    sc = object.__new__(scenario.Scenario)
    sc.name, sc.connector = "chaos", Child()
    sc._kill_lock = asyncio.Lock()
    sc.result = scenario.RunResult("chaos", 1, "triggers", True)
    task = asyncio.create_task(sc._supervise())
    try:
        async with sc._kill_lock:  # a kill: down on purpose, not restarted by the supervisor
            sc.connector.running = False
            await asyncio.sleep(0.2)
            assert sc.connector.starts == 0
            sc.connector.running = True
        sc.connector.running, sc.connector.proc.returncode = False, 1  # exits by itself
        for _ in range(200):
            if sc.connector.starts:
                break
            await asyncio.sleep(0.01)
        assert sc.connector.starts == 1 and sc.connector.running
        assert sc.result.evidence["connector_exited_rc_1"] == 1
    finally:
        task.cancel()


# ---- related tables (issue 21) ---------------------------------------------------------------


def _orders_with_customers() -> tuple[dict[int, Row], list[dict[str, Any]], list[dict[str, Any]]]:
    """Orders 1..6 naming customers 1..3 (order 6: none); their CRM records and Accounts."""
    rng = random.Random(5)
    rows = {k: make_row(k, 1, rng, 0.0, None if k == 6 else 1 + k % 3) for k in range(1, 7)}
    accounts = [{"id": f"a{c}", "Legacy_Id": str(c), "Name": f"C{c}", "Rev": 1} for c in (1, 2, 3)]
    crm = []
    for row in rows.values():
        rec = _record(row)
        c = row["customer_id"]
        rec["Customer_Ref"] = row["customer_ref"]
        rec["Account"] = None if c is None else {"id": f"a{c}", "name": f"C{c}"}
        crm.append(rec)
    return rows, crm, accounts


def test_lookups_right_pass_and_wrong_or_missing_are_found() -> None:
    rows, crm, accounts = _orders_with_customers()
    report = checker.Report()
    checker.check_end_state(rows, crm, [], report)
    checker.check_lookups(rows, crm, accounts, report)
    assert report.ok, report.summary()

    crm[0]["Account"] = {"id": "a3"}  # order 1 names customer 2: a3 is customer 3's record
    crm[5]["Account"] = {"id": "a1"}  # order 6 names no customer
    report = checker.Report()
    checker.check_lookups(rows, crm, accounts[1:], report)  # customer 1 not in the CRM
    assert report.counts["lookup_wrong"] == 2
    assert report.counts["lookup_parent_missing"] >= 1


def test_customers_checked_against_model_table_and_accounts() -> None:
    table = {c: {"id": c, "name": f"C{c}", "rev": 1} for c in (1, 2, 3)}
    accounts = [{"id": f"a{c}", "Legacy_Id": str(c), "Name": f"C{c}", "Rev": 1} for c in (1, 2, 3)]
    report = checker.Report()
    checker.check_customers(dict(table), table, accounts, report)
    assert report.ok, report.summary()
    stale = [dict(accounts[0], Rev=0), accounts[1], accounts[1]]  # old rev, a duplicate, one gone
    report = checker.Report()
    checker.check_customers({**table, 4: {"id": 4, "name": "C4", "rev": 1}}, table, stale, report)
    assert set(report.counts) == {
        "customer_model_vs_table",
        "customer_different_in_crm",
        "customer_duplicate_in_crm",
        "customer_missing_in_crm",
    }


def _write(ts: float, values: dict[str, Any], api: str = "upsert") -> dict[str, Any]:
    return {"api": api, "timestamp": ts, "values": values}


def test_lookup_history_finds_a_missing_early_or_wrong_parent() -> None:
    accounts = {
        "a1": [_write(10.0, {"Legacy_Id": "1", "Rev": 1})],
        "a2": [_write(20.0, {"Legacy_Id": "2", "Rev": 1}), _write(30.0, {"Legacy_Id": "2"})],
    }
    good = {
        "o1": [
            _write(11.0, {"parent_id": "1", "Account": "a1", "Customer_Ref": "1"}),
            _write(21.0, {"parent_id": "1", "Account": "a2", "Customer_Ref": "2"}),  # re-parented
            _write(22.0, {"parent_id": "1", "Account": None, "Customer_Ref": None}),
            _write(23.0, {"parent_id": "1"}, api="delete"),
        ]
    }
    report = checker.Report()
    checker.check_lookup_history(good, accounts, report)
    assert report.ok and report.lookup_writes == 3, report.summary()
    bad = {
        "o2": [
            _write(12.0, {"parent_id": "2", "Account": "a9", "Customer_Ref": "9"}),  # no record
            _write(15.0, {"parent_id": "2", "Account": "a2", "Customer_Ref": "2"}),  # too early
            _write(25.0, {"parent_id": "2", "Account": "a1", "Customer_Ref": "2"}),  # wrong one
            _write(26.0, {"parent_id": "2", "Account": None, "Customer_Ref": "2"}),  # cleared
        ]
    }
    report = checker.Report()
    checker.check_lookup_history(bad, accounts, report)
    assert dict(report.counts) == {
        "lookup_to_missing_parent": 1,
        "lookup_before_parent": 1,
        "lookup_to_wrong_parent": 1,
        "lookup_missing": 1,
    }


def test_a_released_hold_is_fine_and_one_still_open_is_not() -> None:
    rng = random.Random(2)
    payload = make_row(7, 1, rng, 0.0, 3)
    held = checker.DeadLetter(
        "7", 1, "PARENT_NOT_SYNCED", "Account", "parent customers/3 …", "resolved", payload
    )
    report = checker.Report()
    checker.check_dead_letters([held], report)
    assert report.ok, report.summary()
    report = checker.Report()
    checker.check_dead_letters([dataclasses.replace(held, status="open")], report)
    assert set(report.counts) == {"child_still_held"}


def test_order_lines_equal_to_the_table_pass_and_any_difference_is_found() -> None:
    table = _rows(3)
    lines = {1: [("p1", 2), ("p2", 3)], 2: [("p3", 1)]}
    crm = [_record(table[k]) for k in (1, 2, 3)]
    crm[0]["Lines"] = [{"id": "s1", "Product": "p1", "Qty": 2}, {"Product": "p2", "Qty": 3}]
    crm[1]["Lines"] = [{"Product": "p3", "Qty": 1}]
    ok = checker.Report()
    checker.check_lines(table, lines, crm, [], ok)  # order 3: no lines, no rows
    assert ok.ok and ok.line_orders == 3
    for broken, reason in [
        ({1: [("p2", 3), ("p1", 2)], 2: lines[2]}, "rows in another order"),
        ({1: lines[1], 2: [("p3", 2)]}, "an older quantity"),
        ({1: lines[1], 2: lines[2], 3: [("p9", 1)]}, "a line missing"),
        ({1: lines[1]}, "a deleted line still a row"),
    ]:
        bad = checker.Report()
        checker.check_lines(table, broken, crm, [], bad)
        assert bad.counts["lines_different"] == 1, reason
    # an order whose newest version is dead-lettered: its lines wait, not checked
    held = checker.Report()
    letter = checker.DeadLetter("2", 5, "INVALID_DATA", "Amount", "refused", "open", None)
    checker.check_lines(table, {1: lines[1], 2: [("p3", 2)]}, crm, [letter], held)
    assert held.ok


def test_line_dead_letters_only_for_orders_that_are_themselves_refused() -> None:
    order_letter = checker.DeadLetter("7", 3, "INVALID_DATA", "Amount", "refused", "open", None)
    waiting = checker.DeadLetter(
        "40", 1, "PARENT_NOT_SYNCED", "Lines", "parent orders/7 is dead-lettered: …", "open", None
    )
    ok = checker.Report()
    checker.check_line_dead_letters([waiting], [order_letter], ok)
    assert ok.ok
    bad = checker.Report()
    checker.check_line_dead_letters([waiting], [], bad)  # order 7 fine: the line is stuck
    assert bad.counts["line_still_dead_lettered"] == 1
    transient = dataclasses.replace(waiting, code="INTERNAL_ERROR", status="resolved")
    bad = checker.Report()
    checker.check_line_dead_letters([transient], [], bad)
    assert bad.counts["line_dead_letter_for_transient_fault"] == 1
    resolved = dataclasses.replace(waiting, status="resolved")
    ok = checker.Report()
    checker.check_line_dead_letters([resolved], [], ok)
    assert ok.ok


def test_an_older_line_set_written_after_a_newer_one_is_found() -> None:
    """Per record, in write order, a line's quantity only grows (the workload only raises
    it): a write carrying a lower one wrote a set read before a change. A line that left and
    came back with a higher quantity, or is in another record, is not a problem."""

    def w(rows: list[tuple[str, int]] | None, api: str = "update") -> dict[str, Any]:
        values: dict[str, Any] = {"parent_id": "1"}
        if rows is not None:
            values["Lines"] = [{"Product": p, "Qty": q} for p, q in rows]
        return {"api": api, "timestamp": 0.0, "values": values}

    fine = {
        "r1": [w([("p1", 2)]), w(None, "upsert"), w([]), w([("p1", 5), ("p2", 1)])],
        "r2": [w([("p1", 3)])],  # another record: read at another moment
    }
    ok = checker.Report()
    checker.check_line_history(fine, ok)
    assert ok.ok and ok.line_set_writes == 4
    bad = checker.Report()
    checker.check_line_history({"r1": [w([("p1", 5)]), w([("p1", 4), ("p2", 1)])]}, bad)
    assert bad.counts["line_set_older"] == 1


def test_the_chaos_history_keeps_a_subform_only_where_a_write_replaced_it() -> None:
    from tests.chaos.emulator_main import _slim_history

    first = [{"id": "9", "Product": "p1", "Qty": 2}]
    second = [{"id": "10", "Product": "p1", "Qty": 3}]
    h = [
        {"api": "upsert", "timestamp": 1.0, "values": {"parent_id": "1", "Rev": 1}},
        {"api": "update", "timestamp": 2.0, "values": {"parent_id": "1", "Lines": first}},
        {"api": "upsert", "timestamp": 3.0, "values": {"parent_id": "1", "Lines": first}},
        {"api": "update", "timestamp": 4.0, "values": {"parent_id": "1", "Lines": second}},
    ]
    out = _slim_history(h, ["parent_id", "Lines"])
    assert [e["values"].get("Lines") for e in out] == [
        None,
        [{"Product": "p1", "Qty": 2}],
        None,  # the same rows, kept by a write that did not name them
        [{"Product": "p1", "Qty": 3}],
    ]


def _rev_write(ts: float, key: int, rev: int, api: str = "upsert") -> dict[str, Any]:
    return {"timestamp": ts, "api": api, "values": {"parent_id": str(key), "Rev": rev}}


def test_staleness_runs_from_each_commit_until_the_crm_holds_it_or_newer() -> None:
    """Key 1: Rev 2 committed at 100 and Rev 3 at 101 arrive together at 110 (10 s and 9 s);
    key 2: Rev 5 at 100 arrives at 140 in another record (40 s, over a 35 s bound); key 3
    is dead-lettered (left out); key 4 never arrives (left to the end-state checks)."""
    committed = [(100.0, 1, 2), (101.0, 1, 3), (100.0, 2, 5), (100.0, 3, 1), (100.0, 4, 1)]
    history = {
        "r1": [_rev_write(50.0, 1, 1), _rev_write(110.0, 1, 3)],
        "r2": [_rev_write(60.0, 2, 4), _rev_write(70.0, 2, 4, api="delete")],
        "r2b": [_rev_write(140.0, 2, 5)],
        "r3": [_rev_write(300.0, 3, 1)],
    }
    letters = [checker.DeadLetter("3", 1, "INVALID_DATA", "Amount", "no", "open", None)]
    report = checker.Report()
    checker.check_staleness(committed, history, letters, report, bound=35.0)
    assert report.staleness == {"measured": 3, "p50": 10.0, "p99": 10.0, "max": 40.0}
    assert dict(report.counts) == {"change_late": 1}
    assert report.problems["change_late"] == [
        "key 2 Rev 5: in the CRM 40.0s after its commit (bound 35s), by upsert; the record's"
        " writes: Rev 4 by upsert at -40.0s, delete at -30.0s, Rev 5 by upsert at +40.0s"
    ]
    # deletes: key 5's Rev 2 was deleted at 105 before it was sent; the CRM deleted the
    # record at 120 (Rev 2 is reflected then, 20 s; the delete 15 s). Key 6 was deleted at
    # 100 and inserted again (Rev 3) at 101 before the delete went: one write of Rev 3 at 110
    # reflects both (10 s and 9 s). Key 7's delete at 100 is reflected by nothing yet.
    deletes = [
        (100.0, 5, 2),
        (105.0, 5, None),
        (100.0, 6, None),
        (101.0, 6, 3),
        (100.0, 7, None),
        (100.0, 8, None),  # key 8 never reached the CRM: its delete has nothing to do (0 s)
        (130.0, 8, 2),  # inserted again: its own write at 140 (10 s)
        (200.0, 9, 3),  # key 9, deleted in the CRM at 60, inserted again at 200 and deleted
        (212.0, 9, None),  # at 212 before anything was sent: both reflected at 212 (12 s, 0 s)
        (400.0, 9, 5),  # inserted again: written at 410 (10 s)
    ]
    history_d = {
        # the delete's entry without values, as the emulator may keep it
        "r5": [_rev_write(50.0, 5, 1), {"timestamp": 120.0, "api": "delete"}],
        "r6": [_rev_write(50.0, 6, 2), _rev_write(110.0, 6, 3)],
        "r7": [_rev_write(50.0, 7, 1)],
        "r8": [_rev_write(140.0, 8, 2)],
        "r9": [_rev_write(50.0, 9, 2), _rev_write(60.0, 9, 2, api="delete")],
        "r9b": [_rev_write(410.0, 9, 5)],
    }
    with_deletes = checker.Report()
    checker.check_staleness(deletes, history_d, [], with_deletes, bound=35.0)
    assert with_deletes.ok, with_deletes.summary()
    assert with_deletes.staleness == {"measured": 9, "p50": 10.0, "p99": 15.0, "max": 20.0}
    faulty = checker.Report()  # the chaos stack: figures only, no bound
    checker.check_staleness(committed, history, letters, faulty, bound=None)
    assert faulty.ok and faulty.staleness["max"] == 40.0
