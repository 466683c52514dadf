"""Start-up checks of a pipeline's mapping (split from ``connector.mapping``): against the CRM
module's field metadata (every mapped field exists, is writable, has a compatible data type;
the key field is unique; lookups point at their parent's module) and against the source
table's columns (present, of a type the CRM field can take). Each refusal names the config
key; ``connector run`` and ``connector doctor`` call them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from connector.config import PipelineConfig
from connector.crm_values import COMPATIBLE_DATA_TYPES
from connector.errors import ConfigError

#: CRM data types a key_field may have (the key is sent as a string).
KEY_DATA_TYPES = frozenset({"text", "email", "phone", "website", "autonumber"})


class FieldInfo(Protocol):
    @property
    def api_name(self) -> str: ...
    @property
    def data_type(self) -> str: ...
    @property
    def unique(self) -> bool: ...
    @property
    def mandatory(self) -> bool: ...
    @property
    def read_only(self) -> bool: ...


class FieldSource(Protocol):
    async def fields(self, module: str) -> Sequence[FieldInfo]: ...


async def check_mapping(
    client: FieldSource,
    pipeline: PipelineConfig,
    parents: Mapping[str, PipelineConfig] | None = None,
) -> None:
    """Refuse a mapping that cannot work against the CRM's module, naming the config key.

    Checks: every mapped field exists, is writable and has a compatible ``data_type``; the
    key_field exists, is unique and holds text; every mandatory CRM field is filled; the
    delete mark field (delete_mode 'mark') exists and is a boolean; a lookup field points to
    the module of its parent pipeline (field metadata ``lookup.module``; ``parents`` by name).

    A subform pipeline (``subform_of``) is checked by :func:`check_subform_mapping` against
    its parent's module instead (its parent pipeline in ``parents``).
    """
    prefix = f"pipelines[{pipeline.name!r}]"
    if pipeline.subform_of is not None:
        parent = (parents or {}).get(pipeline.subform_of.pipeline)
        if parent is None:
            raise ConfigError(
                f"{prefix}.subform_of.pipeline",
                f"pipeline {pipeline.name!r} is a subform of pipeline"
                f" {pipeline.subform_of.pipeline!r}, which is not configured",
            )
        await check_subform_mapping(client, pipeline, parent)
        return
    metas = {f.api_name: f for f in await client.fields(pipeline.module)}
    module = pipeline.module

    key = metas.get(pipeline.key_field)
    if key is None:
        raise ConfigError(
            f"{prefix}.key_field",
            f"CRM module {module!r} has no field {pipeline.key_field!r}; expected a unique "
            "text field that holds the legacy key",
        )
    if not key.unique:
        raise ConfigError(
            f"{prefix}.key_field",
            f"CRM field {module}.{key.api_name} is not unique; expected a field marked "
            "'Do not allow duplicate values' so upserts can find records by it",
        )
    if key.data_type not in KEY_DATA_TYPES:
        raise ConfigError(
            f"{prefix}.key_field",
            f"CRM field {module}.{key.api_name} has data_type {key.data_type!r}; expected "
            "a text field (single line)",
        )

    for column, m in pipeline.fields.items():
        where = f"{prefix}.fields.{column}"
        meta = _mapped_field(
            where,
            metas,
            m.field,
            m.type,
            container=f"CRM module {module!r}",
            label=f"CRM field {module}",
        )
        if m.type == "lookup":
            parent = (parents or {}).get(m.pipeline or "")
            target = getattr(meta, "lookup_module", None)
            if parent is None:
                raise ConfigError(
                    f"{where}.pipeline",
                    f"column {column!r} looks up pipeline {m.pipeline!r}, which is not"
                    " configured; name the pipeline that syncs the parent table",
                )
            if target != parent.module:
                raise ConfigError(
                    where,
                    f"CRM lookup field {module}.{m.field} points to module {target!r}, but"
                    f" pipeline {parent.name!r} syncs module {parent.module!r}; map a lookup"
                    f" to {parent.module!r} or name the pipeline of {target!r}",
                )

    mapped = {m.field for m in pipeline.fields.values()} | {pipeline.key_field}
    if pipeline.delete_mode == "mark" and pipeline.delete_mark_field:
        mark = metas.get(pipeline.delete_mark_field)
        if mark is None or mark.data_type != "boolean":
            raise ConfigError(
                f"{prefix}.delete_mark_field",
                f"expected a boolean field of CRM module {module!r}, "
                + (
                    "found none with that name"
                    if mark is None
                    else f"found data_type {mark.data_type!r}"
                ),
            )
        mapped.add(mark.api_name)
    missing = sorted(a for a, f in metas.items() if f.mandatory and a not in mapped)
    if missing:
        raise ConfigError(
            f"{prefix}.fields",
            f"CRM module {module!r} requires field(s) {', '.join(missing)} but no column "
            "is mapped to them",
        )


async def check_subform_mapping(
    client: FieldSource, pipeline: PipelineConfig, parent: PipelineConfig
) -> None:
    """Refuse a subform pipeline that cannot work against the CRM, naming the config key.

    Checks: the parent module has the field ``subform_of.field``, writable, of ``data_type``
    ``subform``; then, when the field metadata names the subform module (``subform.module``,
    :attr:`FieldMeta.subform_module`), every mapped column's row field exists in that module's
    field metadata (``settings/fields?module=<subform module>``, which the emulator serves and
    Zoho's Subform API names as the source of the rows' api names), is writable and has a
    compatible ``data_type``. Metadata without ``subform.module``: only the ``data_type`` is
    checked (the rows' fields are then judged by the CRM at the first write).
    """
    sub = pipeline.subform_of
    if sub is None:
        raise ValueError(f"pipeline {pipeline.name!r} has no subform_of")
    prefix = f"pipelines[{pipeline.name!r}]"
    module = parent.module
    metas = {f.api_name: f for f in await client.fields(module)}
    meta = metas.get(sub.field)
    if meta is None:
        raise ConfigError(
            f"{prefix}.subform_of.field",
            f"CRM module {module!r} has no field {sub.field!r} "
            f"(its fields: {', '.join(sorted(metas))})",
        )
    if meta.data_type != "subform":
        raise ConfigError(
            f"{prefix}.subform_of.field",
            f"CRM field {module}.{sub.field} has data_type {meta.data_type!r}; expected a"
            " subform field",
        )
    if meta.read_only:
        raise ConfigError(
            f"{prefix}.subform_of.field", f"CRM field {module}.{sub.field} is read-only"
        )
    sub_module = getattr(meta, "subform_module", None)
    if not sub_module:
        return
    rows = {f.api_name: f for f in await client.fields(sub_module)}
    for column, m in pipeline.fields.items():
        _mapped_field(
            f"{prefix}.fields.{column}",
            rows,
            m.field,
            m.type,
            container=f"subform {module}.{sub.field} (module {sub_module!r})",
            label=f"subform field {sub_module}",
        )


def _mapped_field(
    where: str,
    metas: Mapping[str, FieldInfo],
    field: str,
    config_type: str,
    *,
    container: str,
    label: str,
) -> FieldInfo:
    """The metadata of mapped field ``field`` among ``metas`` (a module's fields, or a
    subform's row fields): it exists, is writable and its ``data_type`` takes ``config_type``;
    else ConfigError at ``where``. ``container`` / ``label`` name the place in the messages."""
    meta = metas.get(field)
    if meta is None:
        raise ConfigError(
            where, f"{container} has no field {field!r} (its fields: {', '.join(sorted(metas))})"
        )
    if meta.read_only:
        raise ConfigError(where, f"{label}.{field} is read-only")
    if meta.data_type not in COMPATIBLE_DATA_TYPES[config_type]:
        raise ConfigError(
            where,
            f"type {config_type!r} does not match {label}.{field}, whose data_type is"
            f" {meta.data_type!r}; expected type {_config_type_for(meta.data_type)!r}",
        )
    return meta


def _config_type_for(data_type: str) -> str:
    for config_type, allowed in COMPATIBLE_DATA_TYPES.items():
        if data_type in allowed:
            return config_type
    return f"(none: CRM data_type {data_type!r} is not supported)"


#: config type -> PostgreSQL type categories (``pg_type.typcategory``) whose values it converts
#: reliably: B boolean, N numeric, D date/time. Text-like CRM types take any column.
_SOURCE_CATEGORIES: dict[str, tuple[frozenset[str], str]] = {
    "boolean": (frozenset({"B", "N"}), "a boolean column (or an integer 0/1)"),
    "integer": (frozenset({"N"}), "an integer column"),
    "bigint": (frozenset({"N"}), "an integer column"),
    "decimal": (frozenset({"N"}), "a numeric column"),
    "double": (frozenset({"N"}), "a numeric column"),
    "currency": (frozenset({"N"}), "a numeric column"),
    "percent": (frozenset({"N"}), "a numeric column"),
    "date": (frozenset({"D"}), "a date or timestamp column"),
    "datetime": (frozenset({"D"}), "a timestamp column"),
}

Q_SOURCE_COLUMNS = """
SELECT a.attname::text, t.typcategory::text, pg_catalog.format_type(a.atttypid, a.atttypmod)
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = pg_catalog.to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
"""


async def check_source_columns(conn: Any, pipeline: PipelineConfig) -> None:
    """Refuse a mapping that cannot work against the SOURCE table, naming the config key: the
    table, the key column and every mapped column exist, and each mapped column's PostgreSQL
    type can be converted to the mapped CRM type (a text column cannot feed a boolean field:
    every row would be dead-lettered)."""
    prefix = f"pipelines[{pipeline.name!r}]"
    schema, table = pipeline.table_parts
    from psycopg import sql

    regclass = sql.Identifier(schema, table).as_string(conn)
    cur = await conn.execute(Q_SOURCE_COLUMNS, (regclass,))
    columns = {str(r[0]): (str(r[1]), str(r[2])) for r in await cur.fetchall()}
    if not columns:
        raise ConfigError(
            f"{prefix}.source_table",
            f"table {pipeline.source_table!r} does not exist in the source database"
            " (or this role cannot see it)",
        )
    if pipeline.key_column not in columns:
        raise ConfigError(
            f"{prefix}.key_column",
            f"column {pipeline.key_column!r} does not exist in {pipeline.source_table!r}"
            f" (its columns: {', '.join(sorted(columns))})",
        )
    cur = await conn.execute(
        "SELECT current_user::text, pg_catalog.has_table_privilege(%s, 'SELECT')", (regclass,)
    )
    role, can_select = await cur.fetchone()
    if not can_select:
        from connector.errors import ConnectorError

        raise ConnectorError(
            f"role {role} lacks the SELECT privilege on {pipeline.source_table} (the initial"
            f" sync, verify and retries read it): GRANT SELECT ON {regclass} TO {role}"
        )
    for column, m in pipeline.fields.items():
        where = f"{prefix}.fields.{column}"
        if column not in columns:
            raise ConfigError(
                where,
                f"column {column!r} does not exist in {pipeline.source_table!r}"
                f" (its columns: {', '.join(sorted(columns))})",
            )
        category, pg_type = columns[column]
        rule = _SOURCE_CATEGORIES.get(m.type)
        if rule is not None and category not in rule[0]:
            raise ConfigError(
                where,
                f"column {column!r} is {pg_type}, which cannot feed type {m.type!r} (CRM field"
                f" {m.field}); expected {rule[1]}: map a matching column, cast it in a view,"
                " or map it to a text field",
            )
