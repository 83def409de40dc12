"""ops/: the alert rules pass promtool (syntax and unit tests that make each alert fire), and the
Grafana dashboard parses, is well formed, asks only valid PromQL about metrics the switch exposes, and
shows every view an operator needs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.ops.prom import promtool
from tests.ops.promql import (
    ALERT_TESTS,
    ALERTS,
    concrete,
    dashboard,
    exposed_series_names,
    metric_names,
    panel_exprs,
    panels,
)


def _out(proc) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")


def test_alert_rules_pass_promtool_check() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, _out(proc)
    assert "SUCCESS" in _out(proc)


def test_alert_rules_fire_in_promtool_unit_tests() -> None:
    proc = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert proc.returncode == 0, _out(proc)


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: sum(rate(x[5m])\n")
    proc = promtool("check", "rules", str(bad))
    assert proc.returncode != 0


def test_alert_rules_name_only_exposed_metrics() -> None:
    exposed = exposed_series_names() | {"up"}
    named = set(re.findall(r"\bswitch_[a-z0-9_]+", ALERTS.read_text()))
    assert named, "no switch metric in ops/alerts.yml"
    assert named <= exposed, f"alerts name metrics the switch does not expose: {sorted(named - exposed)}"


def test_alert_rules_cover_the_operators_cases() -> None:
    text = ALERTS.read_text()
    for alert in (
        "SwitchAcquirerDown",
        "SwitchStoreForwardGrowing",
        "SwitchTerminalLatencyP99High",
        "SwitchDeclineRateSpike",
        "SwitchErrorRateHigh",
    ):
        assert f"alert: {alert}\n" in text, alert
        assert f"alertname: {alert}\n" in ALERT_TESTS.read_text(), f"{alert} has no promtool unit test"


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for p in panels(dash):
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], f"{p['title']}: {t['expr']} ignores the job variable"


def test_dashboard_exprs_name_only_exposed_metrics() -> None:
    exposed = exposed_series_names()
    for title, expr in panel_exprs(dashboard()):
        names = metric_names(concrete(expr))
        assert names, f"{title}: no metric in {expr}"
        assert names <= exposed, f"{title}: {sorted(names - exposed)} not exposed by the switch"


def test_metric_name_parser_finds_what_it_must() -> None:
    """The check above relies on this parser; it must see a misspelt metric and ignore functions."""
    expr = 'histogram_quantile(0.99, sum by (le, acquirer) (rate(switch_nope_bucket{a="x"}[5m]))) / up'
    assert metric_names(expr) == {"switch_nope_bucket", "up"}


def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (as recording rules, Grafana variables made concrete)."""
    rules = [
        {"record": f"dashboard:panel{i}", "expr": concrete(expr)}
        for i, (_, expr) in enumerate(panel_exprs(dashboard()))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, _out(proc)


def test_dashboard_shows_every_view_the_operators_need() -> None:
    exprs = [concrete(e) for _, e in panel_exprs(dashboard())]

    def some(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    assert some("switch_transactions_total", "by (response_code)"), "throughput by response code"
    for q in ("0.5", "0.99"):
        assert some(f"histogram_quantile({q}", "switch_terminal_latency_seconds_bucket"), f"terminal p{q}"
        assert some(f"histogram_quantile({q}", "switch_acquirer_latency_seconds_bucket", "acquirer"), q
    assert some("switch_acquirer_up"), "acquirer up"
    assert some("switch_acquirer_links", "state"), "acquirer link state"
    assert some("switch_saf_depth") and some("switch_saf_oldest_age_seconds"), "store-and-forward"
    assert some("switch_acquirer_timeouts_total") and some("switch_reversals_queued_total"), "timeouts"
    assert some("switch_mac_failures_total"), "MAC failures"
    assert some("switch_ledger_batch_entries_bucket") and some("switch_ledger_commit_latency_seconds_bucket")


def test_example_prometheus_config_loads_the_rules() -> None:
    """ops/prometheus.yml (the scrape config docs/operations.md shows) is valid and finds alerts.yml."""
    proc = promtool("check", "config", str(ALERTS.parent / "prometheus.yml"))
    assert proc.returncode == 0, _out(proc)
    assert f"{ALERTS.read_text().count('- alert: ')} rules found" in _out(proc)


def test_a_missing_binary_fails_with_the_install_command() -> None:
    """Without the Debian package the ops tests fail (never skip) and say how to install it."""
    import pytest

    from tests.ops.prom import binary

    with pytest.raises(pytest.fail.Exception, match=r"scripts/system-deps\.sh"):
        binary("promtool-that-is-not-installed")
