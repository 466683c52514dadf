"""Bulk write: upload parsing, job creation checks, row processing on the emulator clock,
result files and callbacks."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Callable
from datetime import datetime
from typing import Any

from connector.emulator.records import FieldError, ModuleStore
from connector.emulator.state import ApiError, BulkJob, EmulatorState, Upload

DEFAULT_DATE_FORMAT = "MM/dd/yyyy"
DEFAULT_DATETIME_FORMAT = "MM/dd/yyyy HH:mm:ss"
_JAVA_TOKENS = [
    ("yyyy", "%Y"),
    ("MMM", "%b"),
    ("MM", "%m"),
    ("dd", "%d"),
    ("HH", "%H"),
    ("mm", "%M"),
    ("ss", "%S"),
    ("SSS", "%f"),
    ("XXX", "%z"),
    ("Z", "%z"),
]
_INT_RE = re.compile(r"^-?\d+$")
_NUM_RE = re.compile(r"^-?\d+(\.\d+)?$")


def java_to_strptime(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "'":
            j = pattern.index("'", i + 1)
            out.append(pattern[i + 1 : j])
            i = j + 1
            continue
        for java, py in _JAVA_TOKENS:
            if pattern.startswith(java, i):
                out.append(py)
                i += len(java)
                break
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


class _Bad(Exception):
    pass


Converter = Callable[[str], Any]


def make_csv_converter(data_type: str, fmt: str | None, state: EmulatorState) -> Converter:
    """A function turning one CSV cell into the JSON value the record API would take."""
    tz = state.clock.tz
    if data_type in ("text", "textarea", "email", "phone", "website", "picklist"):
        return str
    if data_type == "multiselectpicklist":
        return lambda s: [x for x in s.split(";") if x]
    if data_type == "integer":

        def to_int(s: str) -> int:
            if not _INT_RE.match(s):
                raise _Bad
            return int(s)

        return to_int
    if data_type == "bigint":

        def to_long(s: str) -> str:
            if not _INT_RE.match(s):
                raise _Bad
            return s

        return to_long
    if data_type in ("double", "currency", "decimal", "percent"):

        def to_num(s: str) -> float | int:
            if not _NUM_RE.match(s):
                raise _Bad
            return float(s) if "." in s else int(s)

        return to_num
    if data_type == "boolean":

        def to_bool(s: str) -> bool:
            low = s.lower()
            if low == "true":
                return True
            if low == "false":
                return False
            raise _Bad

        return to_bool
    if data_type == "date":
        py = java_to_strptime(fmt or DEFAULT_DATE_FORMAT)

        def to_date(s: str) -> str:
            try:
                return datetime.strptime(s, py).date().isoformat()
            except ValueError:
                raise _Bad from None

        return to_date
    if data_type == "datetime":
        py_dt = java_to_strptime(fmt or DEFAULT_DATETIME_FORMAT)

        def to_datetime(s: str) -> str:
            try:
                d = datetime.strptime(s, py_dt)
            except ValueError:
                raise _Bad from None
            if d.tzinfo is None:
                d = d.replace(tzinfo=tz)  # offset-less: read in the job creator's zone
            return d.replace(microsecond=0).isoformat()

        return to_datetime
    raise ValueError(data_type)  # pragma: no cover


# -- upload ------------------------------------------------------------------------------------
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
        clean_maps.append(
            {
                "api_name": name,
                "index": index,
                "format": m.get("format"),
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


# -- processing --------------------------------------------------------------------------------
class RowProcessor:
    """Turns rows into record writes through the same `ModuleStore` as the JSON API."""

    def __init__(self, state: EmulatorState, job: BulkJob) -> None:
        self.job = job
        self.store: ModuleStore = state.stores[job.module]
        fields = self.store.m.fields
        self.plan: list[tuple[str, int | None, Converter, Any]] = []
        for m in job.mappings:
            spec = fields[m["api_name"]]
            dv = m.get("default_value")
            default = dv.get("value") if isinstance(dv, dict) else None
            self.plan.append(
                (
                    m["api_name"],
                    m["index"],
                    make_csv_converter(spec.data_type, m.get("format"), state),
                    default,
                )
            )
        fc = state.faults.config
        self.skip_field = fc.skip_rows_field
        self.skip_re = re.compile(fc.skip_rows_pattern) if fc.skip_rows_pattern else None

    def process(self, row: list[str]) -> tuple[str, str, str]:
        data: dict[str, Any] = {}
        conv_errors: list[FieldError] = []
        ignore_empty = self.job.ignore_empty
        width = len(row)
        for name, index, conv, default in self.plan:
            cell = row[index] if index is not None and index < width else ""
            if cell == "":
                if default is not None:
                    data[name] = default
                elif not ignore_empty:
                    data[name] = None
                continue
            try:
                data[name] = conv(cell)
            except _Bad:
                conv_errors.append(("INVALID_DATA", name, {}))
        if self.skip_re is not None and self.skip_field is not None:
            v = data.get(self.skip_field)
            if v is not None and self.skip_re.search(str(v)):
                return ("SKIPPED", "", f"CANNOT_PROCESS-{self.skip_field}")
        store = self.store
        op = self.job.operation
        find_by = self.job.find_by
        if op == "insert":
            if find_by and store.find(find_by, data.get(find_by)) is not None:
                return ("SKIPPED", "", f"DUPLICATE_DATA-{find_by}")
            res = store.insert(data, "bulk", conv_errors)
        elif op == "update":
            assert find_by is not None
            rid = store.find(find_by, data.get(find_by))
            if rid is None:
                return ("SKIPPED", "", f"RESOURCE_NOT_FOUND-{find_by}")
            res = store.update(rid, data, "bulk", conv_errors)
        else:
            assert find_by is not None
            rid = store.find(find_by, data.get(find_by))
            if rid is None:
                res = store.insert(data, "bulk", conv_errors)
            else:
                res = store.update(rid, data, "bulk", conv_errors)
        if res.ok:
            return ("ADDED" if res.action == "insert" else "UPDATED", res.record_id or "", "")
        if res.code is not None:
            return ("SKIPPED", "", f"{res.code}-{find_by or 'id'}")
        return ("SKIPPED", "", format_errors(res.errors))


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
        job.completed_at = now
        return True
    rate = cfg.rows_per_second
    target = total if rate <= 0 else min(total, int((now - start) * rate))
    if target > job.processed:
        proc = RowProcessor(state, job)
        results = job.results
        for i in range(job.processed, target):
            r = proc.process(job.rows[i])
            results.append(r)
            s = r[0]
            if s == "ADDED":
                job.added += 1
            elif s == "UPDATED":
                job.updated += 1
            else:
                job.skipped += 1
        job.processed = target
    if job.processed >= total:
        job.status = "COMPLETED"
        job.completed_at = now
        job.result_zip = build_result_zip(job)
        return True
    job.status = "INPROGRESS"
    return False


def build_result_zip(job: BulkJob) -> bytes:
    cols = sorted({m["index"] for m in job.mappings if m["index"] is not None})[:3]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*(job.header[c] for c in cols), "STATUS", "RECORD_ID", "ERRORS"])
    for row, (status, rid, errors) in zip(job.rows, job.results, strict=True):
        w.writerow([*((row[c] if c < len(row) else "") for c in cols), status, rid, errors])
    buf = io.BytesIO()
    base = job.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
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
