"""A small COQL: ``select f1, f2 from Module [where …] [order by f [asc|desc]]
[limit [offset,] n | limit n offset m]`` with =, !=, <, <=, >, >=, in, not in, like,
between, is [not] null, and/or and parentheses. ``id`` is compared (and ordered) as a number,
so ``where id > {last} order by id asc limit 2000`` pages past the offset limit.

``Module`` is a module's API name or a **subform module**'s (:func:`subform_rows`): Zoho's COQL
Overview, "FROM - … To retrieve records from a Subform, specify the Subform module's API name"
(zoho.com/crm/developer/docs/api/COQL-Overview.html)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector.emulator.records import ModuleStore

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>!=|<>|>=|<=|=|<|>)"
    r"|(?P<punct>[(),*])|(?P<word>[A-Za-z_$][A-Za-z0-9_$.]*))"
)

Predicate = Callable[[dict[str, Any]], bool]


IN_MAX_VALUES = 50  # values of one `in` / `not in` (COQL-Limitations)


class CoqlError(Exception):
    def __init__(self, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def _syntax(near: str, column: int) -> CoqlError:
    return CoqlError(
        "SYNTAX_ERROR",
        "error occurred while parsing the query",
        {"line": 1, "column": column, "near": near},
    )


@dataclass
class Query:
    fields: list[str]
    module: str
    where: Predicate | None
    where_fields: list[str]
    order_by: str | None
    descending: bool
    offset: int
    limit: int


def tokenize(text: str) -> list[tuple[str, Any, int]]:
    out: list[tuple[str, Any, int]] = []
    pos = 0
    text = text.strip().rstrip(";")
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise _syntax(text[pos : pos + 10], pos + 1)
        kind = m.lastgroup or ""
        raw = m.group(kind)
        if kind == "str":
            value: Any = raw[1:-1].replace("''", "'").replace("\\'", "'")
        elif kind == "num":
            value = Decimal(raw) if "." in raw else int(raw)  # exact, like stored numbers
        else:
            value = raw
        out.append((kind, value, m.start(kind) + 1))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, Any, int]]) -> None:
        self.t = tokens
        self.i = 0
        self.where_fields: list[str] = []

    def peek(self) -> tuple[str, Any, int] | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def word(self, *options: str) -> bool:
        tok = self.peek()
        if tok and tok[0] == "word" and str(tok[1]).lower() in options:
            self.i += 1
            return True
        return False

    def expect_word(self, w: str) -> None:
        if not self.word(w):
            tok = self.peek()
            raise _syntax(str(tok[1]) if tok else "", tok[2] if tok else 0)

    def take(self) -> tuple[str, Any, int]:
        tok = self.peek()
        if tok is None:
            raise _syntax("", 0)
        self.i += 1
        return tok

    def punct(self, p: str) -> bool:
        tok = self.peek()
        if tok and tok[0] == "punct" and tok[1] == p:
            self.i += 1
            return True
        return False

    def value(self) -> Any:
        kind, v, col = self.take()
        if kind in ("str", "num"):
            return v
        if kind == "word" and str(v).lower() in ("true", "false"):
            return str(v).lower() == "true"
        if kind == "word" and str(v).lower() == "null":
            return None
        raise _syntax(str(v), col)

    def expr(self) -> Predicate:
        left = self.term()
        while self.word("or"):
            left = _or(left, self.term())
        return left

    def term(self) -> Predicate:
        left = self.factor()
        while self.word("and"):
            left = _and(left, self.factor())
        return left

    def factor(self) -> Predicate:
        if self.punct("("):
            p = self.expr()
            if not self.punct(")"):
                raise _syntax(")", 0)
            return p
        kind, name, col = self.take()
        if kind != "word":
            raise _syntax(str(name), col)
        self.where_fields.append(name)
        negate = self.word("not")
        if self.word("is"):
            is_not = self.word("not")
            self.expect_word("null")
            return _is_null(name, is_not)
        if self.word("in"):
            if not self.punct("("):
                raise _syntax("in", col)
            values = [self.value()]
            while self.punct(","):
                values.append(self.value())
            if not self.punct(")"):
                raise _syntax(")", col)
            if len(values) > IN_MAX_VALUES:
                # "in (up to 50 values)", "not in (up to 50 values)": COQL-Limitations
                # (zoho.com/crm/developer/docs/api/COQL-Limitations.html); Zoho's limit
                # errors of COQL are LIMIT_EXCEEDED (zoho-crm-api.md §2, "COQL")
                raise CoqlError(
                    "LIMIT_EXCEEDED",
                    f"limit exceeded: {'not in' if negate else 'in'} takes at most"
                    f" {IN_MAX_VALUES} values, got {len(values)}",
                    {"by": "in", "limit": IN_MAX_VALUES},
                )
            return _in(name, values, negate)
        if self.word("like"):
            pattern = str(self.value())
            rx = re.compile(
                "^" + ".*".join(re.escape(part) for part in pattern.split("%")) + "$",
                re.IGNORECASE,
            )
            return _like(name, rx, negate)
        if self.word("between"):
            lo = self.value()
            self.expect_word("and")
            hi = self.value()
            return _and(_compare(name, ">=", lo), _compare(name, "<=", hi))
        kind, op, col2 = self.take()
        if kind != "op":
            raise _syntax(str(op), col2)
        return _compare(name, op, self.value())


def _or(a: Predicate, b: Predicate) -> Predicate:
    return lambda r: a(r) or b(r)


def _and(a: Predicate, b: Predicate) -> Predicate:
    return lambda r: a(r) and b(r)


def _is_null(name: str, negate: bool) -> Predicate:
    return lambda r: (r.get(name) is None) != negate


def _in(name: str, values: list[Any], negate: bool) -> Predicate:
    return lambda r: (_lookup_id(r.get(name)) in values) != negate


def _lookup_id(v: Any) -> Any:
    """A lookup field is compared by the id of the record it points to ("Account_Name will give
    the ID and display field value of Account", JOINs in COQL Queries, zoho.com/crm/developer/
    docs/api/v8/COQL-Joins.html; criteria on a lookup take the record id)."""
    if isinstance(v, dict) and "id" in v:
        return v["id"]
    return v


def _like(name: str, rx: re.Pattern[str], negate: bool) -> Predicate:
    def pred(r: dict[str, Any]) -> bool:
        v = r.get(name)
        return (v is not None and rx.match(str(v)) is not None) != negate

    return pred


def _compare(name: str, op: str, value: Any) -> Predicate:
    if name == "id":  # record ids are numeric strings; Zoho compares them as numbers
        wanted = _as_id(value)
        return lambda r: _cmp(_as_id(r.get("id")), op, wanted)
    return lambda r: _cmp(_lookup_id(r.get(name)), op, value)


def _as_id(v: Any) -> Any:
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return v


def _cmp(a: Any, op: str, b: Any) -> bool:
    if op in ("=",):
        if isinstance(a, str) and isinstance(b, str):
            return a.casefold() == b.casefold()
        return bool(a == b)
    if op in ("!=", "<>"):
        if isinstance(a, str) and isinstance(b, str):
            return a.casefold() != b.casefold()
        return bool(a != b)
    if a is None or b is None:
        return False
    try:
        if op == "<":
            return bool(a < b)
        if op == "<=":
            return bool(a <= b)
        if op == ">":
            return bool(a > b)
        return bool(a >= b)
    except TypeError:
        return False


def parse(text: str, max_limit: int = 2000, max_records: int = 100_000) -> Query:
    """Parse ``text``; ``max_limit`` caps LIMIT, ``max_records`` caps offset + limit (how far
    LIMIT/OFFSET paging reaches; past it Zoho pages by ``where id > last``)."""
    tokens = tokenize(text)
    p = _Parser(tokens)
    p.expect_word("select")
    fields: list[str] = []
    while True:
        kind, v, col = p.take()
        if kind not in ("word", "punct") or (kind == "punct" and v != "*"):
            raise _syntax(str(v), col)
        fields.append(str(v))
        if not p.punct(","):
            break
    p.expect_word("from")
    kind, module, col = p.take()
    if kind != "word":
        raise _syntax(str(module), col)
    where: Predicate | None = None
    if p.word("where"):
        where = p.expr()
    order_by = None
    descending = False
    if p.word("order"):
        p.expect_word("by")
        kind, order_by, col = p.take()
        if p.word("desc"):
            descending = True
        else:
            p.word("asc")
    offset, limit = 0, 200
    if p.word("limit"):
        a = p.value()
        if p.punct(","):
            offset, limit = int(a), int(p.value())
        else:
            limit = int(a)
            if p.word("offset"):
                offset = int(p.value())
    if p.peek() is not None:
        tok = p.peek()
        assert tok is not None
        raise _syntax(str(tok[1]), tok[2])
    if limit > max_limit:
        raise CoqlError(
            "LIMIT_EXCEEDED",
            f"limit exceeded: maximum is {max_limit}",
            {"by": "limit", "limit": max_limit},
        )
    if offset + limit > max_records:
        raise CoqlError(
            "LIMIT_EXCEEDED",
            f"limit exceeded: offset and limit reach at most {max_records} records",
            {"by": "offset", "limit": max_records},
        )
    return Query(fields, str(module), where, p.where_fields, order_by, descending, offset, limit)


#: the lookup of a subform row to the record that holds it (Kaizen #124 "Accessing Subform using
#: Zoho CRM APIs": ``select … from <Subform module> where Parent_Id = '<record id>'``)
PARENT_ID = "Parent_Id"


@dataclass
class SubformRows:
    """A subform module as COQL reads it: the columns it knows and one record per row."""

    fields: list[str]  # the row fields, in the subform field's order
    rows: list[dict[str, Any]]


def subform_rows(stores: Mapping[str, ModuleStore], module: str) -> SubformRows | None:
    """The rows of subform module ``module`` (a subform field's ``subform.module``) as records,
    or None when no subform field of any module names it.

    Zoho documents COQL on a subform module ("FROM - … To retrieve records from a Subform,
    specify the Subform module's API name", COQL Overview, zoho.com/crm/developer/docs/api/
    COQL-Overview.html) and the criterion by the record that holds the rows (Kaizen #124
    "Accessing Subform using Zoho CRM APIs": ``select … from <Subform module> where Parent_Id =
    '…'``). Each row is one record: its row ``id``, its row fields, and ``Parent_Id``, a lookup
    to the record holding it, rendered as the emulator renders every lookup (``{"name": …,
    "id": …}``, ``ModuleStore.lookup_value``) and compared by that id in criteria, as lookups
    are (:func:`_lookup_id`). Rows of a deleted record are gone with it ("Whenever a record is
    deleted, all the subform details within the parent record will also get deleted", Update
    Subform Data, zoho.com/crm/developer/docs/api/update-subforms.html). Row ids come from the
    emulator's one id sequence, so ``where id > {last} order by id asc`` pages them as records.

    UNCONFIRMED (neither source says it): the exact shape of ``Parent_Id`` in the answer (with
    the record's name, as the emulator's lookups), which system columns a subform row has
    (none here: ``Created_Time`` and the like are refused as unknown columns), and that a
    subform module is charged as any COQL call (the same credits here).
    """
    fields: list[str] = []
    rows: list[dict[str, Any]] = []
    found = False
    for store in stores.values():
        for spec in store.m.fields.values():
            if spec.data_type != "subform" or (spec.subform_module or spec.api_name) != module:
                continue
            found = True
            fields += [f.api_name for f in spec.subform_fields if f.api_name not in fields]
            for rec in store.records.values():  # live records only: a deleted one's rows go
                parent = {"name": rec.get("Name"), "id": rec["id"]}
                rows += [{**row, PARENT_ID: parent} for row in rec.get(spec.api_name) or []]
    return SubformRows(fields, rows) if found else None
