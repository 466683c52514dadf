"""Validation of emulator responses against Zoho's OpenAPI files, vendored in tests/oas/v8.0/.

The files are OpenAPI 3.0 generated from Zoho's SDK models; reading them as JSON Schema needs
these rules, each applied the same way to every operation:

1. ``nullable: true`` allows null (OpenAPI 3.0 semantics; JSON Schema ignores the keyword).
2. Cross-file ``$ref`` URLs (raw.githubusercontent.com/…/v8.0/<file>.json) resolve to the local
   copy; a file Zoho did not ship in this folder (tags.json, layouts.json, …) resolves to ``{}``.
3. ``oneOf`` is read as ``anyOf``, and an object branch must see at least one of its declared
   properties. Zoho's branches overlap: the ``API_Exception`` branches declare no ``required``
   keys, so every object (``{"data": […]}`` included) would match two branches, and coql.json's
   Syntax_Exception and Query_Exception both accept SYNTAX_ERROR; read strictly, no body of
   those operations could ever pass. The property rule keeps a vacuous branch from matching.
4. ``enum`` on ``message`` is not enforced: those lists are samples (one reads
   "Requested module 'asdf' is not available."). Enums on ``code``, ``status`` and every other
   key are enforced.
5. A status the operation does not document is checked against its documented 400 response
   (errors) or its 200/201 response (success), because Zoho's files fold outcomes into those.
   Codes the reference documents but the OAS never lists (TOO_MANY_REQUESTS …) are checked
   against common.json's API_Exception envelope.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

OAS_DIR = Path(__file__).resolve().parents[1] / "oas" / "v8.0"
REMOTE = "https://raw.githubusercontent.com/Zohocorp-Pvt-Ltd/crm-oas/refs/heads/main/v8.0/"
CODES_MISSING_FROM_OAS = {
    "TOO_MANY_REQUESTS",  # reference §4.4
    "INVALID_CALLBACK_URL",  # reference §3.2
    "DISCRETE_PAGINATION_LIMIT_EXCEEDED",  # reference §2.6
    "AMBIGUITY_DURING_PROCESSING",  # reference §2.6
    "REQUIRED_PARAM_MISSING",  # reference §2.6 (record.json's enum lacks it)
}


def available() -> bool:
    """True in every checkout: the files are vendored; a missing folder fails, never skips."""
    if not OAS_DIR.is_dir():
        raise FileNotFoundError(f"Zoho OpenAPI folder missing: {OAS_DIR} (vendored in the repo)")
    return True


@cache
def _doc(name: str) -> dict[str, Any] | None:
    path = OAS_DIR / name
    if not path.exists():
        # Only the files the tests use are vendored; a $ref into another upstream file
        # (tags.json, …) is left unchecked, as documented above.
        return None
    return json.loads(path.read_text())


def _resolve(ref: str, current: str) -> tuple[Any, str]:
    if ref.startswith("#"):
        name, frag = current, ref[1:]
    else:
        url, _, frag = ref.partition("#")
        name = url.rsplit("/", 1)[-1]
    doc = _doc(name)
    if doc is None:
        return {}, name
    node: Any = doc
    for part in frag.strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, name


def _convert(node: Any, current: str, seen: dict[tuple[str, str], Any], depth: int = 0) -> Any:
    """Inline refs (with a recursion guard) and apply rules 1, 3 and 4."""
    if isinstance(node, list):
        return [_convert(x, current, seen, depth) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target, name = _resolve(node["$ref"], current)
        key = (name, node["$ref"].split("#")[-1])
        if depth > 12:
            return {}
        if key in seen:
            return seen[key]
        out = _convert(target, name, seen, depth + 1)
        return out
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "properties":
            props = {}
            for pk, pv in v.items():
                conv = _convert(pv, current, seen, depth + 1)
                if pk == "message" and isinstance(conv, dict):
                    conv = {kk: vv for kk, vv in conv.items() if kk != "enum"}
                props[pk] = conv
            out[k] = props
        elif k == "oneOf":
            branches = []
            for b in v:
                conv = _convert(b, current, seen, depth + 1)
                props = conv.get("properties") if isinstance(conv, dict) else None
                if props:
                    conv = {"allOf": [conv, {"anyOf": [{"required": [p]} for p in props]}]}
                branches.append(conv)
            out["anyOf"] = branches
        elif k in ("nullable", "format", "example", "examples", "description", "xml"):
            continue
        else:
            out[k] = _convert(v, current, seen, depth + 1)
    if node.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = [t, "null"] if isinstance(t, str) else [*t, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _operation(file: str, method: str, path: str) -> dict[str, Any]:
    doc = _doc(file)
    assert doc is not None, file
    return doc["paths"][path][method.lower()]


def _response_schema(file: str, response: dict[str, Any]) -> Any | None:
    if "$ref" in response:
        response, _ = _resolve(response["$ref"], file)
    content = response.get("content") or {}
    media = content.get("application/json") or next(iter(content.values()), None)
    if media is None:
        return None
    return media.get("schema")


@cache
def _validator(file: str, method: str, path: str, status: str) -> jsonschema.Draft7Validator | None:
    op = _operation(file, method, path)
    schema = _response_schema(file, op["responses"][status])
    if schema is None:
        return None
    return jsonschema.Draft7Validator(_convert(copy.deepcopy(schema), file, {}))


@cache
def _envelope() -> jsonschema.Draft7Validator:
    doc = _doc("common.json")
    assert doc is not None
    return jsonschema.Draft7Validator(doc["components"]["schemas"]["API_Exception"])


def validate(file: str, method: str, path: str, status: int, body: Any) -> str:
    """Validate ``body`` (parsed JSON, or None for an empty body) for the operation and status;
    raises jsonschema.ValidationError. Returns which schema was used."""
    op = _operation(file, method, path)
    documented = op["responses"]
    key = str(status)
    if isinstance(body, dict) and body.get("code") in CODES_MISSING_FROM_OAS:
        _envelope().validate(body)
        return "common.json#API_Exception"
    if key not in documented:
        if status >= 400 and "400" in documented:
            key = "400"
        elif "200" in documented:
            key = "200"
        else:
            key = next(k for k in documented if k.startswith("2"))
    if status == 204:
        assert body is None, "204 must have an empty body"
        return "204"
    validator = _validator(file, method, path, key)
    if validator is None:
        return f"{key} (no schema)"
    validator.validate(body)
    return key


def explain(error: jsonschema.ValidationError) -> str:
    """The leaf causes of a validation error (oneOf/anyOf failures hide them)."""
    leaves: list[str] = []

    def walk(e: jsonschema.ValidationError) -> None:
        if e.context:
            for c in e.context:
                walk(c)
        else:
            leaves.append(f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}")

    walk(error)
    return "\n".join(leaves[:40])
