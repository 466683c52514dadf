"""Rules between pipelines: lookups (a column pointing to another pipeline's records) and
subform pipelines (rows of another pipeline's records). Issue 21, docs/related-tables.md.

Called by :class:`connector.config.Settings` once every pipeline is parsed; kept apart from
``config.py`` so that the per-pipeline models stay readable. ``config`` imports this module,
so the rules see a pipeline through the protocols below (what they read of
``PipelineConfig``), not through an import back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, Protocol

from connector.errors import ConfigError


class _Field(Protocol):
    @property
    def field(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def pipeline(self) -> str | None: ...


class _SubformOf(Protocol):
    @property
    def pipeline(self) -> str: ...
    @property
    def field(self) -> str: ...
    @property
    def parent_column(self) -> str: ...


class PipelineLinks(Protocol):
    """What the dependency order reads of a pipeline: its name, its lookups and its subform
    parent (``connector.config.PipelineConfig``; ``connector.parents.pipeline_order``)."""

    @property
    def name(self) -> str: ...
    @property
    def fields(self) -> Mapping[str, _Field]: ...
    @property
    def subform_of(self) -> _SubformOf | None: ...


class PipelineRules(PipelineLinks, Protocol):
    """What the rules read of a pipeline (``connector.config.PipelineConfig``)."""

    @property
    def module(self) -> str: ...
    @property
    def key_column(self) -> str: ...
    @property
    def key_field(self) -> str: ...
    @property
    def delete_mode(self) -> str: ...
    @property
    def max_staleness(self) -> timedelta: ...
    @property
    def ignore_columns(self) -> tuple[str, ...]: ...
    @property
    def model_fields_set(self) -> set[str]: ...


#: Whether the engine keeps parents first for lookups (docs/related-tables.md): it does since
#: issue 21 part 2b-ii (the emitter's gate, the engine's release of held children, the initial
#: sync in dependency order), run under faults by the chaos runner's customers/orders
#: scenario in both capture modes. False would refuse every ``type = "lookup"`` field at start.
ENGINE_SUPPORTS_LOOKUPS = True

#: Whether subform pipelines are accepted at start (issue 21, ``emitter_subform``). Switched off
#: in session 20 when the soak found orders whose CRM rows kept a line that had moved away or
#: been deleted; on again in session 21 with both defects fixed and tested
#: (docs/related-tables.md, "Defects found by the soak"). A kill switch: False refuses every
#: ``subform_of`` at start and leaves the chaos runner's order lines out (tests/chaos/procs.py).
ENGINE_SUPPORTS_SUBFORMS = True


def lookup_columns(p: PipelineLinks) -> Iterator[tuple[str, str | None]]:
    """Each lookup column of ``p`` in config order, with the pipeline it looks up (None only
    before the field is validated: a lookup needs ``pipeline``)."""
    for column, m in p.fields.items():
        if m.type == "lookup":
            yield column, m.pipeline


def parent_pipelines(p: PipelineLinks) -> list[str]:
    """The pipelines ``p`` depends on, each once: the pipelines its lookups name (config
    order), then its ``subform_of`` parent. Their records must be in the CRM before ``p``'s."""
    parents = [parent for _, parent in lookup_columns(p) if parent is not None]
    if p.subform_of is not None:
        parents.append(p.subform_of.pipeline)
    return list(dict.fromkeys(parents))


def fill_subform_modules(data: Any) -> Any:
    """A subform pipeline may omit ``module``: it writes its parent's records, so it is the
    parent pipeline's module (:func:`check_subforms` refuses any other). A parent that is
    not another configured pipeline is refused here, naming ``subform_of.pipeline``
    (rather than as a missing ``module``)."""
    if not isinstance(data, dict) or not isinstance(data.get("pipelines"), list):
        return data
    raw = [p if isinstance(p, dict) else {} for p in data["pipelines"]]
    by_name = {p.get("name"): p for p in raw if isinstance(p.get("name"), str)}

    def parent_of(p: dict[str, Any]) -> Any:
        sub = p.get("subform_of")
        return sub.get("pipeline") if isinstance(sub, dict) else None

    def module_of(p: dict[str, Any], seen: frozenset[str]) -> Any:
        if "module" in p or not isinstance(parent_of(p), str):
            return p.get("module")
        parent = by_name.get(parent_of(p))
        if parent is None or parent_of(p) in seen:
            return None
        return module_of(parent, seen | {parent_of(p)})

    filled = []
    for p, given in zip(raw, data["pipelines"], strict=True):
        parent, name = parent_of(p), p.get("name")
        if isinstance(parent, str) and "module" not in p:
            if parent == name or parent not in by_name:
                raise _subform_parent_error(str(name), parent, sorted(map(str, by_name)))
            module = module_of(p, frozenset({str(name)}))
            if module is not None:
                given = {**p, "module": module}
        filled.append(given)
    return {**data, "pipelines": filled}


def check_lookups(
    pipelines: Sequence[PipelineRules], *, engine_supports: bool | None = None
) -> None:
    """Refuse lookup fields whose parent pipeline is missing, is the pipeline itself or closes
    a cycle (parents must sync first), naming the column; then refuse every lookup while the
    engine does not keep parents first (:data:`ENGINE_SUPPORTS_LOOKUPS`, issue 21)."""
    by_name = {p.name: p for p in pipelines}
    edges: dict[str, set[str]] = {p.name: set() for p in pipelines}
    first: str | None = None
    for p in pipelines:
        for column, parent in lookup_columns(p):
            key = f"pipelines[{p.name!r}].fields.{column}.pipeline"
            first = first or key
            if parent not in by_name:
                raise ConfigError(
                    key,
                    f"column {column!r} looks up pipeline {parent!r}, which is not"
                    f" configured (pipelines: {', '.join(sorted(by_name))}); name the pipeline"
                    " that syncs the parent table",
                )
            if parent == p.name:
                raise ConfigError(
                    key,
                    f"column {column!r} looks up its own pipeline {p.name!r}; a record"
                    " pointing to a record of the same table is not supported",
                )
            edges[p.name].add(parent)
    for start in edges:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            for parent in edges[node]:
                if parent == start:
                    raise ConfigError(
                        f"pipelines[{start!r}].fields",
                        f"lookups form a cycle through pipeline {start!r}; parents must be"
                        " synced before their children, so the lookups must not loop",
                    )
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
    supported = ENGINE_SUPPORTS_LOOKUPS if engine_supports is None else engine_supports
    if first is not None and not supported:
        raise ConfigError(
            first,
            "type 'lookup' is not yet supported by the engine (issue 21): the mapping and the"
            " emulator know it, but the engine does not yet sync parents first, so a lookup"
            " could point to a missing parent; map the column as 'text' for now"
            " (docs/related-tables.md)",
        )
    _check_parents(pipelines, by_name)


def _check_parents(
    pipelines: Sequence[PipelineRules], by_name: Mapping[str, PipelineRules]
) -> None:
    """What the engine's parents-first rule needs of a pipeline that other pipelines look up
    (docs/related-tables.md "Deletes of parents", "Planner across pipelines"):

    * its ``delete_mode`` is "mark" or "ignore": a delete would remove a CRM record that child
      records may still name (the check of the CRM's children before a parent delete is not
      built), so "delete" is refused for it;
    * its ``max_staleness`` is at most the child's: a child waits for its parent, so a parent
      that may arrive later than the child's bound would make the child late (the pull-forward
      of parents' deadlines is not built)."""
    for p in pipelines:
        for column, parent_name in lookup_columns(p):
            parent = by_name[str(parent_name)]
            if parent.delete_mode == "delete":
                raise ConfigError(
                    f"pipelines[{parent.name!r}].delete_mode",
                    f"pipeline {parent.name!r} is looked up by {p.name}.{column}, so its"
                    " deletes cannot be 'delete' (the CRM record would be deleted while child"
                    " records may still name it); use delete_mode = 'mark' or 'ignore'"
                    " (docs/related-tables.md)",
                )
            if parent.max_staleness > p.max_staleness:
                raise ConfigError(
                    f"pipelines[{p.name!r}].max_staleness",
                    f"pipeline {p.name!r} (max_staleness {p.max_staleness}) looks up pipeline"
                    f" {parent.name!r} (max_staleness {parent.max_staleness}) in column"
                    f" {column!r}; a child waits for its parent, so its bound must be at least"
                    f" the parent's: raise {p.name!r}'s max_staleness or lower"
                    f" {parent.name!r}'s (docs/related-tables.md)",
                )


def _subform_parent_error(name: str, parent: str, names: list[str]) -> ConfigError:
    key = f"pipelines[{name!r}].subform_of.pipeline"
    if parent == name:
        return ConfigError(
            key,
            f"pipeline {name!r} names itself as its parent; name the pipeline whose records"
            " hold the subform",
        )
    return ConfigError(
        key,
        f"pipeline {name!r} is a subform of pipeline {parent!r}, which is not configured"
        f" (pipelines: {', '.join(names)}); name the pipeline that syncs the parent table",
    )


def check_subforms(
    pipelines: Sequence[PipelineRules], *, engine_supports: bool | None = None
) -> None:
    """Refuse ``subform_of`` pipelines that cannot work, naming the key; then refuse every one
    while the engine does not write subforms (:data:`ENGINE_SUPPORTS_SUBFORMS`, issue 21).

    A subform pipeline's parent exists, is not itself and is not a subform pipeline (Zoho has
    no subform of a subform row); its ``module`` is the parent's (omitted: filled in);
    ``parent_column`` is the link, so it is neither mapped in ``fields`` nor ignored (a line
    moving to another parent must be seen); its fields hold no lookup (the emulator refuses a
    lookup inside a subform: not modelled) and it sets no ``key_field`` (a subform row has no
    unique field to hold the key) and no ``delete_mode`` but 'delete' (a deleted line is a row
    no longer listed; there is no record to mark or keep). Two subform pipelines may not fill
    the same field of a parent, the parent may not map that field itself, and no lookup may
    point to a subform pipeline (its lines are rows of a record, not records). Runs before
    :func:`check_lookups`, so a configuration with both is refused for its subforms first.
    """
    by_name = {p.name: p for p in pipelines}
    targets: dict[tuple[str, str], str] = {}
    first: str | None = None
    for p in pipelines:
        sub = p.subform_of
        if sub is None:
            continue
        key = f"pipelines[{p.name!r}].subform_of"
        first = first or key
        parent = by_name.get(sub.pipeline)
        if parent is None or parent.name == p.name:
            raise _subform_parent_error(p.name, sub.pipeline, sorted(by_name))
        if parent.subform_of is not None:
            raise ConfigError(
                f"{key}.pipeline",
                f"pipeline {parent.name!r} is itself a subform pipeline (of"
                f" {parent.subform_of.pipeline!r}); a subform row cannot hold a subform, name"
                " a pipeline that writes records",
            )
        if p.module != parent.module:
            raise ConfigError(
                f"pipelines[{p.name!r}].module",
                f"a subform pipeline writes its parent's records: module must be"
                f" {parent.module!r} (pipeline {parent.name!r}) or omitted, got {p.module!r}",
            )
        if sub.parent_column in p.fields:
            raise ConfigError(
                f"{key}.parent_column",
                f"column {sub.parent_column!r} links a line to its parent; it is not a row"
                f" field, remove it from pipelines[{p.name!r}].fields",
            )
        if sub.parent_column in p.ignore_columns:
            raise ConfigError(
                f"{key}.parent_column",
                f"column {sub.parent_column!r} links a line to its parent; it must not be in"
                " ignore_columns (or be the sync_flag_column): a line moved to another parent"
                " changes two parents' rows",
            )
        for column, _ in lookup_columns(p):
            raise ConfigError(
                f"pipelines[{p.name!r}].fields.{column}.type",
                f"column {column!r} is a lookup; a subform row holds plain fields only"
                " (a lookup inside a subform is not supported)",
            )
        if "key_field" in p.model_fields_set:
            raise ConfigError(
                f"pipelines[{p.name!r}].key_field",
                "a subform row has no unique key field; remove key_field (to send the line key"
                f" in a row field, map key_column {p.key_column!r} in fields)",
            )
        if p.delete_mode != "delete":
            raise ConfigError(
                f"pipelines[{p.name!r}].delete_mode",
                f"delete_mode {p.delete_mode!r} is not possible for subform rows: a deleted"
                " line is a row the parent's next write no longer lists (Zoho deletes it);"
                " remove delete_mode",
            )
        target = (parent.name, sub.field)
        if target in targets:
            raise ConfigError(
                f"{key}.field",
                f"pipelines {targets[target]!r} and {p.name!r} both fill subform field"
                f" {sub.field!r} of pipeline {parent.name!r}; each subform has one pipeline",
            )
        targets[target] = p.name
        if sub.field in {m.field for m in parent.fields.values()} | {parent.key_field}:
            raise ConfigError(
                f"{key}.field",
                f"field {sub.field!r} is mapped by pipeline {parent.name!r} itself; a subform"
                " field is filled by its subform pipeline only",
            )
    for p in pipelines:
        for column, looked_up in lookup_columns(p):
            target_pipeline = by_name.get(looked_up or "")
            if target_pipeline and target_pipeline.subform_of:
                raise ConfigError(
                    f"pipelines[{p.name!r}].fields.{column}.pipeline",
                    f"column {column!r} looks up pipeline {looked_up!r}, a subform pipeline:"
                    " its lines are rows of a record, not records a lookup can point to",
                )
    supported = ENGINE_SUPPORTS_SUBFORMS if engine_supports is None else engine_supports
    if first is not None and not supported:
        raise ConfigError(
            first,
            "subform_of is not yet supported by the engine (issue 21): subforms are switched"
            " off in this build (ENGINE_SUPPORTS_SUBFORMS); leave this pipeline out"
            " (docs/related-tables.md)",
        )
