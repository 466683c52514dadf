"""Bulk write: upload parsing, job creation checks, row processing on the emulator clock,
result files and callbacks."""

from __future__ import annotations

import csv
import gc
import io
import re
import zipfile
from typing import Any

from connector.emulator.bulk_csv import (
    ALLOWED_DATE_FORMATS,
    ALLOWED_DATETIME_FORMATS,
    Converter,
    make_csv_converter,
)
from connector.emulator.config import FieldSpec
from connector.emulator.records import FieldError, ModuleStore
from connector.emulator.state import ApiError, BulkJob, EmulatorState, Upload
from connector.emulator.validate import BAD


def parse_upload(state: EmulatorState, zip_name: str, payload: bytes) -> Upload:
    cfg = state.config.bulk
    if len(payload) > cfg.max_zip_bytes:
        raise ApiError(413, "FILE_TOO_LARGE", "File size too large to process", {})
    try:
        zf = zipfile.ZipFile(io.BytesIO(payload))
        names = [n for n in zf.namelist() if not n.endswith("/")]
    except zipfile.BadZipFile:
        raise ApiError(
            400, "INVALID_FILE_FORMAT", "invalid file format. only zip format is supported", {}
        ) from None
    csvs = [n for n in names if n.lower().endswith(".csv")]
    if len(names) != 1 or len(csvs) != 1:
        raise ApiError(400, "FILE_NOT_SUPPORTED", "File not supported for bulk write", {})
    raw = zf.read(csvs[0])
    text = raw.decode("utf-8-sig")
    first = text.split("\n", 1)[0]
    delimiter = max(",;:|", key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ApiError(400, "FILE_NOT_SUPPORTED", "File not supported for bulk write", {}) from None
    if len(header) > cfg.max_columns:
        raise ApiError(
            400,
            "HEADER_LIMIT_EXCEEDED",
            "File not supported for bulk write",
            {"limit": cfg.max_columns},
        )
    rows = [r for r in reader if r]
    if len(rows) > cfg.max_rows:
        raise ApiError(
            400, "LIMIT_EXCEEDED", "File not supported for bulk write", {"limit": cfg.max_rows}
        )
    now = state.clock.now()
    return Upload(
        file_id=str(next(state.file_ids)),
        zip_name=zip_name,
        csv_name=csvs[0],
        header=header,
        rows=rows,
        created_at=now,
        created_time=state.clock.iso(now),
    )


# -- job creation ------------------------------------------------------------------------------
def _missing_key(key: str, path: str) -> ApiError:
    return ApiError(
        400,
        "MISSING_REQUIRED_KEY",
        f"required key {key} is not found in request body.",
        {"json_path": path},
    )


def create_job(state: EmulatorState, body: Any) -> BulkJob:
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_DATA", "invalid data", {})
    op = body.get("operation")
    if op is None:
        raise _missing_key("operation", "$.operation")
    if op not in ("insert", "update", "upsert"):
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": "operation", "json_path": "$.operation"},
        )
    callback = body.get("callback")
    if callback is not None:
        if not isinstance(callback, dict) or "url" not in callback:
            raise _missing_key("url", "$.callback.url")
        if str(callback.get("method", "")).lower() != "post":
            raise ApiError(
                400,
                "INVALID_CALLBACK_METHOD",
                "the callback method is invalid",
                {"supported_callback_methods": ["post"]},
            )
        url = str(callback["url"])
        if not re.match(r"^https?://[^\s/]+", url):
            raise ApiError(
                400,
                "INVALID_CALLBACK_URL",
                "the callback url is invalid",
                {"api_name": "url", "json_path": "$.callback.url"},
            )
    resources = body.get("resource")
    if not isinstance(resources, list) or not resources:
        raise _missing_key("resource", "$.resource")
    res = resources[0]
    if not isinstance(res, dict):
        raise _missing_key("resource", "$.resource[0]")
    module = (
        (res.get("module") or {}).get("api_name") if isinstance(res.get("module"), dict) else None
    )
    if module is None:
        raise _missing_key("module", "$.resource[0].module")
    if module not in state.stores:
        raise ApiError(
            400,
            "MODULE_NOT_AVAILABLE",
            f"Requested module '{module}' is not available.",
            {"resource_path_index": 0},
        )
    store = state.stores[module]
    file_id = res.get("file_id")
    if file_id is None:
        raise _missing_key("file_id", "$.resource[0].file_id")
    upload = state.uploads.get(str(file_id))
    if upload is None:
        raise ApiError(400, "INVALID_FILE_ID", "improper file id", {"file_id": str(file_id)})
    find_by = res.get("find_by")
    if op in ("update", "upsert") and not find_by:
        raise ApiError(
            400,
            "MANDATORY_NOT_FOUND",
            "Required key find_by is not available",
            {"api_name": "find_by", "json_path": "$.resource[0].find_by"},
        )
    if (
        find_by is not None
        and find_by != "id"
        and (find_by not in store.m.fields or (op != "insert" and find_by not in store.index))
    ):
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": "find_by", "json_path": "$.resource[0].find_by"},
        )
    mappings = res.get("field_mappings")
    if mappings is None:
        mappings = [
            {"api_name": name, "index": i}
            for i, name in enumerate(upload.header)
            if name in store.m.fields
        ]
    if not isinstance(mappings, list):
        raise ApiError(400, "INVALID_DATA", "invalid data", {"api_name": "field_mappings"})
    if len(mappings) > state.config.bulk.max_columns:
        raise ApiError(
            400,
            "HEADER_LIMIT_EXCEEDED",
            "File not supported for bulk write",
            {"limit": state.config.bulk.max_columns},
        )
    clean_maps: list[dict[str, Any]] = []
    for i, m in enumerate(mappings):
        name = m.get("api_name") if isinstance(m, dict) else None
        if name is None or name not in store.m.fields:
            raise ApiError(
                400,
                "INVALID_FIELD",
                f"invalid mapping. invalid api_name {name}.",
                {"api_name": str(name), "json_path": f"$.resource[0].field_mappings[{i}]"},
            )
        if "index" not in m and "default_value" not in m:
            raise ApiError(
                400,
                "MISSING_REQUIRED_KEY",
                f"required key index for field {name} is not found in request body.",
                {"json_path": f"$.resource[0].field_mappings[{i}].index"},
            )
        index = m.get("index")
        if index is not None and (
            not isinstance(index, int) or index < 0 or index >= len(upload.header)
        ):
            raise ApiError(
                400,
                "COLUMN_INDEX_NOT_FOUND",
                "the column index is not found in the file",
                {"api_name": name, "index": index if isinstance(index, int) else -1},
            )
        fmt = m.get("format")
        data_type = store.m.fields[name].data_type
        allowed = {"date": ALLOWED_DATE_FORMATS, "datetime": ALLOWED_DATETIME_FORMATS}
        if fmt is not None and data_type in allowed and fmt not in allowed[data_type]:
            # INVALID_FORMAT is in the create-job error list (reference §3.2); its message and
            # details are not documented
            raise ApiError(
                400,
                "INVALID_FORMAT",
                f"the format {fmt} is not supported for the field {name}",
                {"api_name": name, "json_path": f"$.resource[0].field_mappings[{i}].format"},
            )
        _check_relation_mapping(state, store.m.fields[name], m, i)
        clean_maps.append(
            {
                "api_name": name,
                "index": index,
                "format": fmt,
                "find_by": m.get("find_by"),
                "default_value": m.get("default_value"),
            }
        )
    mapped = {m["api_name"] for m in clean_maps}
    if op in {"insert", "upsert"}:
        missing = [n for n in store.m.mandatory if n not in mapped]
        if missing:
            raise ApiError(
                400,
                "MANDATORY_FIELDS_NOT_MAPPED",
                "All mandatory fields are not mapped for the layout",
                {"api_name": missing[0], "json_path": "$.resource[0].field_mappings"},
            )
    if find_by and find_by != "id" and find_by not in mapped:
        raise ApiError(
            400,
            "MANDATORY_NOT_FOUND",
            "Required key find_by is not available",
            {"api_name": find_by, "json_path": "$.resource[0].field_mappings"},
        )
    ignore_empty = bool(res.get("ignore_empty", body.get("ignore_empty", False)))
    faults = state.faults
    will_fail = False
    if faults.bulk_fail_next > 0:
        faults.bulk_fail_next -= 1
        will_fail = True
    elif faults.config.bulk_fail_rate > 0 and faults.rng.random() < faults.config.bulk_fail_rate:
        will_fail = True
    now = state.clock.now()
    return BulkJob(
        id=str(next(state.job_ids)),
        operation=op,
        module=module,
        file_id=upload.file_id,
        file_name=upload.csv_name,
        find_by=find_by,
        mappings=clean_maps,
        ignore_empty=ignore_empty,
        callback={"url": str(callback["url"]), "method": "post"} if callback else None,
        character_encoding=str(body.get("character_encoding") or "UTF-8"),
        created_at=now,
        created_time=state.clock.iso(now),
        rows=upload.rows,
        header=upload.header,
        will_fail=will_fail,
    )


def _check_relation_mapping(
    state: EmulatorState, spec: FieldSpec, mapping: dict[str, Any], i: int
) -> None:
    """A lookup column needs ``find_by``: ``id`` or a unique (or system duplicate-check) field
    of the target module, "how to resolve a lookup (e.g. ``id``, ``Account_Name``, ``email``
    for users)" (Bulk Write create-job ``field_mappings[].find_by``, zoho-crm-api.md §3.2 and
    §6.2). Without it, or naming a field that cannot find one record, Zoho's behaviour is not
    documented: the job is refused (INVALID_DATA, fail safe) rather than guessing.

    A subform column is a parent+child import (a zip of several CSVs linked by
    ``parent_column_index``, zoho-crm-api.md §3.2): not modelled, refused (fail safe). So is a
    ``default_value`` on a lookup column (how Zoho resolves it is not documented)."""
    path = f"$.resource[0].field_mappings[{i}]"
    find_by = mapping.get("find_by")
    if spec.data_type == "subform":
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": spec.api_name, "json_path": path, "reason": "subform import not modelled"},
        )
    if spec.data_type != "lookup":
        return
    if mapping.get("default_value") is not None:
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": spec.api_name, "json_path": f"{path}.default_value"},
        )
    target = state.stores[spec.lookup_module or ""]
    if not isinstance(find_by, str) or (find_by != "id" and find_by not in target.index):
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": spec.api_name, "json_path": f"{path}.find_by"},
        )


def _lookup_converter(
    state: EmulatorState, job_module: str, spec: FieldSpec, find_by: str
) -> Converter:
    """A lookup cell: the target record found by ``find_by`` when the row is processed, else
    BAD (the row is skipped with ``INVALID_DATA-<field>``; the code Zoho writes for an
    unresolved lookup is not documented, UNCONFIRMED; a dangling lookup is never stored)."""
    store = state.stores[job_module]
    target = state.stores[spec.lookup_module or ""]

    def convert(cell: str) -> Any:
        rid = target.find(find_by, cell)
        value = store.lookup_value(spec, rid) if rid is not None else None
        return BAD if value is None else value

    return convert


# -- processing --------------------------------------------------------------------------------
class RowProcessor:
    """Turns rows into record writes on the same `ModuleStore` (indexes, uniqueness, history)
    as the JSON API, with the same checks; values are converted and checked in one pass."""

    def __init__(self, state: EmulatorState, job: BulkJob) -> None:
        self.job = job
        self.store: ModuleStore = state.stores[job.module]
        m = self.store.m
        self.plan: list[tuple[str, int, Converter, Any, bool]] = []
        self.defaults: list[tuple[str, Any]] = []
        for mp in job.mappings:
            spec = m.fields[mp["api_name"]]
            dv = mp.get("default_value")
            default = dv.get("value") if isinstance(dv, dict) else None
            if mp["index"] is None:
                self.defaults.append((mp["api_name"], default))
                continue
            if spec.data_type == "lookup":
                conv = _lookup_converter(state, job.module, spec, mp["find_by"])
            else:
                conv = make_csv_converter(spec, mp.get("format"), state, m.checkers[mp["api_name"]])
            self.plan.append((mp["api_name"], mp["index"], conv, default, spec.mandatory))
        fc = state.faults.config
        self.faults = state.faults
        self.skip_field = fc.skip_rows_field
        self.skip_re = re.compile(fc.skip_rows_pattern) if fc.skip_rows_pattern else None
        self.ignore_empty = job.ignore_empty
        self.operation = job.operation
        self.find_by = job.find_by
        self.find_idx = self.store.index.get(job.find_by) if job.find_by else None
        self.mapped_mandatory = [n for n in m.mandatory if n in {p[0] for p in self.plan}]
        self.unmapped_mandatory = [
            n
            for n in m.mandatory
            if n not in {p[0] for p in self.plan} | {d[0] for d in self.defaults}
        ]

    def _find(self, value: Any) -> str | None:
        if value is None or value == "":
            return None
        if self.find_idx is not None:
            ids = self.find_idx.get(value.casefold() if value.__class__ is str else value)
            return min(ids) if ids else None
        assert self.find_by is not None
        return self.store.find(self.find_by, value)

    def process(self, row: list[str]) -> tuple[str, str, str]:
        if self.faults.unprocessed_rows_next > 0:
            self.faults.unprocessed_rows_next -= 1
            return ("UNPROCESSED", "", "")
        clean: dict[str, Any] = {}
        errors: list[FieldError] = []
        ignore_empty = self.ignore_empty
        width = len(row)
        for name, index, conv, default, mandatory in self.plan:
            cell = row[index] if index < width else ""
            if cell == "":
                if default is not None:
                    bad = self.store.m.checkers[name](default)
                    if bad is None:
                        clean[name] = default
                    else:
                        errors.append(("INVALID_DATA", name, bad))
                elif mandatory:
                    errors.append(("MANDATORY_NOT_FOUND", name, {}))
                elif not ignore_empty:
                    clean[name] = None
                continue
            value = conv(cell)
            if value is BAD:
                errors.append(("INVALID_DATA", name, {}))
            else:
                clean[name] = value
        for name, default in self.defaults:
            if default is not None:
                clean[name] = default
        if self.skip_re is not None and self.skip_field is not None:
            v = clean.get(self.skip_field)
            if v is not None and self.skip_re.search(str(v)):
                return ("SKIPPED", "", f"CANNOT_PROCESS-{self.skip_field}")
        store = self.store
        op = self.operation
        rid = self._find(clean.get(self.find_by)) if self.find_by else None
        if op == "insert" and rid is not None:
            return ("SKIPPED", "", f"DUPLICATE_DATA-{self.find_by}")
        if op == "update" and rid is None:
            return ("SKIPPED", "", f"RESOURCE_NOT_FOUND-{self.find_by}")
        if rid is None:
            for name in self.unmapped_mandatory:
                errors.append(("MANDATORY_NOT_FOUND", name, {}))
        if errors:
            return ("SKIPPED", "", format_errors(errors))
        if store.m.unique:
            dups = store.duplicates(clean, rid)
            if dups:
                return ("SKIPPED", "", format_errors(dups))
        if rid is None:
            res = store.apply_insert(clean, "bulk")
            return ("ADDED", res.record_id or "", "")
        if store.locked(rid):  # result-file code per the JSON API's (UNCONFIRMED for bulk)
            return ("SKIPPED", "", f"RECORD_LOCKED-{self.find_by}")
        store.apply_update(rid, store.records[rid], clean, "bulk")
        return ("UPDATED", rid, "")


def format_errors(errors: list[FieldError]) -> str:
    """``CODE-field1,field2:CODE2-field3`` (reference §3.4)."""
    by_code: dict[str, list[str]] = {}
    for code, name, _ in errors:
        by_code.setdefault(code, [])
        if name not in by_code[code]:
            by_code[code].append(name)
    return ":".join(f"{code}-{','.join(names)}" for code, names in by_code.items())


def step_job(state: EmulatorState, job: BulkJob) -> bool:
    """Bring a job up to the emulator clock. Returns True when it finished during this step."""
    if job.done:
        return False
    cfg = state.config.bulk
    now = state.clock.now()
    start = job.created_at + cfg.queue_seconds
    if now < start:
        return False
    total = len(job.rows)
    if job.will_fail:
        job.status = "FAILED"
        job.completed_at = start  # on the emulator clock: when processing began
        return True
    rate = cfg.rows_per_second
    target = total if rate <= 0 else min(total, int((now - start) * rate))
    if target > job.processed:
        proc = RowProcessor(state, job)
        results = job.results
        # The rows allocate many small dicts that all stay alive; pausing the cyclic collector
        # for the batch avoids full-heap scans that would dominate the cost.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for i in range(job.processed, target):
                r = proc.process(job.rows[i])
                results.append(r)
                s = r[0]
                if s == "ADDED":
                    job.added += 1
                elif s == "UPDATED":
                    job.updated += 1
                elif s == "UNPROCESSED":
                    pass
                else:
                    job.skipped += 1
        finally:
            if gc_was_enabled:
                gc.enable()
        job.processed = target
    if job.processed >= total:
        job.status = "COMPLETED"
        # when the job ended on the emulator clock (not when it was looked at): the result
        # link and the job expire counted from there
        job.completed_at = min(now, start + (total / rate if rate > 0 else 0.0))
        job.result_zip = build_result_zip(job, cfg.result_statuses)
        return True
    job.status = "INPROGRESS"
    return False


def build_result_zip(job: BulkJob, statuses: dict[str, str] | None = None) -> bytes:
    cols = sorted({m["index"] for m in job.mappings if m["index"] is not None})[:3]
    spell = statuses or {}
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*(job.header[c] for c in cols), "STATUS", "RECORD_ID", "ERRORS"])
    for row, (status, rid, errors) in zip(job.rows, job.results, strict=True):
        w.writerow(
            [
                *((row[c] if c < len(row) else "") for c in cols),
                spell.get(status, status),
                rid,
                errors,
            ]
        )
    buf = io.BytesIO()
    base = job.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(f"{job.module}-{base}.csv", out.getvalue())
    return buf.getvalue()


def job_details(state: EmulatorState, job: BulkJob) -> dict[str, Any]:
    cfg = state.config.bulk
    job_status = cfg.in_progress_status if job.status == "INPROGRESS" else job.status
    res_status = "IN PROGRESS" if job.status == "INPROGRESS" else job.status
    mappings = []
    for m in job.mappings:
        mappings.append({k: v for k, v in m.items() if v is not None})
    spec = state.stores[job.module].m.spec
    resource: dict[str, Any] = {
        "status": res_status,
        "type": "data",
        "code": {
            "ADDED": "ADDED",
            "INPROGRESS": "INPROGRESS",
            "COMPLETED": "SUCCESS",
            "FAILED": "FAILED",
        }[job.status],
        "module": {"api_name": job.module, "id": spec.id or ""},
        "field_mappings": mappings,
        "file": {
            "status": res_status,
            "name": job.file_name,
            "added_count": job.added,
            "skipped_count": job.skipped,
            "updated_count": job.updated,
            "total_count": len(job.rows),
        },
    }
    if job.find_by:
        resource["find_by"] = job.find_by
    resource["ignore_empty"] = job.ignore_empty
    out: dict[str, Any] = {
        "status": job_status,
        "character_encoding": job.character_encoding,
        "resource": [resource],
        "id": job.id,
        "created_by": {"id": state.config.user.id, "name": state.config.user.name},
        "operation": job.operation,
        "created_time": job.created_time,
    }
    if job.callback:
        out["callback"] = job.callback
    if job.status == "COMPLETED":
        out["result"] = {"download_url": download_url(state, job)}
    return out


def download_url(state: EmulatorState, job: BulkJob) -> str:
    return f"{state.download_url}/v8/crm/{state.config.org_id}/bulk-write/{job.id}/{job.id}.zip"
