"""The pgoutput decoder on messages captured from a real PostgreSQL 16 stream, and the value
converters against to_jsonb on the same server."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.capture import pgoutput as po
from connector.capture import values as vals

# CopyData payloads captured from START_REPLICATION ... (proto_version '1', messages 'true')
# for: CREATE TABLE t(id int primary key, v text); INSERT (1,'a'),(2,NULL); UPDATE v='b' WHERE
# id=1; pg_logical_emit_message(false, 'hb', 'x').
KEEPALIVE = b"k\x00\x00\x00\x00\x01HQ\xe8\x00\x03\x042g\xd1\x14r\x00"
BEGIN = (
    b"w\x00\x00\x00\x00\x01HQ\xe8\x00\x00\x00\x00\x01HQ\xe8\x00\x03\x042g\xd4\x02\xa8"
    b"B\x00\x00\x00\x00\x01HSH\x00\x03\x042g\xd0\xfb\x17\x00\x00\x02\xdc"
)
RELATION = (
    b"w\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x042g\xd4\x03"
    b"\x1eR\x00\x00@\x00public\x00t\x00d\x00\x02\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff"
    b"\x00v\x00\x00\x00\x00\x19\xff\xff\xff\xff"
)
INSERT1 = (
    b"w\x00\x00\x00\x00\x01HQ\xe8\x00\x00\x00\x00\x01HQ\xe8\x00\x03\x042g\xd4\x03=I\x00\x00@"
    b"\x00N\x00\x02t\x00\x00\x00\x011t\x00\x00\x00\x01a"
)
INSERT2 = (
    b"w\x00\x00\x00\x00\x01HR\xc8\x00\x00\x00\x00\x01HR\xc8\x00\x03\x042g\xd4\x03DI\x00\x00@"
    b"\x00N\x00\x02t\x00\x00\x00\x012n"
)
COMMIT = (
    b"w\x00\x00\x00\x00\x01HSx\x00\x00\x00\x00\x01HSx\x00\x03\x042g\xd4\x03KC\x00\x00\x00"
    b"\x00\x00\x01HSH\x00\x00\x00\x00\x01HSx\x00\x03\x042g\xd0\xfb\x17"
)
UPDATE = (
    b"w\x00\x00\x00\x00\x01HSx\x00\x00\x00\x00\x01HSx\x00\x03\x042g\xd4\x03qU\x00\x00@\x00N"
    b"\x00\x02t\x00\x00\x00\x011t\x00\x00\x00\x01b"
)
MESSAGE = (
    b"w\x00\x00\x00\x00\x01HT(\x00\x00\x00\x00\x01HT(\x00\x03\x042g\xd4\x03\x7fM\x00\x00\x00"
    b"\x00\x00\x01HT(hb\x00\x00\x00\x00\x01x"
)


def _msg(raw: bytes) -> po.PgOutputMessage:
    x = po.parse_copy_data(raw)
    assert isinstance(x, po.XLogData)
    return po.decode(x.payload)


def test_transport() -> None:
    ka = po.parse_copy_data(KEEPALIVE)
    assert isinstance(ka, po.Keepalive)
    assert ka.wal_end == 0x14851E8 and not ka.reply_requested
    x = po.parse_copy_data(INSERT1)
    assert isinstance(x, po.XLogData) and x.start_lsn == 0x14851E8
    status = po.standby_status(5, 4, 3, reply=True, now_us=7)
    assert status[0:1] == b"r" and len(status) == 34
    assert int.from_bytes(status[9:17], "big") == 4 and status[-1] == 1


def test_real_messages() -> None:
    b = _msg(BEGIN)
    assert isinstance(b, po.Begin) and b.xid == 732 and b.final_lsn == 0x1485348
    r = _msg(RELATION)
    assert isinstance(r, po.Relation)
    assert (r.namespace, r.name, r.replica_identity) == ("public", "t", "d")
    assert [(c.name, c.type_oid, c.is_key, c.typmod) for c in r.columns] == [
        ("id", 23, True, -1),
        ("v", 25, False, -1),
    ]
    i1, i2 = _msg(INSERT1), _msg(INSERT2)
    assert isinstance(i1, po.Insert) and i1.relation == r.oid and i1.new == [b"1", b"a"]
    assert isinstance(i2, po.Insert) and i2.new == [b"2", None]
    c = _msg(COMMIT)
    assert isinstance(c, po.Commit)
    assert c.commit_lsn == b.final_lsn and c.end_lsn == 0x1485378 and c.flags == 0
    u = _msg(UPDATE)
    assert isinstance(u, po.Update) and u.old is None and u.new == [b"1", b"b"]
    m = _msg(MESSAGE)
    assert isinstance(m, po.Message)
    assert (m.transactional, m.prefix, m.content) == (False, "hb", b"x")


def test_synthetic_messages() -> None:
    tup = b"\x00\x03t\x00\x00\x00\x0242nu"
    d = po.decode(b"D\x00\x00\x00\x10K" + tup)
    assert isinstance(d, po.Delete) and d.old_kind == "K" and d.old == [b"42", None, po.UNCHANGED]
    u = po.decode(b"U\x00\x00\x00\x10O" + tup + b"N" + tup)
    assert isinstance(u, po.Update) and u.old_kind == "O" and u.new[2] is po.UNCHANGED
    t = po.decode(b"T\x00\x00\x00\x02\x03\x00\x00\x00\x01\x00\x00\x00\x02")
    assert isinstance(t, po.Truncate) and t.relations == (1, 2) and t.cascade and t.restart_identity
    y = po.decode(b"Y\x00\x00@\x01public\x00mood\x00")
    assert y == po.Type(16385, "public", "mood")
    o = po.decode(b"O\x00\x00\x00\x00\x00\x00\x00\x05origin\x00")
    assert o == po.Origin(5, "origin")
    with pytest.raises(po.ProtocolError):
        po.decode(b"S\x00\x00\x00\x01\x01")


def test_lsn_and_xid_helpers() -> None:
    assert po.lsn_to_str(0x1_0000_00FF) == "1/FF"
    assert po.str_to_lsn("1/FF") == 0x1_0000_00FF
    epoch = 3 << 32
    assert po.widen_xid(100, epoch | 200) == epoch | 100
    # xid above the reference's low bits: the previous epoch (issued before the wrap)
    assert po.widen_xid(0xFFFF_FFF0, epoch | 5) == (2 << 32) | 0xFFFF_FFF0
    # reference slightly older than the transaction, across the wrap: the next epoch
    assert po.widen_xid(3, (2 << 32) | 0xFFFF_FFF0) == epoch | 3
    assert po.widen_xid(7, 10) == 7


def test_parse_array() -> None:
    assert vals.parse_array("{}") == []
    assert vals.parse_array('{"a b",NULL,"NULL","x\\"y\\\\",""}') == [
        "a b",
        None,
        "NULL",
        'x"y\\',
        "",
    ]
    assert vals.parse_array("[2:3]={{1,2},{3,NULL}}") == [["1", "2"], ["3", None]]
    assert vals.parse_array("{(1,2);(3,4)}", ";") == ["(1,2)", "(3,4)"]


# -- converters vs to_jsonb on the real server ----------------------------------------------

CASES: list[tuple[str, str]] = [
    ("true", "boolean"),
    ("false", "boolean"),
    ("32767", "int2"),
    ("-9223372036854775808", "int8"),
    ("1234567890123456789012345678.0123456789", "numeric(38,10)"),
    ("-0.0000000001", "numeric"),
    ("1.50", "numeric"),
    ("NaN", "numeric"),
    ("Infinity", "numeric"),
    ("1e100", "float8"),
    ("1.5e-7", "float8"),
    ("-0", "float8"),
    ("NaN", "float4"),
    ("-Infinity", "float8"),
    ("3.4028235e38", "float4"),
    ("2024-01-02 03:04:05.123456+02", "timestamptz"),
    ("2024-01-02 03:04:05+05:30", "timestamptz"),
    ("0044-03-15 10:00:00+00 BC", "timestamptz"),
    ("infinity", "timestamptz"),
    ("-infinity", "timestamp"),
    ("2024-01-02 03:04:05.5", "timestamp"),
    ("2024-02-29", "date"),
    ("0044-03-15 BC", "date"),
    ("12:34:56.789", "time"),
    ("12:00+02", "timetz"),
    ("1 year 2 mons 3 days 04:05:06", "interval"),
    ('{"b": [1, 2.50, null], "a": "ü"}', "jsonb"),
    ('{"b":  [1, 2.50],  "b": 3}', "json"),
    ("\\x00ff10", "bytea"),
    ('emoji 😀 rtl שלום " \\ \n \t', "text"),
    ("{{1,2},{3,NULL}}", "int[]"),
    ('{"a b",NULL,"NULL","q\\"u,o{t}e",""}', "text[]"),
    ("{1.10,NaN,NULL}", "numeric[]"),
    ('{"2024-01-02 03:04:05+00",infinity}', "timestamptz[]"),
    ('{"\\\\x01ff"}', "bytea[]"),
    ('{"{\\"a\\": 1}",null}', "jsonb[]"),
    ("{t,f}", "boolean[]"),
    ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "uuid"),
    ("[1,5)", "int4range"),
    ("192.168.0.1/24", "inet"),
    ('{"(1,2)","(3,4)"}', "point[]"),
    ("{(1,1),(0,0);(2,2),(1,1)}", "box[]"),
]


@pytest.fixture
def conn(database: str) -> Any:
    with psycopg.connect(database, autocommit=True, options=vals.SESSION_OPTIONS) as c:
        yield c


def _check(conn: psycopg.Connection[Any], literal: str, typ: str) -> None:
    row = conn.execute(
        f"SELECT CAST(%s AS {typ})::text, pg_typeof(CAST(%s AS {typ}))::oid::int,"
        f" to_jsonb(CAST(%s AS {typ}))::text",
        (literal, literal, literal),
    ).fetchone()
    assert row is not None
    text, oid, expected = row
    reg = vals.TypeRegistry()
    while reg.missing([oid]):
        missing = reg.missing([oid])[0]
        t = conn.execute(
            "SELECT typtype, typbasetype, typelem, typelem <> 0 AND typsubscript ="
            " 'array_subscript_handler'::regproc, (SELECT typdelim FROM pg_type e WHERE"
            " e.oid = t.typelem) FROM pg_type t WHERE oid = %s",
            (missing,),
        ).fetchone()
        assert t is not None
        if t[3]:
            reg.add(vals.TypeInfo(missing, missing, elem=t[2], delim=t[4]))
        else:
            reg.add(vals.TypeInfo(missing, missing, category="other"))
    frag = reg.converter(oid)(text)
    same = conn.execute("SELECT %s::jsonb = %s::jsonb", (frag, expected)).fetchone()
    assert same == (True,), (typ, literal, text, frag, expected)


@pytest.mark.parametrize(("literal", "typ"), CASES)
def test_converter_matches_to_jsonb(conn: psycopg.Connection[Any], literal: str, typ: str) -> None:
    _check(conn, literal, typ)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: (str(d), "numeric")),
        st.floats(allow_nan=False).map(lambda f: (repr(f).replace("inf", "Infinity"), "float8")),
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")).map(
            lambda s: (s, "text")
        ),
        st.lists(
            st.one_of(
                st.none(),
                st.text(
                    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                    max_size=8,
                ),
            ),
            max_size=5,
        ).map(lambda xs: (xs, "text[]")),
        st.datetimes().map(lambda d: (d.isoformat() + "+00", "timestamptz")),
    )
)
def test_converter_property(conn: psycopg.Connection[Any], case: tuple[Any, str]) -> None:
    value, typ = case
    if isinstance(value, list):
        row = conn.execute("SELECT %s::text[]::text", (value,)).fetchone()
        assert row is not None
        value = row[0]
    _check(conn, value, typ)


def test_to_json_value_keeps_digits() -> None:
    assert vals.to_json_value("1234567890123456789012345678.0123456789") == Decimal(
        "1234567890123456789012345678.0123456789"
    )
    assert (
        json.loads(vals.conv_timestamptz("2024-01-02 03:04:05+00")) == "2024-01-02T03:04:05+00:00"
    )
