"""What a converter did with a value, comparable across two converters (the fast paths' tests)."""

from __future__ import annotations

from typing import Any

from connector.errors import DataError


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """``fn(*args)``'s value, or the error it raised, in a form equal only when both are."""
    try:
        out = fn(*args)
    except DataError as exc:
        return ("DataError", (exc.code, str(exc), exc.field))
    except (ValueError, TypeError, OverflowError) as exc:
        return (type(exc).__name__, str(exc))
    # exact: same type and same text (Decimal('1.50') is not Decimal('1.5'))
    return ("value", (type(out).__name__, repr(out)))
