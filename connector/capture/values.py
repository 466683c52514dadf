"""Convert pgoutput text values into the JSON that ``to_jsonb(row)`` gives (TimeZone=UTC).

Pure: no I/O. The converters produce *JSON text fragments* (``str``), not Python objects, so that
numerics keep every digit and nothing goes through a binary float; the capture joins the
fragments of a row into one JSON object text and writes it into the ``jsonb`` outbox column,
where PostgreSQL normalises it exactly as it normalises ``to_jsonb`` output (``1e+100`` and
``1.5e-07`` become the same jsonb numerics as in ``to_jsonb``).

The replication session must run with ``TimeZone=UTC``, ``DateStyle=ISO``,
``IntervalStyle=postgres``, ``bytea_output=hex`` and ``extra_float_digits=1`` (see
``SESSION_OPTIONS``): pgoutput formats text values with the walsender's settings, exactly as a
trigger's ``to_jsonb`` formats them with its session's.

The rules follow PostgreSQL's ``jsonb_categorize_type`` (``src/backend/utils/adt/jsonb.c``),
applied to the base type of a domain:

* bool: ``true`` / ``false``;
* int2/int4/int8/float4/float8/numeric: the output text as a JSON number if it is a valid JSON
  number, otherwise a string (``"NaN"``, ``"Infinity"``);
* date / timestamp / timestamptz: ISO 8601 strings (``2024-01-02T03:04:05.123456+00:00``),
  ``"infinity"``, and PostgreSQL's `` BC`` suffix kept;
* json / jsonb: the value itself;
* arrays: JSON arrays (nested for several dimensions, bounds dropped) of converted elements;
* composite types, and types with a cast to json: not convertible from text alone
  (``NeedsServer``); the capture asks the server for ``to_jsonb(CAST(text AS type))``;
* anything else: the output text as a JSON string (bytea ``"\\\\x0102"``, interval, uuid, ...).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

#: GUCs a replication (or fallback) session needs so that text values match ``to_jsonb``.
SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres"
    " -c bytea_output=hex -c extra_float_digits=1"
)

Converter = Callable[[str], str]
"""From a value's text output to a JSON text fragment."""

# Built-in type OIDs (src/include/catalog/pg_type.dat).
BOOL = 16
BYTEA = 17
INT8 = 20
INT2 = 21
INT4 = 23
TEXT = 25
OID = 26
JSON = 114
FLOAT4 = 700
FLOAT8 = 701
VARCHAR = 1043
DATE = 1082
TIMESTAMP = 1114
TIMESTAMPTZ = 1184
NUMERIC = 1700
JSONB = 3802
RECORD = 2249

_I32_UNPACK = struct.Struct("!i").unpack_from

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_TZ_OFFSET = re.compile(r"([+-]\d\d)(?::(\d\d))?(?::(\d\d))?( BC)?\Z")


class NeedsServer(Exception):
    """The type's ``to_jsonb`` form cannot be derived from its text alone."""


def dumps_str(text: str) -> str:
    return orjson.dumps(text).decode()


def conv_text(text: str) -> str:
    return orjson.dumps(text).decode()


def conv_bool(text: str) -> str:
    return "true" if text in ("t", "true") else "false"


def conv_int(text: str) -> str:
    return text


def conv_number(text: str) -> str:
    if _NUMBER.match(text):
        return text
    return orjson.dumps(text).decode()


def conv_json(text: str) -> str:
    return text


def conv_date(text: str) -> str:
    return '"' + text + '"'  # digits, '-', ' BC' or (-)infinity: nothing to escape


def conv_timestamp(text: str) -> str:
    # '2024-01-02 03:04:05.5' -> '2024-01-02T03:04:05.5'; 'infinity' has no space.
    return '"' + text.replace(" ", "T", 1) + '"'


def conv_timestamptz(text: str) -> str:
    if text.endswith("+00") and text[10:11] == " ":  # the usual case with TimeZone=UTC
        return '"' + text[:10] + "T" + text[11:] + ':00"'
    if text[0] not in "0123456789":  # infinity / -infinity
        return orjson.dumps(text).decode()
    out = text.replace(" ", "T", 1)
    m = _TZ_OFFSET.search(out)
    if m:
        hh, mm, ss, bc = m.groups()
        offset = f"{hh}:{mm or '00'}" + (f":{ss}" if ss else "")
        out = out[: m.start()] + offset + (bc or "")
    return orjson.dumps(out).decode()


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """What the converter needs about a (non built-in) type, as read from ``pg_type``.

    ``base``: the type after stripping domains; ``elem``: the element type of an array
    (0 when not an array); ``delim``: the element delimiter; ``category``: one of ``scalar``
    (use the base type's converter), ``composite``, ``castjson``, ``other``.
    """

    oid: int
    base: int
    elem: int = 0
    delim: str = ","
    category: str = "scalar"
    sql_name: str = ""


_BUILTIN: dict[int, Converter] = {
    BOOL: conv_bool,
    INT2: conv_int,
    INT4: conv_int,
    INT8: conv_int,
    FLOAT4: conv_number,
    FLOAT8: conv_number,
    NUMERIC: conv_number,
    DATE: conv_date,
    TIMESTAMP: conv_timestamp,
    TIMESTAMPTZ: conv_timestamptz,
    JSON: conv_json,
    JSONB: conv_json,
}

# Fixed-length built-in types: never TOASTed.
FIXED_LENGTH = frozenset(
    {BOOL, INT2, INT4, INT8, OID, FLOAT4, FLOAT8, DATE, TIMESTAMP, TIMESTAMPTZ, 18, 1083, 1266,
     1186, 2950, 829, 790, 600}
)  # fmt: skip

# Common built-in array types: array OID -> element OID (delimiter ',').
_BUILTIN_ARRAYS: dict[int, int] = {
    1000: BOOL,
    1001: BYTEA,
    1005: INT2,
    1007: INT4,
    1016: INT8,
    1009: TEXT,
    1015: VARCHAR,
    1021: FLOAT4,
    1022: FLOAT8,
    1231: NUMERIC,
    1182: DATE,
    1115: TIMESTAMP,
    1185: TIMESTAMPTZ,
    199: JSON,
    3807: JSONB,
    2951: 2950,  # uuid[]
}

# Scalar built-in types whose to_jsonb form is their output text as a string.
_BUILTIN_STRING = {
    BYTEA,
    TEXT,
    VARCHAR,
    18,  # char
    19,  # name
    OID,
    1042,  # bpchar
    1083,  # time
    1266,  # timetz
    1186,  # interval
    2950,  # uuid
    869,  # inet
    650,  # cidr
    829,  # macaddr
    790,  # money
    1560,  # bit
    1562,  # varbit
    3614,  # tsvector
    3904,  # int4range
    3926,  # int8range
    3906,  # numrange
    3910,  # tstzrange
    3912,  # daterange
    3908,  # tsrange
    600,  # point
}


def parse_array(text: str, delim: str = ",") -> list[Any]:
    """Parse PostgreSQL's array output into nested lists of ``str | None`` (bounds dropped)."""
    i = 0
    n = len(text)
    if text.startswith("["):  # '[2:3]={1,2}': explicit bounds
        i = text.index("=") + 1
    if i >= n or text[i] != "{":
        raise ValueError(f"malformed array text: {text[:40]!r}")
    stack: list[list[Any]] = []
    result: list[Any] = []
    while i < n:
        ch = text[i]
        if ch == "{":
            new: list[Any] = []
            if stack:
                stack[-1].append(new)
            else:
                result = new
            stack.append(new)
            i += 1
        elif ch == "}":
            stack.pop()
            i += 1
            if not stack:
                break
        elif ch in (delim, " "):
            i += 1
        elif ch == '"':
            i += 1
            buf: list[str] = []
            while True:
                c = text[i]
                if c == "\\":
                    buf.append(text[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    j = i
                    while text[j] not in '\\"':
                        j += 1
                    buf.append(text[i:j])
                    i = j
            stack[-1].append("".join(buf))
        else:
            j = i
            while text[j] != delim and text[j] != "}":
                j += 1
            item = text[i:j]
            stack[-1].append(None if item.upper() == "NULL" else item)
            i = j
    return result


def array_converter(elem: Converter, delim: str = ",") -> Converter:
    def render(node: Any) -> str:
        if node is None:
            return "null"
        if isinstance(node, list):
            return "[" + ", ".join(render(x) for x in node) + "]"
        return elem(node)

    def conv(text: str) -> str:
        return render(parse_array(text, delim))

    return conv


def server_converter(sql_name: str) -> Converter:
    def conv(text: str) -> str:
        raise NeedsServer(sql_name)

    return conv


class TypeRegistry:
    """OID -> converter. Built-in types are known; others are added from ``pg_type`` rows."""

    def __init__(self) -> None:
        self._infos: dict[int, TypeInfo] = {}
        self._cache: dict[int, Converter] = {}

    def add(self, info: TypeInfo) -> None:
        self._infos[info.oid] = info
        self._cache.clear()

    def known(self, oid: int) -> bool:
        try:
            self.converter(oid)
        except KeyError:
            return False
        return True

    def missing(self, oids: list[int]) -> list[int]:
        """The OIDs (and element/base OIDs reached from them) that still need a lookup."""
        out: list[int] = []
        for oid in oids:
            try:
                self.converter(oid)
            except KeyError as exc:
                out.append(int(exc.args[0]))
        return out

    def converter(self, oid: int) -> Converter:
        """Raises ``KeyError(oid)`` with the OID that needs a ``pg_type`` lookup."""
        conv = self._cache.get(oid)
        if conv is None:
            conv = self._build(oid, 0)
            self._cache[oid] = conv
        return conv

    def _build(self, oid: int, depth: int) -> Converter:
        if depth > 10:
            raise ValueError(f"type {oid}: domain/array nesting too deep")
        if oid in _BUILTIN:
            return _BUILTIN[oid]
        if oid in _BUILTIN_ARRAYS:
            return array_converter(self._build(_BUILTIN_ARRAYS[oid], depth + 1))
        if oid in _BUILTIN_STRING:
            return conv_text
        info = self._infos.get(oid)
        if info is None:
            raise KeyError(oid)
        if info.category in {"composite", "castjson"}:
            return server_converter(info.sql_name)
        if info.elem:
            elem = self._infos.get(info.elem)
            if elem is not None and elem.category in ("composite", "castjson"):
                return server_converter(info.sql_name)
            return array_converter(self._build(info.elem, depth + 1), info.delim)
        if info.base != oid:
            return self._build(info.base, depth + 1)
        return conv_text


def to_json_value(fragment: str) -> Any:
    """A JSON fragment as a Python value, numerics as ``Decimal`` (the outbox reader's rule)."""
    import json

    return json.loads(fragment, parse_float=Decimal)


# -- fused decoding + conversion of a whole tuple (the capture's hot path) ---------------------

RowEncoder = Callable[[bytes, int, bytes, int, int], "tuple[bytes, bytes, int, int, bytes] | None"]
"""``encode(data, pos, head, xid, lsn)``: the TupleData at ``pos`` of ``data`` as an outbox row
ready for COPY's text format: ``(head + key + "\\t", json_image, xid, lsn, raw_key)`` with the
key and the row's JSON object text COPY-escaped; or None when the tuple needs the general path
(NULL key, an unchanged TOAST value, a binary value, a large variable-length value worth
caching, a column count that differs from the Relation)."""

# Byte-level fast paths of the converters above, by kind; each is an expression of the raw text
# ``r`` (bytes) giving the JSON fragment (bytes). ``test_decoder`` checks each one against the
# ``str`` converter and against ``to_jsonb``.
_FAST_EXPR = {
    "verbatim": "r",
    "json": "r",
    # numeric / float output is a JSON number unless it ends with a letter (NaN, Infinity)
    "number": "r if 47 < r[-1] < 58 else b'\"' + r + b'\"'",
    "bool": "TRUE if r[0] == 116 else FALSE",  # 't' (boolout) or 'true'
    "text": "dumps(r.decode())",
    "date": "b'\"' + r + b'\"'",
    "timestamp": "b'\"' + r.replace(b' ', b'T', 1) + b'\"'",
    "timestamptz": (
        "b'\"' + r[:10] + b'T' + r[11:] + b':00\"' if r[10:11] == b' ' and r.endswith(b'+00')"
        " else C{i}(r.decode()).encode()"
    ),
    "generic": "C{i}(r.decode()).encode()",
}

_FAST_KIND = {
    INT2: "verbatim",
    INT4: "verbatim",
    INT8: "verbatim",
    JSONB: "json",  # jsonb output never holds a raw control character (json may)
    NUMERIC: "number",
    FLOAT4: "number",
    FLOAT8: "number",
    BOOL: "bool",
    TEXT: "text",
    VARCHAR: "text",
    DATE: "date",
    TIMESTAMP: "timestamp",
    TIMESTAMPTZ: "timestamptz",
}


def fast_kind(oid: int, conv: Converter) -> str:
    """The byte-level fast path for a column of type ``oid`` whose converter is ``conv``."""
    kind = _FAST_KIND.get(oid)
    if kind is not None:
        return kind
    if conv is conv_text:
        return "text"  # every type whose to_jsonb is its output text as a string
    return "generic"


def fast_convert(kind: str, conv: Converter, raw: bytes) -> bytes:
    """One value through the fast path ``kind`` (what the generated encoder computes)."""
    expr = _FAST_EXPR[kind].format(i=0)
    env = {"r": raw, "dumps": orjson.dumps, "TRUE": b"true", "FALSE": b"false", "C0": conv}
    return bytes(eval(expr, env))  # noqa: S307 -- fixed expressions of this module


def row_encoder(
    names: list[str],
    oids: list[int],
    convs: list[Converter],
    *,
    key_idx: int,
    varlen: frozenset[int],
    big: int,
) -> RowEncoder:
    """Generate, once per Relation, a function that decodes a TupleData and builds the row's
    JSON text in one pass, without intermediate per-column objects.

    The function is generated source (as ``dataclasses`` and ``namedtuple`` do) so that the
    per-column work is straight-line code with the column's fast path inlined. Column names and
    converters never appear in the source: they are bound as constants (``K0``, ``C0``, ...).
    A variable-length value whose fragment exceeds ``big`` bytes sends the tuple to the general
    path, which keeps such values for unchanged-TOAST completion."""
    env: dict[str, Any] = {
        "I32": _I32_UNPACK,
        "dumps": orjson.dumps,
        "TRUE": b"true",
        "FALSE": b"false",
        "NULL": b"null",
        "TAB": b"\t",
    }
    kinds = [fast_kind(oid, conv) for oid, conv in zip(oids, convs, strict=True)]
    # may the JSON text hold a backslash (JSON escapes, bytea) or a raw control character?
    escape_body = any(k in _UNSAFE_KINDS for k in kinds)
    n = len(names)
    lines = [
        "def encode(d, p, head, xid, lsn):",
        f"    if d[p] != {n >> 8} or d[p + 1] != {n & 0xFF}:",
        "        return None",
        "    p += 2",
    ]
    out: list[str] = []
    for i, (name, kind, conv) in enumerate(zip(names, kinds, convs, strict=True)):
        prefix = ("{" if i == 0 else ",").encode() + orjson.dumps(name) + b":"
        env[f"K{i}"] = prefix if escape_body else copy_escape(prefix)
        env[f"C{i}"] = conv
        lines += [
            "    k = d[p]",
            "    if k == 116:",
            "        e = p + 5 + I32(d, p + 1)[0]",
            "        r = d[p + 5:e]",
            "        p = e",
            f"        x{i} = {_FAST_EXPR[kind].format(i=i)}",
        ]
        if i in varlen:
            lines += [f"        if len(x{i}) > {big}:", "            return None"]
        if i == key_idx:
            lines.append("        key = r")
        lines += [
            "    elif k == 110:",
            "        p += 1",
            f"        x{i} = NULL",
        ]
        if i == key_idx:
            lines.append("        return None")
        lines += ["    else:", "        return None"]
        out += [f"K{i}", f"x{i}"]
    out.append("b'}'" if n else "b'{}'")
    lines.append(f"    b = b''.join(({', '.join(out)},))")
    if escape_body:
        lines += _escape_lines("b")
    if n:
        lines.append("    k = key")
        if kinds[key_idx] != "verbatim":  # integers need no escaping
            lines += _escape_lines("k")
        lines.append("    return head + k + TAB, b, xid, lsn, key")
    else:
        lines.append("    return None")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<row encoder of {n} columns>", "exec"), env)  # noqa: S102
    fn: RowEncoder = env["encode"]
    fn.__doc__ = source
    return fn


_UNSAFE_KINDS = frozenset({"json", "text", "generic"})


def _escape_lines(var: str) -> list[str]:
    """Source lines applying ``copy_escape`` to ``var`` in place (inlined: no call)."""
    out = []
    for ch, esc in (("\\\\", "\\\\\\\\"), ("\\n", "\\\\n"), ("\\r", "\\\\r"), ("\\t", "\\\\t")):
        out += [f"    if b'{ch}' in {var}:", f"        {var} = {var}.replace(b'{ch}', b'{esc}')"]
    return out


def copy_escape(data: bytes) -> bytes:
    """``data`` as a field of COPY's text format (backslash, newline, CR and tab escaped)."""
    if b"\\" in data:
        data = data.replace(b"\\", b"\\\\")
    if b"\n" in data:
        data = data.replace(b"\n", b"\\n")
    if b"\r" in data:
        data = data.replace(b"\r", b"\\r")
    if b"\t" in data:
        data = data.replace(b"\t", b"\\t")
    return data
