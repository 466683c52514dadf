"""The fused row encoder (the capture's fast path) against the general path and to_jsonb."""

from __future__ import annotations

import json
import struct
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.capture import logical
from connector.capture import pgoutput as po
from connector.capture import values as vals

from .helpers import SCHEMA, installed, pipeline, running, wait_rows

TEXT_CHARS = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")

# (SQL type, type OID, strategy of Python values psycopg can send as that type's text)
TYPES: list[tuple[str, int, Any]] = [
    ("int2", vals.INT2, st.integers(-(2**15), 2**15 - 1).map(str)),
    ("int8", vals.INT8, st.integers(-(2**63), 2**63 - 1).map(str)),
    (
        "numeric",
        vals.NUMERIC,
        st.one_of(
            st.decimals(allow_nan=False, allow_infinity=False).map(str),
            st.sampled_from(["NaN", "Infinity", "-Infinity", "0.00", "-1.50"]),
        ),
    ),
    (
        "float8",
        vals.FLOAT8,
        st.one_of(
            st.floats(allow_nan=False).map(lambda f: repr(f).replace("inf", "Infinity")),
            st.just("NaN"),
        ),
    ),
    ("float4", vals.FLOAT4, st.floats(width=32, allow_nan=False, allow_infinity=False).map(repr)),
    ("boolean", vals.BOOL, st.sampled_from(["true", "false"])),
    ("text", vals.TEXT, st.text(TEXT_CHARS, max_size=20)),
    ("varchar", vals.VARCHAR, st.text(TEXT_CHARS, max_size=20)),
    ("date", vals.DATE, st.dates().map(str)),
    ("timestamp", vals.TIMESTAMP, st.datetimes().map(str)),
    (
        "timestamptz",
        vals.TIMESTAMPTZ,
        st.one_of(
            st.datetimes().map(lambda d: str(d) + "+00"),
            st.sampled_from(["infinity", "-infinity", "0044-03-15 10:00:00+00 BC"]),
        ),
    ),
    (
        "jsonb",
        vals.JSONB,
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(TEXT_CHARS, max_size=8),
            # keys too: PostgreSQL's jsonb refuses \u0000 anywhere (hypothesis found one)
            lambda c: (
                st.lists(c, max_size=3)
                | st.dictionaries(st.text(TEXT_CHARS, max_size=4), c, max_size=3)
            ),
            max_leaves=6,
        ).map(json.dumps),
    ),
    ("json", 114, st.sampled_from(['{"a":\n\t1, "a": 2}', "[1,\r\n2]", '"x\\\\y"'])),
    ("bytea", vals.BYTEA, st.binary(max_size=8).map(lambda b: "\\x" + b.hex())),
    ("interval", 1186, st.sampled_from(["1 day 02:03:04", "-00:00:01", "3 mons"])),
    ("uuid", 2950, st.uuids().map(str)),
    ("int[]", 1007, st.lists(st.integers(-5, 5) | st.none(), max_size=4).map(
        lambda xs: "{" + ",".join("NULL" if x is None else str(x) for x in xs) + "}"
    )),
]  # fmt: skip


@pytest.fixture
def conn(database: str) -> Any:
    with psycopg.connect(database, autocommit=True, options=vals.SESSION_OPTIONS) as c:
        yield c


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fast_value_equals_slow_equals_to_jsonb(conn: psycopg.Connection[Any], data: Any) -> None:
    typ, oid, strategy = data.draw(st.sampled_from(TYPES))
    literal = data.draw(strategy)
    row = conn.execute(
        f"SELECT CAST(%s AS {typ})::text, to_jsonb(CAST(%s AS {typ}))::text", (literal, literal)
    ).fetchone()
    assert row is not None
    text, expected = row
    reg = vals.TypeRegistry()
    conv = reg.converter(oid)
    slow = conv(text)
    fast = vals.fast_convert(vals.fast_kind(oid, conv), conv, text.encode())
    assert fast == slow.encode(), (typ, text)
    same = conn.execute("SELECT %s::jsonb = %s::jsonb", (slow, expected)).fetchone()
    assert same == (True,), (typ, text, slow, expected)


def _tuple(values: list[bytes | None]) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        out += b"n" if v is None else b"t" + struct.pack("!i", len(v)) + v
    return out


def _copy_unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i : i + 1]
        if c == b"\\":
            nxt = field[i + 1 : i + 2]
            out += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"\\": b"\\"}[nxt]
            i += 2
        else:
            assert c not in (b"\n", b"\r", b"\t")
            out += c
            i += 1
    return bytes(out)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(TEXT_CHARS, min_size=1, max_size=6),
            st.sampled_from(TYPES),
            st.data(),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda c: c[0],
    ),
    st.integers(0, 5),
    st.booleans(),
)
def test_row_encoder_equals_general_path(columns: list[Any], key_at: int, nulls: bool) -> None:
    """Whole tuples: the generated encoder gives the COPY-escaped JSON object of the per-column
    converters (text taken as the server would print it is not needed: the comparison is of the
    two Python paths on the same text), the escaped key, and refuses a NULL key."""
    reg = vals.TypeRegistry()
    names = [c[0] for c in columns]
    oids = [c[1][1] for c in columns]
    convs = [reg.converter(o) for o in oids]
    texts: list[bytes | None] = []
    for _, (_, oid, strategy), data in columns:
        if nulls and data.draw(st.booleans()):
            texts.append(None)
        else:
            texts.append(_server_like(oid, data.draw(strategy)).encode())
    key_idx = key_at % len(columns)
    enc = vals.row_encoder(
        names, oids, convs, key_idx=key_idx, varlen=frozenset(range(len(names))), big=10**6
    )
    got = enc(b"xx" + _tuple(texts), 2, b"\tp\tinsert\t", 7, 9)
    if texts[key_idx] is None:
        assert got is None
        return
    assert got is not None
    head, body, xid, lsn, raw_key = got
    assert (xid, lsn, raw_key) == (7, 9, texts[key_idx])
    assert head == b"\tp\tinsert\t" + vals.copy_escape(texts[key_idx] or b"") + b"\t"
    frags = [
        "null" if t is None else conv(t.decode()) for conv, t in zip(convs, texts, strict=True)
    ]
    general = "{" + ",".join(vals.dumps_str(n) + ":" + f for n, f in zip(names, frags)) + "}"
    assert _copy_unescape(body) == general.encode()
    assert json.loads(_copy_unescape(body)) == json.loads(general)


def _server_like(oid: int, literal: str) -> str:
    """Text as the server prints it, for the types whose generated literal differs."""
    if oid == vals.BOOL:
        return literal[0]
    if oid == vals.TIMESTAMPTZ and literal[0].isdigit() and " BC" not in literal:
        return literal  # '2024-01-02 03:04:05.123456+00'
    return literal


def test_encoder_refuses_what_it_cannot_do() -> None:
    reg = vals.TypeRegistry()
    enc = vals.row_encoder(
        ["id", "v"],
        [vals.INT4, vals.TEXT],
        [reg.converter(vals.INT4), reg.converter(vals.TEXT)],
        key_idx=0,
        varlen=frozenset({1}),
        big=10,
    )
    assert enc(_tuple([b"1", b"short"]), 0, b"", 0, 0) is not None
    assert enc(_tuple([b"1", b"x" * 20]), 0, b"", 0, 0) is None  # large: general path
    assert enc(_tuple([b"1"]), 0, b"", 0, 0) is None  # column count differs
    unchanged = struct.pack("!h", 2) + b"t\x00\x00\x00\x011u"
    assert enc(unchanged, 0, b"", 0, 0) is None  # unchanged TOAST value
    binary = struct.pack("!h", 2) + b"t\x00\x00\x00\x011b\x00\x00\x00\x01x"
    assert enc(binary, 0, b"", 0, 0) is None


def _widen_reference(xid: int, reference: int) -> int:
    epoch = reference >> 32
    best = -1
    for e in (epoch - 1, epoch, epoch + 1):
        if e < 0:
            continue
        cand = (e << 32) | xid
        if best < 0 or abs(cand - reference) < abs(best - reference):
            best = cand
    return best


@given(
    st.integers(0, 2**32 - 1),
    st.one_of(
        st.integers(0, 2**40),
        st.integers(0, 2**8).map(lambda e: (e << 32) | 2**31),
        st.integers(0, 2**8).map(lambda e: (e << 32) + 2**31 - 1),
    ),
)
def test_widen_xid_is_the_nearest_candidate(xid: int, reference: int) -> None:
    assert po.widen_xid(xid, reference) == _widen_reference(xid, reference)


async def test_fast_path_escaping_round_trip(database: str) -> None:
    """Backslashes, tabs, newlines and quotes in a text key, a column name and json/text values
    go through COPY's text format intact and match to_jsonb."""
    cfg = pipeline(key="k", fields=("j",))
    async with installed(
        database,
        cfg,
        'CREATE TABLE orders (k text PRIMARY KEY, "we\\ird\t""name" text, j json,'
        " jb jsonb, n numeric, b bytea, ts timestamptz, f float8)",
    ) as conn:
        cap = logical.LogicalCapture(database, SCHEMA, cfg)
        values = [
            ("a\\b\tc\nd\re", 'x\\y\t"z"\n', '{"k":\n\t"v\\\\w"}', '{"q": "\\\\"}'),
            ("plain", "é😀", "[1,\r\n2]", "[]"),
        ]
        async with running(cap):
            for k, v, j, jb in values:
                await conn.execute(
                    "INSERT INTO orders VALUES (%s, %s, %s, %s, 'NaN', '\\x5c09',"
                    " '2024-01-02 03:04:05.5+02', '-Infinity')",
                    (k, v, j, jb),
                )
            await conn.execute("UPDATE orders SET n = 1.50 WHERE k = 'plain'")
            rows = await wait_rows(database, 3)
        assert [r["key"] for r in rows] == ["a\\b\tc\nd\re", "plain", "plain"]
        assert cap.stats.events == 3
        await conn.execute("SET TimeZone = 'UTC'")
        cur = await conn.execute(
            "SELECT count(*) FROM connector.outbox o JOIN orders t ON o.key = t.k"
            " WHERE o.row = to_jsonb(t) AND o.id = (SELECT max(id) FROM connector.outbox"
            " o2 WHERE o2.key = o.key)"
        )
        assert await cur.fetchone() == (2,)
