"""A decoder of the ``pgoutput`` logical replication protocol (version 1) and its transport.

Pure: no I/O. ``parse_copy_data`` unwraps one CopyData payload of the streaming replication
protocol (``w`` XLogData, ``k`` primary keepalive); ``decode`` turns one pgoutput message into a
dataclass; ``standby_status`` builds the ``r`` feedback message. References: PostgreSQL's
``protocol-replication.html`` and ``protocol-logicalrep-message-formats.html``,
``src/backend/replication/logical/proto.c``.

Tuple values are kept as the raw bytes of their text form (``None`` for NULL, ``UNCHANGED`` for
an unchanged TOASTed value that the server did not send); converting them is
``values.py``'s job, with a converter chosen once per Relation.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Final

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!bQQq")
_XLOG = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STATUS = struct.Struct("!cQQQq?")
_COLHDR = struct.Struct("!b")
_COLTYPE = struct.Struct("!Ii")


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()
"""Marker of an unchanged TOASTed value ('u'): the server did not send it."""

Value = bytes | None | _Unchanged


class ProtocolError(ValueError):
    """A message this decoder does not understand."""


# -- LSN helpers --------------------------------------------------------------------------------


def lsn_to_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def widen_xid(xid: int, reference: int) -> int:
    """Widen a 32-bit xid to the xid8 nearest to ``reference`` (a recent full xid of the server).

    Exact whenever the true xid8 is within 2**31 of ``reference``, which PostgreSQL's wraparound
    protection guarantees for any transaction still being decoded. With ``reference`` taken
    after the transaction started this is the rule "if the xid is above the low 32 bits of the
    current xid it belongs to the previous epoch"; it also stays right when ``reference`` is a
    little older than the transaction (an xid just past an epoch boundary).
    """
    cand = (reference & ~0xFFFF_FFFF) | xid
    diff = cand - reference
    if diff >= 1 << 31 and cand >= 1 << 32:  # the previous epoch is nearer (or as near)
        return cand - (1 << 32)
    if diff < -(1 << 31):  # the next epoch is nearer
        return cand + (1 << 32)
    return cand


def now_pg_us() -> int:
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US


# -- transport ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XLogData:
    start_lsn: int
    wal_end: int
    send_time: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_data(buf: memoryview | bytes) -> XLogData | Keepalive:
    mv = memoryview(buf)
    kind = mv[0]
    if kind == 0x77:  # 'w'
        start, end, ts = _XLOG.unpack_from(mv, 1)
        return XLogData(start, end, ts, mv[25:])
    if kind == 0x6B:  # 'k'
        end, ts, reply = _KEEPALIVE.unpack_from(mv, 1)
        return Keepalive(end, ts, reply)
    raise ProtocolError(f"unknown CopyData message {chr(kind)!r}")


def standby_status(
    written: int, flushed: int, applied: int, *, reply: bool = False, now_us: int | None = None
) -> bytes:
    """The ``r`` Standby Status Update; ``flushed`` is what moves ``confirmed_flush_lsn``."""
    return _STATUS.pack(
        b"r", written, flushed, applied, now_pg_us() if now_us is None else now_us, reply
    )


# -- pgoutput messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # LSN of the commit record
    commit_time: int  # microseconds since 2000-01-01
    xid: int  # 32-bit


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # end of the commit record: the position to confirm
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int  # 1 = part of the replica identity key
    name: str
    type_oid: int
    typmod: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation: int
    new: list[Value]


@dataclass(frozen=True, slots=True)
class Update:
    relation: int
    old_kind: str | None  # 'K' key only, 'O' full old row, None: not sent
    old: list[Value] | None
    new: list[Value]


@dataclass(frozen=True, slots=True)
class Delete:
    relation: int
    old_kind: str  # 'K' or 'O'
    old: list[Value]


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]
    options: int  # 1 = CASCADE, 2 = RESTART IDENTITY

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
)


def _cstring(mv: bytes | memoryview, pos: int) -> tuple[str, int]:
    end = pos
    while mv[end] != 0:
        end += 1
    return bytes(mv[pos:end]).decode(), end + 1


def decode_tuple(mv: bytes | memoryview, pos: int) -> tuple[list[Value], int]:
    """TupleData at ``pos``: the values and the position after them (fastest on ``bytes``)."""
    (ncols,) = _I16.unpack_from(mv, pos)
    pos += 2
    out: list[Value] = []
    append = out.append
    unpack_len = _I32.unpack_from
    for _ in range(ncols):
        kind = mv[pos]
        pos += 1
        if kind in {116, 98}:  # 't' text, 'b' binary
            (length,) = unpack_len(mv, pos)
            pos += 4
            append(bytes(mv[pos : pos + length]))
            pos += length
        elif kind == 0x6E:  # 'n'
            append(None)
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
        else:
            raise ProtocolError(f"unknown tuple column kind {chr(kind)!r}")
    return out, pos


def decode(buf: memoryview | bytes) -> PgOutputMessage:
    """Decode one pgoutput message (protocol version 1, no streaming)."""
    mv = buf
    kind = mv[0]
    if kind == 0x42:  # 'B'
        final_lsn, ts, xid = _BEGIN.unpack_from(mv, 1)
        return Begin(final_lsn, ts, xid)
    if kind == 0x43:  # 'C'
        flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(mv, 1)
        return Commit(flags, commit_lsn, end_lsn, ts)
    if kind == 0x49:  # 'I'
        (rel,) = _U32.unpack_from(mv, 1)
        if mv[5] != 0x4E:
            raise ProtocolError("Insert without a new tuple")
        new, _ = decode_tuple(mv, 6)
        return Insert(rel, new)
    if kind == 0x55:  # 'U'
        (rel,) = _U32.unpack_from(mv, 1)
        pos = 5
        old_kind: str | None = None
        old: list[Value] | None = None
        if mv[pos] in (0x4B, 0x4F):  # 'K' / 'O'
            old_kind = chr(mv[pos])
            old, pos = decode_tuple(mv, pos + 1)
        if mv[pos] != 0x4E:
            raise ProtocolError("Update without a new tuple")
        new, _ = decode_tuple(mv, pos + 1)
        return Update(rel, old_kind, old, new)
    if kind == 0x44:  # 'D'
        (rel,) = _U32.unpack_from(mv, 1)
        if mv[5] not in (0x4B, 0x4F):
            raise ProtocolError("Delete without an old tuple")
        old_d, _ = decode_tuple(mv, 6)
        return Delete(rel, chr(mv[5]), old_d)
    if kind == 0x52:  # 'R'
        (rel,) = _U32.unpack_from(mv, 1)
        ns, pos = _cstring(mv, 5)
        name, pos = _cstring(mv, pos)
        ident = chr(mv[pos])
        (ncols,) = _I16.unpack_from(mv, pos + 1)
        pos += 3
        cols: list[Column] = []
        for _ in range(ncols):
            (flags,) = _COLHDR.unpack_from(mv, pos)
            cname, pos = _cstring(mv, pos + 1)
            toid, typmod = _COLTYPE.unpack_from(mv, pos)
            pos += 8
            cols.append(Column(flags, cname, toid, typmod))
        return Relation(rel, ns, name, ident, tuple(cols))
    if kind == 0x59:  # 'Y'
        (toid,) = _U32.unpack_from(mv, 1)
        ns, pos = _cstring(mv, 5)
        name, _ = _cstring(mv, pos)
        return Type(toid, ns, name)
    if kind == 0x54:  # 'T'
        (nrel,) = _I32.unpack_from(mv, 1)
        opts = mv[5]
        rels = tuple(_U32.unpack_from(mv, 6 + 4 * i)[0] for i in range(nrel))
        return Truncate(rels, opts)
    if kind == 0x4D:  # 'M'
        flags = mv[1]
        (lsn,) = _U64.unpack_from(mv, 2)
        prefix, pos = _cstring(mv, 10)
        (length,) = _I32.unpack_from(mv, pos)
        return Message(bool(flags & 1), lsn, prefix, bytes(mv[pos + 4 : pos + 4 + length]))
    if kind == 0x4F:  # 'O'
        (lsn,) = _U64.unpack_from(mv, 1)
        name, _ = _cstring(mv, 9)
        return Origin(lsn, name)
    raise ProtocolError(f"unsupported pgoutput message {chr(kind)!r} (proto_version 1 expected)")
