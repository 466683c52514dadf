"""Module metadata compiled for fast validation, and the record store with its unique indexes
and per-record write history. The JSON API and bulk write both go through `ModuleStore`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from connector.emulator.clock import Clock
from connector.emulator.config import FieldSpec, ModuleSpec
from connector.emulator.validate import Checker, make_checker

MESSAGES: dict[str, str] = {
    "INVALID_DATA": "invalid data",
    "MANDATORY_NOT_FOUND": "required field not found",
    "DUPLICATE_DATA": "duplicate data",
    "RESOURCE_NOT_FOUND": "The requested resource doesn't exist.",
    "CANNOT_PROCESS": "the record cannot be processed",
    # the code is in Zoho's record error enum (crm-oas v8.0 record.json); the message text is
    # not documented (UNCONFIRMED)
    "RECORD_LOCKED": "the record is locked",
}

ID_RE = re.compile(r"^[0-9]{1,19}$")

#: key of a FieldError's details that replaces the code's usual message (popped by the API)
MESSAGE_KEY = "__message__"
#: INVALID_DATA for a lookup id that is not a record of the target module, and for a subform
#: row id that is not a row of the record: "the id given seems to be invalid" is Zoho's message
#: for INVALID_DATA on an id (crm-oas v8.0 record.json, the record error ``message`` enum).
#: Which message Zoho pairs with a *lookup* id is not documented in prose (UNCONFIRMED).
INVALID_ID = "the id given seems to be invalid"

# Automations a record write can run (``trigger`` of Insert/Update/Upsert Records, v8:
# zoho-crm-api.md §2.2, crm-oas v8.0 createRecords/upsert enums). Omitting ``trigger`` runs all
# of them; ``[]`` runs none. Delete Records takes ``wf_trigger`` (workflow only).
ALL_TRIGGERS = ("workflow", "approval", "blueprint", "pathfinder", "orchestration")

SYSTEM_FIELDS = frozenset(
    {"id", "Created_Time", "Modified_Time", "Created_By", "Modified_By", "$approval_state"}
)

# An error found on one value: (code, api_name, extra details).
FieldError = tuple[str, str, dict[str, Any]]


def index_key(value: Any) -> Any:
    """Uniqueness is case-insensitive for strings (emulator choice, see docs/emulator.md)."""
    if isinstance(value, str):
        return value.casefold()
    return value


@dataclass
class CompiledModule:
    spec: ModuleSpec
    fields: dict[str, FieldSpec]
    checkers: dict[str, Checker]
    mandatory: list[str]
    unique: list[str]
    dup_check: list[str]  # system duplicate-check fields that exist in the module

    @classmethod
    def build(cls, spec: ModuleSpec, strict_picklists: bool, max_len_str: bool) -> CompiledModule:
        fields = {f.api_name: f for f in spec.fields}
        return cls(
            spec=spec,
            fields=fields,
            checkers={
                f.api_name: make_checker(f, strict_picklists, max_len_str) for f in spec.fields
            },
            mandatory=[f.api_name for f in spec.fields if f.mandatory],
            unique=[f.api_name for f in spec.fields if f.unique],
            dup_check=[n for n in spec.system_duplicate_check_fields if n in fields],
        )

    def check_values(
        self, data: dict[str, Any], creating: bool
    ) -> tuple[dict[str, Any], list[FieldError]]:
        """Validate one record's values; returns the accepted values and every error found."""
        errors: list[FieldError] = []
        clean: dict[str, Any] = {}
        checkers = self.checkers
        for name, value in data.items():
            chk = checkers.get(name)
            if chk is None:
                continue  # unknown and system fields are ignored, as Zoho does
            if value is None or value == "":
                if name in self.mandatory:
                    errors.append(("MANDATORY_NOT_FOUND", name, {}))
                    continue
                clean[name] = None
                continue
            bad = chk(value)
            if bad is None:
                clean[name] = value
            else:
                errors.append(("INVALID_DATA", name, bad))
        if creating:
            for name in self.mandatory:
                if name not in data:
                    errors.append(("MANDATORY_NOT_FOUND", name, {}))
        return clean, errors


@dataclass
class WriteResult:
    ok: bool
    record_id: str | None = None
    action: str | None = None  # insert / update / delete
    duplicate_field: str | None = None
    errors: list[FieldError] = field(default_factory=list)
    code: str | None = None  # record-level error code when not a field error
    details: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    created_time: str | None = None
    modified_time: str | None = None


class ModuleStore:
    """Records of one module: a dict keyed by id, an index per unique / duplicate-check field,
    and the full history of every write."""

    def __init__(
        self, compiled: CompiledModule, clock: Clock, ids: count[int], user: dict[str, str]
    ) -> None:
        self.m = compiled
        self.clock = clock
        self.ids = ids
        self.user = user
        self.records: dict[str, dict[str, Any]] = {}
        self.deleted: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.index: dict[str, dict[Any, set[str]]] = {
            n: {} for n in dict.fromkeys([*compiled.unique, *compiled.dup_check])
        }
        # the automations the current write request asked for, copied into each history entry
        # (None: the API has no such option, e.g. Bulk Write); set by the request handler
        self.trigger: list[str] | None = None
        # records locked (as by an approval process): id -> end on the emulator clock, or None
        # until unlocked (admin ``locks``)
        self.locks: dict[str, float | None] = {}
        # every module's store by api_name (set by EmulatorState): lookups resolve through it
        self.peers: dict[str, ModuleStore] = {}

    def locked(self, rid: str) -> bool:
        if rid not in self.locks:
            return False
        until = self.locks[rid]
        if until is not None and self.clock.now() >= until:
            del self.locks[rid]
            return False
        return True

    def _locked_result(self, rid: str) -> WriteResult:
        return WriteResult(
            ok=False, code="RECORD_LOCKED", details={"id": rid}, message=MESSAGES["RECORD_LOCKED"]
        )

    # -- indexes ---------------------------------------------------------------------------
    def find(self, field_name: str, value: Any) -> str | None:
        if value is None or value == "":
            return None
        if field_name == "id":
            return value if isinstance(value, str) and value in self.records else None
        idx = self.index.get(field_name)
        if idx is not None:
            ids = idx.get(index_key(value))
            if ids:
                return min(ids)
            return None
        for rid, rec in self.records.items():  # non-indexed field: linear scan
            if rec.get(field_name) == value:
                return rid
        return None

    def _unindex(self, rid: str, rec: dict[str, Any]) -> None:
        for name, idx in self.index.items():
            v = rec.get(name)
            if v is not None and v != "":
                ids = idx.get(index_key(v))
                if ids is not None:
                    ids.discard(rid)
                    if not ids:
                        del idx[index_key(v)]

    def _index(self, rid: str, rec: dict[str, Any]) -> None:
        for name, idx in self.index.items():
            v = rec.get(name)
            if v is not None and v != "":
                idx.setdefault(index_key(v), set()).add(rid)

    def duplicates(self, values: dict[str, Any], own_id: str | None) -> list[FieldError]:
        errors: list[FieldError] = []
        for name in self.m.unique:
            v = values.get(name)
            if v is None or v == "":
                continue
            ids = self.index[name].get(v.casefold() if v.__class__ is str else v)
            if ids and (own_id is None or len(ids) > 1 or own_id not in ids):
                other = next((i for i in ids if i != own_id), None)
                if other is not None:
                    errors.append(
                        (
                            "DUPLICATE_DATA",
                            name,
                            {
                                "duplicate_record": {
                                    "id": other,
                                    "Owner": {"name": self.user["name"], "id": self.user["id"]},
                                    "module": {
                                        "api_name": self.m.spec.api_name,
                                        "id": self.m.spec.id or "",
                                    },
                                },
                                "more_records": False,
                            },
                        )
                    )
        return errors

    # -- lookups and subforms --------------------------------------------------------------
    def lookup_value(self, spec: FieldSpec, target_id: str) -> dict[str, Any] | None:
        """The stored value of lookup ``spec`` pointing to ``target_id`` (Zoho returns a lookup
        as ``{"name": …, "id": …}``), or None when the target module has no such record."""
        target = self.peers.get(spec.lookup_module or "")
        rec = target.records.get(target_id) if target is not None else None
        if rec is None:
            return None
        return {"name": rec.get("Name"), "id": target_id}

    def relations(self, clean: dict[str, Any], rec: dict[str, Any] | None) -> list[FieldError]:
        """Resolve the lookup and subform values of one write (``rec``: the record updated, None
        on insert), replacing them in ``clean`` by what is stored; errors if any.

        Lookups: the id must be a record of the field's target module, else ``INVALID_DATA``
        with :data:`INVALID_ID` (a dangling reference is never stored).

        Subforms, as Zoho's "Update Subform Data" documents (zoho.com/crm/developer/docs/api/
        update-subforms.html): "The record without the ID will get deleted. For example, if a
        subform is updated with a new record along with records 1,3 then it will delete record
        2 and create a new record"; "Updation of subform records without any JSON objects
        deletes the subform information within the record" (``[]`` clears it). So: a row with
        the id of one of the record's rows updates that row (given fields merged), a row without
        an id is a new row with a new id, and every row of the record not listed is removed; a
        write that does not name the subform leaves it as it is. An id that is not a row of this
        record (or given twice, or given on insert) is not documented: refused with
        ``INVALID_DATA`` (fail safe, nothing changes)."""
        errors: list[FieldError] = []
        new_rows: list[tuple[str, list[dict[str, Any]]]] = []
        for name, value in clean.items():
            spec = self.m.fields[name]
            if value is None:
                continue
            if spec.data_type == "lookup":
                resolved = self.lookup_value(spec, value["id"])
                if resolved is None:
                    errors.append(
                        ("INVALID_DATA", name, {"id": value["id"], MESSAGE_KEY: INVALID_ID})
                    )
                else:
                    clean[name] = resolved
            elif spec.data_type == "subform":
                allowed = {f.api_name for f in spec.subform_fields}
                current = {r["id"]: r for r in (rec or {}).get(name) or []}
                rows: list[dict[str, Any]] = []
                seen: set[str] = set()
                for row in value:
                    values = {k: v for k, v in row.items() if k in allowed}
                    rid = row.get("id")
                    if rid is None:
                        rows.append(values)
                    elif rid in current and rid not in seen:
                        seen.add(rid)
                        rows.append({**current[rid], **values})
                    else:
                        errors.append(
                            (
                                "INVALID_DATA",
                                name,
                                {"id": rid, "parent_api_name": name, MESSAGE_KEY: INVALID_ID},
                            )
                        )
                        break
                new_rows.append((name, rows))
        if not errors:
            for name, rows in new_rows:
                clean[name] = [r if "id" in r else {"id": str(next(self.ids)), **r} for r in rows]
        return errors

    # -- writes ----------------------------------------------------------------------------
    def _record_history(self, rid: str, api: str, values: dict[str, Any], now: float) -> None:
        self.history.setdefault(rid, []).append(
            {
                "time": self.clock.iso(now),
                "timestamp": now,
                "api": api,
                "values": dict(values),
                "trigger": None if self.trigger is None else list(self.trigger),
            }
        )

    def insert(
        self, data: dict[str, Any], api: str, extra_errors: list[FieldError] | None = None
    ) -> WriteResult:
        clean, errors = self.m.check_values(data, creating=True)
        if extra_errors:
            errors.extend(extra_errors)
        if not errors:
            errors = self.relations(clean, None)
        if not errors:
            errors = self.duplicates(clean, None)
        if errors:
            return WriteResult(ok=False, errors=errors)
        return self.apply_insert(clean, api)

    def apply_insert(self, clean: dict[str, Any], api: str) -> WriteResult:
        """Store already validated values as a new record."""
        now = self.clock.now()
        iso = self.clock.iso(now)
        rid = str(next(self.ids))
        by = {"name": self.user["name"], "id": self.user["id"]}
        rec = {
            "id": rid,
            **clean,
            "Created_Time": iso,
            "Modified_Time": iso,
            "Created_By": by,
            "Modified_By": by,
        }
        self.records[rid] = rec
        self._index(rid, rec)
        self._record_history(rid, api, rec, now)
        return WriteResult(
            ok=True, record_id=rid, action="insert", created_time=iso, modified_time=iso
        )

    def update(
        self,
        rid: str,
        data: dict[str, Any],
        api: str,
        extra_errors: list[FieldError] | None = None,
    ) -> WriteResult:
        rec = self.records.get(rid)
        if rec is None:
            return WriteResult(
                ok=False,
                code="INVALID_DATA",
                details={"id": rid},
                message="the id given seems to be invalid",
            )
        if self.locked(rid):
            return self._locked_result(rid)
        clean, errors = self.m.check_values(data, creating=False)
        if extra_errors:
            errors.extend(extra_errors)
        if not errors:
            errors = self.relations(clean, rec)
        if not errors:
            errors = self.duplicates(clean, rid)
        if errors:
            return WriteResult(ok=False, errors=errors)
        return self.apply_update(rid, rec, clean, api)

    def apply_update(
        self, rid: str, rec: dict[str, Any], clean: dict[str, Any], api: str
    ) -> WriteResult:
        """Merge already validated values into an existing record."""
        now = self.clock.now()
        iso = self.clock.iso(now)
        for name, idx in self.index.items():
            if name in clean:
                old = rec.get(name)
                new = clean[name]
                if old != new:
                    if old is not None and old != "":
                        ids = idx.get(index_key(old))
                        if ids is not None:
                            ids.discard(rid)
                            if not ids:
                                del idx[index_key(old)]
                    if new is not None and new != "":
                        idx.setdefault(index_key(new), set()).add(rid)
        rec.update(clean)
        rec["Modified_Time"] = iso
        rec["Modified_By"] = {"name": self.user["name"], "id": self.user["id"]}
        self._record_history(rid, api, rec, now)
        return WriteResult(
            ok=True,
            record_id=rid,
            action="update",
            created_time=rec["Created_Time"],
            modified_time=iso,
        )

    def match_order(self, duplicate_check_fields: list[str] | None) -> list[str]:
        if duplicate_check_fields:
            return [f for f in duplicate_check_fields if f in self.m.fields or f == "id"]
        return list(dict.fromkeys([*self.m.dup_check, *self.m.unique]))

    def upsert(self, data: dict[str, Any], api: str, order: list[str]) -> WriteResult:
        for name in order:
            rid = self.find(name, data.get(name))
            if rid is not None:
                res = self.update(rid, data, api)
                res.duplicate_field = name
                return res
        res = self.insert(data, api)
        # Zoho's samples show duplicate_field null or a field name on insert; the OAS types it
        # as a string, so the emulator names the first field it checked.
        res.duplicate_field = order[0] if order else None
        return res

    def delete(self, rid: str, api: str = "delete") -> WriteResult:
        if rid in self.records and self.locked(rid):
            return self._locked_result(rid)
        rec = self.records.pop(rid, None)
        if rec is None:
            return WriteResult(
                ok=False, code="INVALID_DATA", details={"id": rid}, message="record not deleted"
            )
        self._unindex(rid, rec)
        now = self.clock.now()
        self.deleted[rid] = rec
        self._record_history(rid, api, rec, now)
        return WriteResult(ok=True, record_id=rid, action="delete")
