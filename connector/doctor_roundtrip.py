"""The round-trip checks of `connector doctor` (:mod:`connector.doctor`): one probe record written
(Upsert, and with ``--bulk`` Bulk Write), read back, compared value by value, and deleted."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from connector.config import PipelineConfig
from connector.doctor_report import Check, Status
from connector.errors import ConnectorError, DataError
from connector.mapping import RecordMapper
from connector.zoho import coql
from connector.zoho.bulk import build_bulk_zip, parse_result_zip
from connector.zoho.client import FieldMeta, ZohoClient

# ---- round trip -------------------------------------------------------------------------------


def probe_row(p: PipelineConfig, metas: list[FieldMeta], probe_key: str) -> dict[str, Any]:
    """A source row image with a value for every mapped field type (as ``to_jsonb`` gives)."""
    by_name = {m.api_name: m for m in metas}
    row: dict[str, Any] = {p.key_column: probe_key}
    for column, m in p.fields.items():
        meta = by_name.get(m.field)
        row[column] = _probe_value(m.type, meta)
    return row


def _probe_value(crm_type: str, meta: FieldMeta | None) -> Any:
    limit = meta.length if meta and meta.length else 255
    if crm_type == "picklist":
        values = [v for v in (meta.picklist_values if meta else ()) if v != "-None-"]
        return values[0] if values else "connector probe"
    if crm_type == "multiselectpicklist":
        values = [v for v in (meta.picklist_values if meta else ()) if v != "-None-"]
        return values[:2]
    samples: dict[str, Any] = {
        "text": "connector probe — ünïcødé ✓",
        "textarea": "connector probe\nsecond line — ünïcødé ✓",
        "email": "connector.probe@example.com",
        "phone": "+1 555 0100",
        "url": "https://example.com/connector-probe",
        "integer": 42,
        "bigint": "9007199254740993",
        "decimal": Decimal("1234.5"),
        "double": Decimal("1234.5"),
        "currency": Decimal("1234.56"),
        "percent": Decimal("12.5"),
        "boolean": True,
        "date": "2024-02-29",
        "datetime": "2024-02-29T13:45:30+05:30",
    }
    value = samples.get(crm_type, "connector probe")
    if isinstance(value, str) and crm_type in ("text", "textarea"):
        value = value[:limit]
    return value


def compare(crm_type: str, sent: Any, got: Any) -> str | None:
    """None when the CRM holds the value sent, else what differs (values are the probe's own)."""
    if sent is None:
        return None if got in (None, "") else f"expected empty, got {got!r}"
    try:
        if crm_type in ("integer", "bigint", "decimal", "double", "currency", "percent"):
            if got is None or Decimal(str(got)) != Decimal(str(sent)):
                return f"sent {sent}, read back {got!r}"
            return None
        if crm_type == "boolean":
            return None if got is sent or got == sent else f"sent {sent}, read back {got!r}"
        if crm_type == "datetime":
            a = datetime.fromisoformat(str(sent))
            b = datetime.fromisoformat(str(got))
            if a != b:
                return f"sent {sent}, read back {got!r} (a different instant)"
            return None
        if crm_type == "date":
            return None if str(got) == str(sent) else f"sent {sent}, read back {got!r}"
        if crm_type == "multiselectpicklist":
            return None if sorted(got or []) == sorted(sent) else f"sent {sent}, got {got!r}"
    except (InvalidOperation, ValueError, TypeError):
        return f"sent {sent!r}, read back {got!r} (not comparable)"
    return None if got == sent else f"sent {sent!r}, read back {got!r}"


async def roundtrip_checks(
    client: ZohoClient,
    p: PipelineConfig,
    metas: list[FieldMeta],
    *,
    probe_key: str,
    bulk: bool,
    naive_timezone: tzinfo = UTC,
) -> list[Check]:
    out: list[Check] = []
    if any(m.type == "lookup" for m in p.fields.values()):
        # a probe record would need a real parent record to point to (parents first)
        return [
            Check(
                "roundtrip",
                "upsert",
                "skip",
                "round trip not run for a pipeline with lookup fields: a probe record would"
                " need a parent record in the CRM; `connector verify` checks its lookups",
                "",
                p.name,
            )
        ]
    mapper = RecordMapper(p, naive_timezone=naive_timezone)
    row = probe_row(p, metas, probe_key)
    try:
        record = mapper.to_json(row)
    except DataError as exc:
        return [
            Check("roundtrip", "upsert", "fail", f"probe row not convertible: {exc}", "", p.name)
        ]
    out.append(await _upsert_roundtrip(client, p, mapper, record, probe_key))
    if bulk:
        out.append(await _bulk_roundtrip(client, p, mapper, row, record, probe_key))
    else:
        out.append(
            Check(
                "roundtrip",
                "bulk",
                "skip",
                "Bulk Write round trip not run (costs one bulk job, 500 credits): add --bulk",
                "",
                p.name,
            )
        )
    return out


async def _find(client: ZohoClient, p: PipelineConfig, probe_key: str) -> dict[str, Any] | None:
    fields = ["id", p.key_field, *[m.field for m in p.fields.values()]]
    rows = await client.coql(
        coql.select(p.module, fields, where=coql.equals(p.key_field, probe_key), limit=1)
    )
    return rows[0] if rows else None


def _differences(p: PipelineConfig, record: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    out = []
    for m in p.fields.values():
        diff = compare(m.type, record.get(m.field), got.get(m.field))
        if diff:
            out.append(f"{m.field} ({m.type}): {diff}")
    return out


async def _upsert_roundtrip(
    client: ZohoClient,
    p: PipelineConfig,
    mapper: RecordMapper,
    record: dict[str, Any],
    probe_key: str,
) -> Check:
    def check(status: Status, detail: str, fix: str = "") -> Check:
        return Check("roundtrip", "upsert", status, detail, fix, p.name)

    try:
        results = await client.upsert(p.module, [record], duplicate_check_fields=[p.key_field])
    except ConnectorError as exc:
        return check("fail", f"probe upsert failed: {exc}", "see the message; check the scopes")
    res = results[0]
    if not res.ok:
        return check(
            "fail",
            f"the CRM rejected the probe record: {res.code} on {res.field or '?'}: {res.message}",
            f"fix the mapping of {res.field or 'the field'} (pipelines[{p.name!r}].fields)",
        )
    try:
        got = await _find(client, p, probe_key)
        if got is None:
            return check("fail", "the probe record was written but cannot be read back by key")
        diffs = _differences(p, record, got)
    except coql.CoqlValueError as exc:
        return check("fail", f"the probe key cannot be read back: {exc}", "choose --probe-key")
    finally:
        if res.id:
            with contextlib.suppress(ConnectorError):
                await client.delete(p.module, [res.id])
    if diffs:
        return check(
            "fail",
            "the CRM holds different values: " + "; ".join(diffs),
            "check the field types in the mapping and the org's time zone/currency settings",
        )
    types = ", ".join(sorted({m.type for m in p.fields.values()}))
    return check(
        "ok",
        f"probe record written by Upsert, read back equal on {len(p.fields)} field"
        f"{'s' if len(p.fields) != 1 else ''} ({types}), "
        "deleted",
    )


async def _bulk_roundtrip(  # noqa: PLR0917
    client: ZohoClient,
    p: PipelineConfig,
    mapper: RecordMapper,
    row: dict[str, Any],
    record: dict[str, Any],
    probe_key: str,
) -> Check:
    def check(status: Status, detail: str, fix: str = "") -> Check:
        return Check("roundtrip", "bulk", status, detail, fix, p.name)

    try:
        zipped = build_bulk_zip(mapper.csv_header(), [mapper.to_csv_values(row)])
        file_id = await client.upload_bulk_file(zipped)
        job_id = await client.create_bulk_job(
            p.module,
            file_id,
            operation="upsert",
            find_by=p.key_field,
            field_mappings=mapper.field_mappings(),
        )
        job = await client.wait_bulk_job(job_id, poll_initial=1.0, poll_max=10.0, timeout=900)
    except (ConnectorError, DataError) as exc:
        return check(
            "fail",
            f"bulk write of the probe failed: {exc}",
            "check ZohoCRM.bulk.ALL "
            "and ZohoFiles.files.ALL scopes and the upload host (crm.data_centre)",
        )
    if str(job.status) != "COMPLETED":
        return check("fail", f"bulk job {job_id} ended {job.status}")
    try:
        results = parse_result_zip(await client.download_bulk_result(job), p.key_field)
    except ConnectorError as exc:
        return check("fail", f"cannot download the bulk result: {exc}")
    errors = [r for r in results if not r.ok]
    record_id: str | None = None
    with contextlib.suppress(ConnectorError):
        got = await _find(client, p, probe_key)
        record_id = str(got["id"]) if got else None
    try:
        if errors:
            r = errors[0]
            return check(
                "fail",
                f"the CRM rejected the probe row in the bulk file: {r.code} on "
                f"{r.field or '?'}: {r.message}",
                "a date/time format this org refuses: see docs/zoho-client.md (bulk formats)",
            )
        if got is None:
            return check("fail", "the bulk job completed but the probe cannot be read back")
        diffs = _differences(p, record, got)
        if diffs:
            return check(
                "fail",
                "the CRM holds different values after Bulk Write: " + "; ".join(diffs),
                "the bulk CSV date/time format or time zone differs from the org's: see "
                "docs/zoho-client.md",
            )
        return check("ok", f"probe written by Bulk Write (job {job_id}), read back equal, deleted")
    finally:
        if record_id:
            with contextlib.suppress(ConnectorError):
                await client.delete(p.module, [record_id])
