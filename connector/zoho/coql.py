"""COQL text built in one place (``POST /crm/v8/coql``, zoho-crm-api.md §2, "COQL").

Every COQL query the connector sends is assembled here from API names and values, never by
an f-string at the call site:

* **API names** (module, fields) are checked, not quoted: Zoho's API names are letters, digits
  and underscores, a lookup's field reached with one dot (``Account_Name.Account_Name``); a
  name holding anything else (a space, a quote, a comma, an operator) is refused with
  ``ValueError`` naming it, so configuration can never inject text into a query. (Zoho asks
  for reserved words used as names, e.g. ``External``, to be quoted, Kaizen #171 question 1;
  not done here: the emulator reads a quoted name as a string, so it is left for when a
  pipeline needs such a field.)
* **String values** go between single quotes, a single quote inside doubled: Zoho's own answer
  ("Kaizen #171: FAQs on COQL API", help.zoho.com community, question 3: "escape the single
  quote in the value by adding another single quote", ``1'' 2``). Non-ASCII needs nothing: the
  query travels as JSON (UTF-8).
* **A backslash** in a value is refused (:class:`CoqlValueError`, a ``DataError``): Zoho's
  text on backslashes inside COQL strings could not be found (neither zoho-crm-api.md, the v8
  OpenAPI files nor the COQL pages say), and a parser that reads ``\\'`` as an escaped quote
  (the emulator does, connector/emulator/coql.py) would end the string elsewhere and match a
  different value or none. A lookup that matched nothing would let a delete be acknowledged
  without deleting, so it fails loudly instead (the record is dead-lettered, naming the cause).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from connector.errors import DataError

# a word character (any script: Zoho's docs do not restrict API names to ASCII) or `$`, not a
# digit first; nothing that could end a name inside a query (space, quote, comma, operator)
_API_NAME = re.compile(r"^(?:[^\W\d]|\$)[\w$]*(?:\.(?:[^\W\d]|\$)[\w$]*)?$")


class CoqlValueError(DataError):
    """A value COQL cannot carry safely (see the module's notes)."""


def name(api_name: str) -> str:
    """An API name (module or field) as it stands in a query; ``ValueError`` if it is not one."""
    if not _API_NAME.match(api_name):
        raise ValueError(
            f"{api_name!r} is not a Zoho API name (letters, digits, underscores, one dot for a"
            " lookup's field): check the module / field names in the pipeline's configuration"
        )
    return api_name


def string(value: str, *, field: str | None = None) -> str:
    """A string value as a COQL literal: single quotes, an inner single quote doubled."""
    if "\\" in value:
        raise CoqlValueError(
            "coql_backslash",
            "a COQL value cannot hold a backslash: Zoho documents no escape for it inside a"
            " COQL string, so the record cannot be looked up by this value; handle it in the"
            " CRM by hand (or change the key)",
            field=field,
        )
    return "'" + value.replace("'", "''") + "'"


def select(
    module: str,
    fields: Sequence[str],
    *,
    where: str,
    order_by: str | None = None,
    limit: int | None = None,
) -> str:
    """``select f1, f2 from Module where … [order by f asc] [limit n]``; ``where`` comes
    from :func:`equals` or :func:`not_null`."""
    if not fields:
        raise ValueError("a COQL select needs at least one field")
    cols = ", ".join(name(f) for f in dict.fromkeys(fields))
    text = f"select {cols} from {name(module)} where {where}"
    if order_by is not None:
        text += f" order by {name(order_by)} asc"
    if limit is not None:
        if limit < 1:
            raise ValueError(f"a COQL limit must be positive, not {limit}")
        text += f" limit {int(limit)}"
    return text


def equals(field: str, value: str) -> str:
    """``Field = 'value'`` (a string comparison)."""
    return f"{name(field)} = {string(value, field=field)}"


#: values of one ``in`` comparison: "in (up to 50 values)" (Zoho's COQL-Limitations page)
IN_MAX_VALUES = 50


def one_of(field: str, values: Sequence[str]) -> str:
    """``Field in ('a', 'b', …)`` (string comparisons), at most :data:`IN_MAX_VALUES`."""
    if not 0 < len(values) <= IN_MAX_VALUES:
        raise ValueError(f"a COQL in takes 1..{IN_MAX_VALUES} values, not {len(values)}")
    return f"{name(field)} in ({', '.join(string(v, field=field) for v in values)})"


def not_null(field: str) -> str:
    """``field is not null`` (older COQL versions require a WHERE clause: this one matches all
    records with an id, see client.coql_pages)."""
    return f"{name(field)} is not null"
