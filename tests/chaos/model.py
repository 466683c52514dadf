"""The chaos workload's data model, independent of the connector's code: how a row is made,
which rows the CRM must refuse (and why), and how a CRM record is compared with a row.

Every row carries ``rev``: a per-key counter that only grows (also across a delete and a
re-insert of the same key) and is mapped to the CRM field ``Rev``, so the emulator's write
history shows whether a record ever moved to an older version.

Two tables (issue 21): ``customers`` (→ ``Accounts``) and ``orders`` (→ ``Orders``), whose
``customer_id`` is a lookup to the customer's CRM record (NULL: no customer). ``customer_ref``
holds the same value as text (``Customer_Ref``): a column is mapped once, so this is what the
write history shows the lookup must name.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

STATUSES = ("New", "Paid", "Shipped", "Delivered", "Cancelled", "Refunded")
NOTES = (None, "gift wrap", "leave at the door", 'he said "ring twice", then left; ok')
NAME_MAX = 255

COLUMNS = (
    "id",
    "name",
    "customer_email",
    "status",
    "amount",
    "quantity",
    "order_date",
    "placed_at",
    "notes",
    "is_gift",
    "rev",
    "customer_id",
    "customer_ref",
)

CUSTOMER_COLUMNS = ("id", "name", "rev")

# customers' column -> (CRM field, connector type), in the Accounts module (key: Legacy_Id)
CUSTOMER_FIELDS: dict[str, tuple[str, str]] = {
    "name": ("Name", "text"),
    "rev": ("Rev", "integer"),
}

# orders' lookup columns -> the pipeline they look up
LOOKUPS: dict[str, str] = {"customer_id": "customers"}

# column -> (CRM field, connector type)
FIELDS: dict[str, tuple[str, str]] = {
    "name": ("Name", "text"),
    "customer_email": ("Customer_Email", "email"),
    "status": ("Status", "picklist"),
    "amount": ("Amount", "currency"),
    "quantity": ("Quantity", "integer"),
    "order_date": ("Order_Date", "date"),
    "placed_at": ("Placed_At", "datetime"),
    "notes": ("Notes", "textarea"),
    "is_gift": ("Is_Gift", "boolean"),
    "rev": ("Rev", "integer"),
    "customer_id": ("Account", "lookup"),
    "customer_ref": ("Customer_Ref", "text"),
}

# The kinds of bad value the workload writes on purpose (each a data reason to dead-letter).
BAD_KINDS = ("name_too_long", "name_null", "bad_email", "bad_picklist", "date_1899", "amount_nan")

# Codes that mean a transient fault: a dead letter with one of these is always a failure.
TRANSIENT_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TOO_MANY_REQUESTS",
        "INVALID_TOKEN",
        "AUTHENTICATION_FAILURE",
        "OAUTH_SCOPE_MISMATCH",
        "TIMEOUT",
        "CONNECTION_ERROR",
        "SERVICE_UNAVAILABLE",
        "JOB_FAILED",
        "FAILED",
    }
)

Row = dict[str, Any]


def make_customer(key: int, rev: int) -> Row:
    """A customer row (always valid: the CRM never refuses one, so no order is held for a
    dead-lettered customer at the end of a run)."""
    return {"id": key, "name": f"Customer {key} r{rev}", "rev": rev}


def make_row(
    key: int, rev: int, rng: random.Random, bad_rate: float, customer: int | None = None
) -> Row:
    """A full row image for ``key`` at ``rev`` naming ``customer`` (None: no customer); with
    probability ``bad_rate`` one value is one that the CRM (or the value conversion) must
    refuse."""
    row: Row = {
        "id": key,
        "name": f"Order {key} r{rev}",
        "customer_email": f"buyer{key % 997}@example.org",
        "status": rng.choice(STATUSES),
        "amount": Decimal(rng.randint(100, 9_999_999)) / 100,
        "quantity": rng.randint(1, 9),
        "order_date": date(2024, 1, 1) + timedelta(days=rng.randint(0, 700)),
        "placed_at": datetime(2024, 1, 1, tzinfo=UTC)
        + timedelta(seconds=rng.randint(0, 6 * 10**7)),
        "notes": rng.choice(NOTES),
        "is_gift": rng.random() < 0.1,
        "rev": rev,
        "customer_id": customer,
        "customer_ref": None if customer is None else str(customer),
    }
    if rng.random() < bad_rate:
        kind = rng.choice(BAD_KINDS)
        if kind == "name_too_long":
            row["name"] = "N" * (NAME_MAX + 1 + rng.randint(0, 100))
        elif kind == "name_null":
            row["name"] = None
        elif kind == "bad_email":
            row["customer_email"] = f"not-an-email-{key}"
        elif kind == "bad_picklist":
            row["status"] = "Lost"
        elif kind == "date_1899":
            row["order_date"] = date(1899, 6, 1)
        else:
            row["amount"] = Decimal("NaN")
    return row


def _as_decimal(v: Any) -> Decimal | None:
    if v is None:
        return None
    try:
        return Decimal(str(v))
    except InvalidOperation:
        return None


def _as_date(v: Any) -> date | None:
    if v is None or isinstance(v, date):
        return v  # type: ignore[return-value]
    try:
        return date.fromisoformat(str(v)[:10])
    except ValueError:
        return None


def invalid_reason(row: Row) -> str | None:
    """Why the CRM must refuse this row (a row image from the table, the model, or a dead
    letter's payload), or None for a valid row."""
    name = row.get("name")
    if name is None or name == "":
        return "name_null"
    if len(str(name)) > NAME_MAX:
        return "name_too_long"
    email = row.get("customer_email")
    if email is not None and "@" not in str(email):
        return "bad_email"
    status = row.get("status")
    if status is not None and status not in STATUSES:
        return "bad_picklist"
    d = _as_date(row.get("order_date"))
    if d is not None and d.year < 1900:
        return "date_1899"
    amount = row.get("amount")
    if amount is not None:
        if isinstance(amount, float) and math.isnan(amount):
            return "amount_nan"
        dec = _as_decimal(amount)
        if dec is None or dec.is_nan():
            return "amount_nan"
    return None


def _instant(v: Any) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        dt = v
    else:
        try:
            dt = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).replace(microsecond=0)


def field_differences(row: Row, record: dict[str, Any]) -> list[str]:
    """The CRM fields of ``record`` whose value is not the row's (empty when identical)."""
    out: list[str] = []

    def differ(field: str, expected: Any, actual: Any) -> None:
        if expected != actual:
            out.append(f"{field}: expected {expected!r}, CRM has {actual!r}")

    differ("Name", row["name"], record.get("Name"))
    differ("Customer_Email", row["customer_email"], record.get("Customer_Email"))
    differ("Status", row["status"], record.get("Status"))
    differ("Amount", _as_decimal(row["amount"]), _as_decimal(record.get("Amount")))
    differ(
        "Quantity",
        row["quantity"],
        None if record.get("Quantity") is None else int(record["Quantity"]),
    )
    differ("Order_Date", _as_date(row["order_date"]), _as_date(record.get("Order_Date")))
    differ("Placed_At", _instant(row["placed_at"]), _instant(record.get("Placed_At")))
    differ("Notes", row["notes"] or None, record.get("Notes") or None)
    differ("Is_Gift", bool(row["is_gift"]), bool(record.get("Is_Gift")))
    differ("Rev", int(row["rev"]), None if record.get("Rev") is None else int(record["Rev"]))
    differ("Customer_Ref", row.get("customer_ref"), record.get("Customer_Ref") or None)
    return out


def lookup_id(value: Any) -> str | None:
    """The CRM id a lookup field value names (Zoho returns ``{"id", "name"}``), or None."""
    if isinstance(value, dict):
        value = value.get("id")
    return None if value in (None, "") else str(value)


@dataclass
class KeySlot:
    """What the workload believes about one key."""

    row: Row | None  # None: deleted (or never inserted)
    max_rev: int  # highest rev ever written for this key (kept across deletes)
