"""`deploy/grafana/tokengate.json`, the Grafana dashboard: the metric names its PromQL queries,
and the names a `/metrics` page exposes, for the tests that hold one to the other (the gateway
and the simulator in tests/unit, real vLLM in tests/vllm)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.support import ROOT

__all__ = ["DASHBOARD", "dashboard_metrics", "exposed_names", "promql_metrics", "queries"]

DASHBOARD = ROOT / "deploy" / "grafana" / "tokengate.json"

# Words of PromQL that stand where a metric name could: operators, modifiers, keywords.
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
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# `by (a, b)`, `on(x)`, `group_left(y)`: label lists, not expressions.
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """The metric names `expr` selects: identifiers that are neither functions nor aggregations
    (followed by `(`), label names (in `{...}` or a `by (...)` list) nor keywords."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard: each panel's targets (rows' nested
    panels included) and each templating variable's query."""
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and query:
            text = query if isinstance(query, str) else query.get("query", "")
            yield f"variable {variable.get('name')!r}", text


def dashboard_metrics() -> dict[str, set[str]]:
    """Every metric name the dashboard queries, with where it does."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: dict[str, set[str]] = {}
    for where, expr in queries(dashboard):
        for name in promql_metrics(expr):
            found.setdefault(name, set()).add(where)
    return found


def exposed_names(metrics_text: str) -> set[str]:
    """The series names a Prometheus text page gives a server that scrapes it: every sample's
    name, and for each family its type's series even before it has a sample (a histogram's
    `_bucket`, `_sum` and `_count`; a counter's `_total`)."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            elif kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
