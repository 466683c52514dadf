"""The end-state checks of a chaos run, on plain data (so that ``test_checker.py`` can show
that each check fails when its property is broken):

* the workload's own record of what it committed equals the table;
* every table row is in the CRM with identical field values, or (only when one of its values
  is one the CRM must refuse) in ``dead_letters`` with a data reason;
* no live CRM record without a table row (delete mode), no key twice in the CRM;
* no dead letter for a transient reason, none for a valid row image;
* the write history: per key, ``Rev`` never decreases from one write to the next;
* related tables (issue 21): every customer is in ``Accounts`` as in its table; every order's
  ``Account`` lookup names its customer's record (none for no customer); and in the write
  history, no ``Orders`` write ever named an ``Accounts`` record that did not exist yet, or
  one of another customer than the write's ``Customer_Ref`` (a missing or wrong parent);
* order lines (issue 21, the subform ``Orders.Lines``): every order in the CRM holds exactly its
  table lines, in line-key order, unless the order's own newest version is dead-lettered (its
  lines are then held for it); a line held ``PARENT_NOT_SYNCED`` at the end waits for such an
  order, and no line dead letter has a transient reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.model import TRANSIENT_CODES, Row, field_differences, invalid_reason, lookup_id

PARENT_NOT_SYNCED = "PARENT_NOT_SYNCED"

MAX_SHOWN = 20


@dataclass
class DeadLetter:
    key: str
    version: int
    code: str
    field: str | None
    message: str
    status: str
    payload: dict[str, Any] | None


@dataclass
class Report:
    rows: int = 0
    valid_rows: int = 0
    invalid_rows: int = 0
    crm_records: int = 0
    history_writes: int = 0
    lookup_writes: int = 0
    line_orders: int = 0  # orders whose CRM rows were compared with their table lines
    line_set_writes: int = 0  # writes of an order's subform rows read from the history
    dead_letters: int = 0
    dead_letter_codes: dict[str, int] = field(default_factory=dict)
    # seconds from each live commit of a valid order row until the CRM held it or newer
    # (``check_staleness``): p50 / p99 / max and how many were measured
    staleness: dict[str, float] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)

    def problem(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        shown = self.problems.setdefault(kind, [])
        if len(shown) < MAX_SHOWN:
            shown.append(text)

    @property
    def ok(self) -> bool:
        return not self.counts

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "valid_rows": self.valid_rows,
            "invalid_rows": self.invalid_rows,
            "crm_records": self.crm_records,
            "history_writes_checked": self.history_writes,
            "lookup_writes_checked": self.lookup_writes,
            "line_orders_checked": self.line_orders,
            "line_set_writes_checked": self.line_set_writes,
            "dead_letters": self.dead_letters,
            "dead_letter_codes": self.dead_letter_codes,
            "staleness": self.staleness,
            "problem_counts": dict(self.counts),
            "problems": self.problems,
        }


def check_model(expected: dict[int, Row], table: dict[int, Row], report: Report) -> None:
    for k in expected.keys() - table.keys():
        report.problem("model_vs_table", f"key {k}: committed by the workload, not in the table")
    for k in table.keys() - expected.keys():
        report.problem("model_vs_table", f"key {k}: in the table, the workload deleted it")
    for k in expected.keys() & table.keys():
        e, t = expected[k], table[k]
        if e["rev"] != t["rev"] or invalid_reason(e) != invalid_reason(t):
            report.problem("model_vs_table", f"key {k}: workload {e['rev']}, table {t['rev']}")


def check_end_state(
    table: dict[int, Row],
    crm_live: list[dict[str, Any]],
    dead_letters: list[DeadLetter],
    report: Report,
    key_field: str = "parent_id",
) -> None:
    by_key: dict[str, list[dict[str, Any]]] = {}
    for rec in crm_live:
        by_key.setdefault(str(rec.get(key_field)), []).append(rec)
    report.crm_records = len(crm_live)
    open_dl: dict[str, list[DeadLetter]] = {}
    for d in dead_letters:
        if d.status == "open":
            open_dl.setdefault(d.key, []).append(d)
    report.rows = len(table)
    for k, row in table.items():
        key = str(k)
        recs = by_key.get(key, [])
        if len(recs) > 1:
            report.problem("duplicate_in_crm", f"key {key}: {len(recs)} CRM records")
        why = invalid_reason(row)
        if why is None:
            report.valid_rows += 1
            if not recs:
                report.problem("missing_in_crm", f"key {key} (rev {row['rev']})")
                continue
            diff = field_differences(row, recs[0])
            if diff:
                report.problem("different_in_crm", f"key {key}: " + "; ".join(diff))
        else:
            report.invalid_rows += 1
            if not open_dl.get(key):
                state = f"CRM has rev {recs[0].get('Rev')}" if recs else "not in the CRM"
                report.problem(
                    "invalid_row_not_dead_lettered", f"key {key} ({why}, rev {row['rev']}): {state}"
                )
    for key, recs in by_key.items():
        if not key.isdigit() or int(key) not in table:
            report.problem("deleted_row_left_in_crm", f"key {key}: {len(recs)} CRM record(s)")


def check_dead_letters(dead_letters: list[DeadLetter], report: Report) -> None:
    """No dead letter for a transient fault or a valid row. A child held ``PARENT_NOT_SYNCED``
    (its customer not in the CRM by its deadline) is not a failure once released (resolved);
    still open at the end, when every customer exists, it is."""
    report.dead_letters += len(dead_letters)  # added up over the pipelines checked
    for code, n in Counter(d.code for d in dead_letters).items():
        report.dead_letter_codes[code] = report.dead_letter_codes.get(code, 0) + n
    for d in dead_letters:
        if d.code == PARENT_NOT_SYNCED:
            if d.status == "open":
                report.problem("child_still_held", f"key {d.key} v{d.version}: {d.message[:160]}")
            elif not d.message.strip():
                report.problem("dead_letter_without_reason", f"key {d.key} v{d.version}")
            continue
        if d.code in TRANSIENT_CODES:
            report.problem(
                "dead_letter_for_transient_fault", f"key {d.key} v{d.version}: {d.code} {d.message}"
            )
        elif d.payload is not None and invalid_reason(d.payload) is None:
            report.problem(
                "dead_letter_for_valid_row",
                f"key {d.key} v{d.version}: {d.code} {d.field} {d.message[:120]}",
            )
        elif not d.message.strip() or not d.code.strip():
            report.problem("dead_letter_without_reason", f"key {d.key} v{d.version}")


def check_history(
    history: dict[str, list[dict[str, Any]]], report: Report, key_field: str = "parent_id"
) -> None:
    """Per key (over every CRM record that ever held it, in write order): Rev never goes back."""
    writes: dict[str, list[tuple[float, int, str, str]]] = {}
    for rid, entries in history.items():
        for seq, h in enumerate(entries):
            if h.get("api") == "delete":
                continue
            values = h.get("values") or {}
            rev = values.get("Rev")
            key = values.get(key_field)
            if rev is None or key is None:
                continue
            ts = float(h.get("timestamp", 0.0))
            writes.setdefault(str(key), []).append((ts, seq, rid, f"{int(rev)}@{h.get('api')}"))
    for key, items in writes.items():
        items.sort(key=lambda t: (t[0], t[2], t[1]))
        last = -1
        for _ts, _seq, rid, tag in items:
            report.history_writes += 1
            rev = int(tag.split("@", 1)[0])
            if rev < last:
                report.problem(
                    "record_moved_to_older_version",
                    f"key {key} record {rid}: Rev {last} then {tag}",
                )
            last = max(last, rev)


def check_staleness(
    committed_at: list[tuple[float, int, int | None]],
    history: dict[str, list[dict[str, Any]]],
    dead_letters: list[DeadLetter],
    report: Report,
    *,
    bound: float | None,
) -> None:
    """Staleness from the source (DESIGN invariant 10): for each live commit of an order (the
    workload's wall clock just after the commit returned, so a little late: the figure errs
    short), the seconds until the CRM first reflected it or something newer:

    * a row (``Rev`` r): a write of ``Rev`` r or higher, or, when the source deleted the row
      later, the moment the CRM held no record of the key after that delete (at once when it
      held none: inserted and deleted before anything was sent, or deleted already);
    * a delete: at once when the CRM holds no record of the key then (never sent, or deleted
      already), else a CRM delete of the key after it, or a write of a ``Rev`` above every
      one committed before it (inserted again before the delete was sent).

    Keys with any dead letter are left out (a refused row, or a child held for its parent,
    arrives when fixed: not a bound to keep), as are changes that never arrived (the end-state
    checks say why). The figures go to the report; with ``bound`` (the fault-free baseline:
    ``max_staleness`` plus a slack for the scheduling of two stacks on two cores) each change
    over it is a problem ``change_late``, with the record's writes around it."""
    import bisect

    lettered = {d.key for d in dead_letters}
    writes: dict[str, list[tuple[float, int, str]]] = {}
    crm_deletes: dict[str, list[float]] = {}
    for entries in history.values():
        # a delete's entry need not carry the record's values: the record's key is the one
        # its writes name
        named = [(h.get("values") or {}).get("parent_id") for h in entries]
        record_key = next((str(k) for k in named if k is not None), None)
        for h in entries:
            values = h.get("values") or {}
            key = values.get("parent_id", record_key)
            if key is None:
                continue
            ts = float(h.get("timestamp", 0.0))
            if h.get("api") == "delete":
                crm_deletes.setdefault(str(key), []).append(ts)
            elif values.get("Rev") is not None:
                writes.setdefault(str(key), []).append((ts, int(values["Rev"]), str(h.get("api"))))
    arrivals: dict[str, tuple[list[int], list[float], list[str]]] = {}
    for key, ws in writes.items():
        ws.sort()
        revs: list[int] = []
        times: list[float] = []
        apis: list[str] = []
        for ts, rev, api in ws:  # the highest Rev held so far, since when, written by what
            if not revs or rev > revs[-1]:
                revs.append(rev)
                times.append(ts)
                apis.append(api)
        arrivals[key] = (revs, times, apis)
    for ds in crm_deletes.values():
        ds.sort()
    source_deletes: dict[str, list[float]] = {}
    for at, k, rev in committed_at:
        if rev is None:
            source_deletes.setdefault(str(k), []).append(at)
    for ds in source_deletes.values():
        ds.sort()

    def first_at_or_after(times: list[float], t: float) -> float | None:
        i = bisect.bisect_left(times, t)
        return times[i] if i < len(times) else None

    def gone_at(key: str, t: float) -> float | None:
        """When the CRM first held no record of ``key`` at or after ``t``: ``t`` itself when
        it held none then (never written, or its record deleted already), else its next
        delete."""
        times = arrivals.get(key, ([], [], []))[1]
        dels = crm_deletes.get(key, [])
        last_write = max((w for w in times if w <= t), default=None)
        last_del = max((d for d in dels if d <= t), default=None)
        if last_write is None or (last_del is not None and last_del >= last_write):
            return t
        return first_at_or_after(dels, t)

    samples: list[float] = []
    top_rev: dict[str, int] = {}  # per key, the highest Rev committed so far (commit order)
    for at, k, rev in sorted(committed_at, key=lambda c: c[0]):
        key = str(k)
        revs, times, apis = arrivals.get(key, ([], [], []))
        dels = crm_deletes.get(key, [])
        arrived: tuple[float, str] | None = None
        if rev is not None:
            top_rev[key] = max(top_rev.get(key, rev), rev)
            i = bisect.bisect_left(revs, rev)
            if i < len(revs):
                arrived = (times[i], apis[i])
            later = [t for t in source_deletes.get(key, []) if t > at]
            gone = gone_at(key, later[0]) if later else None
            if gone is not None and (arrived is None or gone < arrived[0]):
                arrived = (gone, "delete")  # deleted at the source before it was sent
        else:
            gone = gone_at(key, at)
            if gone is not None:
                arrived = (gone, "delete" if gone > at else "no record in the CRM")
            i = bisect.bisect_right(revs, top_rev.get(key, 0))
            j = bisect.bisect_left(times, at, lo=i)
            if j < len(times) and (arrived is None or times[j] < arrived[0]):
                arrived = (times[j], apis[j])
        if key in lettered or arrived is None:
            continue
        s = max(0.0, arrived[0] - at)
        samples.append(s)
        if bound is not None and s > bound:
            marks = [(t, f"Rev {r} by {a} at {t - at:+.1f}s") for r, t, a in zip(revs, times, apis)]
            marks += [(t, f"delete at {t - at:+.1f}s") for t in dels]
            seen = [text for _, text in sorted(marks)]
            what = "deleted" if rev is None else f"Rev {rev}"
            report.problem(
                "change_late",
                f"key {key} {what}: in the CRM {s:.1f}s after its commit (bound {bound:g}s), by"
                f" {arrived[1]}; the record's writes: {', '.join(seen[-6:])}",
            )
    if samples:
        samples.sort()
        report.staleness = {
            "measured": len(samples),
            "p50": round(samples[(len(samples) - 1) // 2], 2),
            "p99": round(samples[int(0.99 * (len(samples) - 1))], 2),
            "max": round(samples[-1], 2),
        }


# ---- related tables (issue 21) ---------------------------------------------------------------


def check_customers(
    expected: dict[int, Row],
    table: dict[int, Row],
    accounts: list[dict[str, Any]],
    report: Report,
) -> None:
    """The workload's customers are the table's, and each is in ``Accounts`` (once, by
    ``Legacy_Id``) with its ``Name`` and ``Rev``."""
    for k in expected.keys() ^ table.keys():
        report.problem("customer_model_vs_table", f"customer {k}: in one of model and table only")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for rec in accounts:
        by_key.setdefault(str(rec.get("Legacy_Id")), []).append(rec)
    for k, row in table.items():
        if k in expected and expected[k]["rev"] != row["rev"]:
            report.problem(
                "customer_model_vs_table",
                f"customer {k}: workload {expected[k]['rev']}, table {row['rev']}",
            )
        recs = by_key.get(str(k), [])
        if not recs:
            report.problem("customer_missing_in_crm", f"customer {k} (rev {row['rev']})")
            continue
        if len(recs) > 1:
            report.problem("customer_duplicate_in_crm", f"customer {k}: {len(recs)} records")
        rec = recs[0]
        rev = None if rec.get("Rev") is None else int(rec["Rev"])
        if rec.get("Name") != row["name"] or rev != int(row["rev"]):
            report.problem(
                "customer_different_in_crm",
                f"customer {k}: table ({row['name']!r}, {row['rev']}),"
                f" CRM ({rec.get('Name')!r}, {rec.get('Rev')})",
            )


def check_lookups(
    table: dict[int, Row],
    crm_live: list[dict[str, Any]],
    accounts: list[dict[str, Any]],
    report: Report,
    key_field: str = "parent_id",
) -> None:
    """Each valid order in the CRM names its customer's ``Accounts`` record (none when its
    ``customer_id`` is NULL). Invalid orders are dead-lettered (``check_end_state``)."""
    account_of = {str(a.get("Legacy_Id")): str(a.get("id")) for a in accounts}
    orders = {str(r.get(key_field)): r for r in crm_live}
    for k, row in table.items():
        rec = orders.get(str(k))
        if rec is None or invalid_reason(row) is not None:
            continue  # missing or invalid: check_end_state says so
        customer = row.get("customer_id")
        want = None if customer is None else account_of.get(str(customer))
        got = lookup_id(rec.get("Account"))
        if customer is not None and want is None:
            report.problem("lookup_parent_missing", f"order {k}: customer {customer} not in CRM")
        elif got != want:
            report.problem(
                "lookup_wrong",
                f"order {k} (customer {customer}): Account {got}, its customer's record {want}",
            )


def check_lookup_history(
    orders: dict[str, list[dict[str, Any]]],
    accounts: dict[str, list[dict[str, Any]]],
    report: Report,
) -> None:
    """No ``Orders`` write ever named a missing or wrong parent: each write's ``Account`` (an
    id) is an ``Accounts`` record that existed by the write's time and whose ``Legacy_Id`` is
    the write's ``Customer_Ref``; a write without a customer names no record."""
    created: dict[str, float] = {}
    legacy: dict[str, str] = {}
    for rid, entries in accounts.items():
        for h in entries:
            ts = float(h.get("timestamp", 0.0))
            created[rid] = min(created.get(rid, ts), ts)
            key = (h.get("values") or {}).get("Legacy_Id")
            if key is not None:
                legacy[rid] = str(key)
    for rid, entries in orders.items():
        for h in entries:
            values = h.get("values") or {}
            if h.get("api") == "delete" or "Account" not in values:
                continue
            report.lookup_writes += 1
            account = lookup_id(values.get("Account"))
            ref = values.get("Customer_Ref")
            ref = None if ref in (None, "") else str(ref)
            ts = float(h.get("timestamp", 0.0))
            where = f"order record {rid} ({values.get('parent_id')}) at {ts:.3f}"
            if account is None:
                if ref is not None:
                    report.problem("lookup_missing", f"{where}: no Account, customer {ref}")
            elif account not in legacy:
                report.problem("lookup_to_missing_parent", f"{where}: Account {account}")
            elif created[account] > ts:
                report.problem(
                    "lookup_before_parent",
                    f"{where}: Account {account} created at {created[account]:.3f}",
                )
            elif legacy[account] != ref:
                report.problem(
                    "lookup_to_wrong_parent",
                    f"{where}: Account {account} is customer {legacy[account]},"
                    f" the write's is {ref}",
                )


# ---- order lines: the subform Orders.Lines (issue 21) -----------------------------------------


def crm_lines(rec: dict[str, Any]) -> list[tuple[str, int | None]]:
    """A CRM order's subform rows as (Product, Qty), in row order."""
    return [
        (str(r.get("Product")), None if r.get("Qty") is None else int(r["Qty"]))
        for r in rec.get("Lines") or []
    ]


def check_lines(
    table: dict[int, Row],
    lines: dict[int, list[tuple[str, int]]],
    crm_live: list[dict[str, Any]],
    order_dls: list[DeadLetter],
    report: Report,
    key_field: str = "parent_id",
) -> None:
    """Each order in the CRM holds its table lines, in order (an order with none: no rows);
    not checked for an order whose newest version is dead-lettered (open), whose lines wait."""
    held = {d.key for d in order_dls if d.status == "open"}
    for rec in crm_live:
        key = str(rec.get(key_field))
        if not key.isdigit() or int(key) not in table or key in held:
            continue  # a deleted or refused order: check_end_state says what is wrong
        want = lines.get(int(key), [])
        got = crm_lines(rec)
        report.line_orders += 1
        if got != want:
            report.problem(
                "lines_different",
                f"order {key}: CRM {len(got)} row(s) {got[:3]}…, table {len(want)} {want[:3]}…",
            )


def check_line_history(history: dict[str, list[dict[str, Any]]], report: Report) -> None:
    """No write ever carried an older line set (issue 21): per CRM record, in write order, each
    line's quantity never goes down (the workload only raises it), so a set read before a
    change and written after one read later shows as a quantity that fell. Per record only:
    two orders are written under two locks, so a line moved between them can be read at two
    moments in either order. ``history``: writes with ``Lines`` only where they replaced it
    (``emulator_main._slim_history``)."""
    for rid, entries in history.items():
        last: dict[str, int] = {}
        for h in entries:
            rows = (h.get("values") or {}).get("Lines")
            if rows is None or h.get("api") == "delete":
                continue
            report.line_set_writes += 1
            for row in rows:
                product, qty = str(row.get("Product")), row.get("Qty")
                if qty is None:
                    continue
                before = last.get(product)
                if before is not None and int(qty) < before:
                    report.problem(
                        "line_set_older",
                        f"record {rid}: line {product} Qty {before} then {qty}"
                        f" ({h.get('api')} at {h.get('timestamp')})",
                    )
                last[product] = max(int(qty), before or 0)


def check_line_dead_letters(
    line_dls: list[DeadLetter], order_dls: list[DeadLetter], report: Report
) -> None:
    """Line dead letters: ``PARENT_NOT_SYNCED`` still open only for an order that is itself
    dead-lettered (open); none for a transient fault; every one with a reason."""
    held_orders = {d.key for d in order_dls if d.status == "open"}
    report.dead_letters += len(line_dls)
    for d in line_dls:
        report.dead_letter_codes[f"lines:{d.code}"] = (
            report.dead_letter_codes.get(f"lines:{d.code}", 0) + 1
        )
        if not d.message.strip() or not d.code.strip():
            report.problem("dead_letter_without_reason", f"line {d.key} v{d.version}")
        elif d.code in TRANSIENT_CODES:
            report.problem(
                "line_dead_letter_for_transient_fault", f"line {d.key}: {d.code} {d.message}"
            )
        elif d.status == "open":
            waits = d.code == PARENT_NOT_SYNCED and any(
                f"orders/{k} " in d.message + " " for k in held_orders
            )
            if not waits:
                report.problem(
                    "line_still_dead_lettered", f"line {d.key} v{d.version}: {d.message[:160]}"
                )
