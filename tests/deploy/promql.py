"""Helpers shared by the deploy tests (and by the runtime's scrape test): metric names in
PromQL expressions, and the repository's deploy files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# PromQL words that look like identifiers but are not metric names
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
        # aggregations
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_TEMPLATE_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]+)"')


def metric_names_in_promql(expr: str) -> set[str]:
    """The metric names an expression selects (``__name__="x"`` matchers included).

    Function names (an identifier followed by ``(``), keywords, label names in grouping
    clauses and matchers, durations, strings and Grafana variables (``$job``,
    ``$__rate_interval``) are not metric names.
    """
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = _TEMPLATE_VAR.sub("1", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for m in _IDENT.finditer(text):
        word = m.group(1)
        rest = text[m.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function call
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names
