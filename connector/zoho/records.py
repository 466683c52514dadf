"""Zoho CRM answers: the reply of one HTTP call and its parsing into per-record results and
field metadata. Split out of :mod:`connector.zoho.client`, which re-exports these names."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from connector.errors import PermanentError


@dataclass(frozen=True, slots=True)
class RecordResult:
    """The CRM's answer for one record of a write call, in input order."""

    index: int
    status: Literal["success", "error"]
    code: str
    message: str
    field: str | None = None  # api_name from details (the field the error is about)
    id: str | None = None  # CRM record id
    action: Literal["insert", "update"] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass(frozen=True, slots=True)
class FieldMeta:
    """One field of ``GET /crm/v8/settings/fields?module=``."""

    api_name: str
    data_type: str
    json_type: str | None = None
    unique: bool = False
    mandatory: bool = False
    read_only: bool = False
    length: int | None = None
    picklist_values: tuple[str, ...] = ()
    lookup_module: str | None = None  # data_type "lookup": the target module (``lookup.module``)
    # data_type "subform": the subform module (``subform.module``, a string in Zoho's v8 OAS
    # fields.json), whose own field metadata lists the rows' fields
    subform_module: str | None = None


@dataclass(slots=True)
class _Reply:
    status: int
    body: Any  # parsed JSON (dict/list) or None
    raw: bytes
    headers: Mapping[str, str]

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict):
            code = self.body.get("code")
            return str(code) if code is not None else None
        return None

    def describe(self) -> str:
        if isinstance(self.body, dict):
            code = self.body.get("code") or self.body.get("ERROR_CODE") or self.body.get("error")
            message = (
                self.body.get("message")
                or self.body.get("ERROR_MESSAGE")
                or self.body.get("x-error")
                or ""
            )
            return f"HTTP {self.status} {code}: {str(message)[:200]}"
        return f"HTTP {self.status}"


# ---- parsing helpers -----------------------------------------------------------------------


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        return None


def _coql_limit(query: str) -> int:
    """The row limit of a COQL query: ``limit n``, ``limit offset, n``, ``limit n offset m``;
    200 when absent (Zoho's default)."""
    m = re.search(r"\blimit\s+(\d+)(?:\s*,\s*(\d+))?", query, re.IGNORECASE)
    if not m:
        return 200
    return int(m.group(2) or m.group(1))


def _data(reply: _Reply) -> list[dict[str, Any]]:
    if reply.status == 204 or not isinstance(reply.body, dict):
        return []
    data = reply.body.get("data")
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _info(reply: _Reply) -> dict[str, Any]:
    """The ``info`` object of a paged read (``more_records``, ``next_page_token``…)."""
    info = reply.body.get("info") if isinstance(reply.body, dict) else None
    return info if isinstance(info, dict) else {}


def _remaining(headers: Mapping[str, str]) -> int | None:
    for name, value in headers.items():
        if name.lower() == "x-api-credits-remaining":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _retry_after(reply: _Reply) -> float | None:
    for name, value in reply.headers.items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    if isinstance(reply.body, dict):
        details = reply.body.get("details")
        if isinstance(details, dict) and details.get("retry_after") is not None:
            try:
                return float(details["retry_after"])
            except (TypeError, ValueError):
                return None
    return None


def _error_field(details: Mapping[str, Any]) -> str | None:
    name = details.get("api_name")
    if isinstance(name, str) and name:
        return name
    errors = details.get("errors")
    if isinstance(errors, list):
        for e in errors:
            inner = e.get("details") if isinstance(e, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("api_name"), str):
                return str(inner["api_name"])
    path = details.get("json_path")
    if isinstance(path, str):
        m = re.search(r"\.([A-Za-z0-9_]+)$", path)
        if m and not m.group(1).isdigit():
            return m.group(1)
    return None


def _record_results(reply: _Reply, n: int, api: str) -> list[RecordResult]:
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else "no"
        raise PermanentError(
            f"zoho {api}: expected {n} per-record results, got {got} ({reply.describe()})"
        )
    out: list[RecordResult] = []
    for i, item in enumerate(data):
        item = item if isinstance(item, dict) else {}
        raw_details = item.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        ok = str(item.get("status", "")).lower() == "success"
        action = item.get("action")
        record_id = details.get("id") if ok else None
        out.append(
            RecordResult(
                index=i,
                status="success" if ok else "error",
                code=str(item.get("code") or ("SUCCESS" if ok else "UNKNOWN")),
                message=str(item.get("message") or ""),
                field=None if ok else _error_field(details),
                id=str(record_id) if record_id is not None else None,
                action=action if action in ("insert", "update") else None,
                details=details,
            )
        )
    return out


def _lookup_module(lookup: Any) -> str | None:
    module = lookup.get("module") if isinstance(lookup, dict) else None
    name = module.get("api_name") if isinstance(module, dict) else None
    return str(name) if name else None


def _subform_module(subform: Any) -> str | None:
    module = subform.get("module") if isinstance(subform, dict) else None
    return module if isinstance(module, str) and module else None


def _field_meta(f: Mapping[str, Any]) -> FieldMeta:
    unique = f.get("unique")
    picklist = f.get("pick_list_values") or []
    length = f.get("length")
    return FieldMeta(
        api_name=str(f["api_name"]),
        data_type=str(f.get("data_type") or ""),
        json_type=f.get("json_type"),
        unique=bool(unique),  # {} / null / false = not unique
        mandatory=bool(f.get("system_mandatory") or f.get("required")),
        read_only=bool(f.get("read_only") or f.get("field_read_only")),
        length=int(length) if isinstance(length, int | str) and str(length).isdigit() else None,
        picklist_values=tuple(
            str(p.get("actual_value") or p.get("display_value"))
            for p in picklist
            if isinstance(p, dict)
        ),
        lookup_module=_lookup_module(f.get("lookup")),
        subform_module=_subform_module(f.get("subform")),
    )
