"""Small PromQL helpers for the ops tests: which metric names an expression reads, the Grafana
variables made concrete, and the series names the switch's registry exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from switch.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana-dashboard.json"
ALERTS = ROOT / "ops" / "alerts.yml"
ALERT_TESTS = ROOT / "ops" / "alerts_test.yml"

#: Grafana's variables, replaced by what Prometheus itself accepts.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}

_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "inf", "nan"}
)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (functions, keywords, labels and strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\boffset\s+\w+", "", text)
    names = set()
    for m in _IDENT.finditer(text):
        name = m.group(0)
        following = text[m.end() :].lstrip()
        if following.startswith("(") or name.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d[\w]*", name):  # numbers and durations
            continue
        names.add(name)
    return names


def exposed_series_names(metrics: Metrics | None = None) -> set[str]:
    """Every series name a switch's registry can expose, by metric type (counter `_total`, histogram
    `_bucket`/`_sum`/`_count`, `_created` as prometheus-client adds it). Without `metrics`, a fresh
    registry with the processing core's counters exported, as a running switch has them."""
    if metrics is None:
        metrics = Metrics()
        metrics.export_processor_counters({})
    names: set[str] = set()
    family: Metric
    for family in metrics.registry.collect():
        base = family.name
        if family.type == "counter":
            names |= {base + "_total", base + "_created"}
        elif family.type == "histogram":
            names |= {base + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "summary":
            names |= {base, base + "_sum", base + "_count", base + "_created"}
        else:
            names.add(base)
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def panel_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", []) if "expr" in t]
