"""The switch's metrics, checked for real: a running switch (switch.server.app.serve with two acquirer
simulators, tests/e2e/harness.py) answers real terminal transactions over TCP, then

- its /metrics exposition passes `promtool check metrics`, shows no card number and no per-terminal
  label (the set of series does not grow when more terminals transact);
- a real Prometheus server scrapes it, and the series read back through /api/v1/query hold exactly the
  counts the terminals saw; every dashboard query and every alert rule evaluates without error.

The blocking parts (HTTP, promtool, Prometheus) run in a worker thread so the switch keeps serving on
the trio thread meanwhile.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from switch.server.testbed import ALPHA_BIN, BETA_BIN, card
from tests.e2e.harness import Harness, running_switch, signed_on, trio_test
from tests.ops.prom import promtool, running_prometheus, wait_for
from tests.ops.promql import ALERTS, concrete, dashboard, panel_exprs

#: Label names the switch may use: bounded sets only (never a terminal, merchant, card or STAN).
ALLOWED_LABELS = frozenset(
    {
        "mti",
        "processing_code",
        "response_code",
        "acquirer",
        "listener",
        "state",
        "limit",
        "outcome",
        "side",
        "le",
    }
)
#: Amounts above this are declined 61 by the simulated acquirer.
APPROVE_MAX_MINOR = 5_000
#: Longest wait for Prometheus to scrape what the switch counted.
SCRAPE_WAIT_S = 20.0


def fetch_exposition(port: int) -> tuple[str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.headers["Content-Type"], resp.read()


def series_keys(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def _mix(h: Harness, index: int, first_card: int) -> None:
    """On terminal `index`: sign on, 3 approved purchases (alpha), 1 declined (61), 1 on beta, 1 inquiry."""
    async with signed_on(h, index) as term:
        codes = []
        for i in range(3):
            codes.append((await term.purchase(card(ALPHA_BIN, first_card + i), 1_000 + i)).response_code)
        codes.append(
            (await term.purchase(card(ALPHA_BIN, first_card + 3), APPROVE_MAX_MINOR + 1)).response_code
        )
        codes.append((await term.purchase(card(BETA_BIN, first_card + 4), 2_000)).response_code)
        codes.append((await term.balance_inquiry(card(ALPHA_BIN, first_card + 5))).response_code)
    assert codes == ["00", "00", "00", "61", "00", "00"], codes


def _sims() -> dict[str, dict[str, Any]]:
    return {"alpha": {"approve_max_minor": APPROVE_MAX_MINOR}, "beta": {}}


@trio_test
async def test_exposition_passes_promtool_and_shows_no_card_or_terminal(tmp_path: Path) -> None:
    async with running_switch(tmp_path, sims=_sims(), metrics_enabled=True) as h:
        await _mix(h, 0, first_card=1)
        ctype, body = await trio.to_thread.run_sync(fetch_exposition, h.ports.metrics)
        one_terminal = series_keys(body.decode())
        # Three more terminals (both listeners), other cards: no new series may appear.
        for index, first in ((1, 100), (2, 200), (len(h.terminals) - 1, 300)):
            await _mix(h, index, first_card=first)
        _, body_after = await trio.to_thread.run_sync(fetch_exposition, h.ports.metrics)
        proc = await trio.to_thread.run_sync(lambda: promtool("check", "metrics", stdin=body_after))

    assert ctype.startswith("text/plain"), ctype
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    text = body_after.decode()
    assert series_keys(text) == one_terminal, "series depend on which terminals transacted"
    label_names = {name for _, labels in one_terminal for name, _ in labels}
    assert label_names <= ALLOWED_LABELS, sorted(label_names - ALLOWED_LABELS)
    pans = [card(b, n) for b in (ALPHA_BIN, BETA_BIN) for n in range(1, 310)]
    for secret in [*pans, *(t.terminal_id for t in h.terminals), *(t.merchant_id for t in h.terminals)]:
        assert secret not in text
    for _, labels in one_terminal:
        for _, value in labels:
            assert not re.search(r"\d{12,}", value), f"long digit run in a label value: {value!r}"
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    approved_key = (
        "switch_transactions_total",
        (("mti", "0200"), ("processing_code", "00"), ("response_code", "00")),
    )
    # The counts are the terminals' own: 4 terminals x 4 approved purchases (3 alpha + 1 beta).
    assert values[approved_key] == 16
    assert values[("switch_sign_ons_total", ())] == 4


def test_promtool_check_metrics_rejects_a_bad_exposition() -> None:
    """The promtool check above can fail: a counter without `_total` and a malformed line are refused."""
    bad = b"# TYPE requests counter\nrequests 1\nthis is not a metric line\n"
    assert promtool("check", "metrics", stdin=bad).returncode != 0


def _scalar(answer: dict[str, Any]) -> float | None:
    if answer.get("status") != "success" or not answer["data"]["result"]:
        return None
    return float(answer["data"]["result"][0]["value"][1])


def _check_with_prometheus(directory: Path, metrics_port: int) -> None:
    with running_prometheus(directory, [f"127.0.0.1:{metrics_port}"], rule_files=(ALERTS,)) as prom:
        wait_for(
            lambda: any(t["health"] == "up" for t in prom.targets()),
            SCRAPE_WAIT_S,
            "the switch target to be up",
        )
        approved = (
            'switch_transactions_total{job="switch",mti="0200",processing_code="00",response_code="00"}'
        )
        assert wait_for(lambda: _scalar(prom.query(approved)), SCRAPE_WAIT_S, approved) == 4.0
        assert _scalar(prom.query('switch_transactions_total{response_code="61"}')) == 1.0
        assert _scalar(prom.query('switch_transactions_total{processing_code="31"}')) == 1.0
        assert _scalar(prom.query("sum(switch_sign_ons_total)")) == 2.0
        assert _scalar(prom.query('switch_terminal_latency_seconds_count{mti="0200"}')) == 7.0
        # The silent card: one timeout answered 68, one reversal queued and completed.
        assert _scalar(prom.query('switch_transactions_total{response_code="68"}')) == 1.0
        assert _scalar(prom.query('switch_acquirer_timeouts_total{acquirer="alpha"}')) == 1.0
        assert _scalar(prom.query('switch_reversals_queued_total{acquirer="alpha"}')) == 1.0
        completed = 'switch_reversals_completed_total{acquirer="alpha"}'
        assert wait_for(lambda: _scalar(prom.query(completed)), SCRAPE_WAIT_S, completed) == 1.0
        wait_for(lambda: _scalar(prom.query("switch_saf_depth")) == 0.0, SCRAPE_WAIT_S, "SAF depth 0")
        assert _scalar(prom.query('switch_acquirer_up{acquirer="alpha"}')) == 1.0
        assert _scalar(prom.query('switch_acquirer_links{acquirer="beta",state="up"}')) >= 1.0
        assert _scalar(prom.query('sum(switch_acquirer_latency_seconds_count{acquirer="alpha"})')) >= 5.0
        assert _scalar(prom.query("switch_ledger_sequence")) >= 4.0
        assert _scalar(prom.query('up{job="switch"}')) == 1.0
        # Every dashboard query runs (rates need two scrapes; wait until the first one has data).
        first_rate = concrete(panel_exprs(dashboard())[0][1])
        wait_for(lambda: prom.query(first_rate)["data"]["result"], SCRAPE_WAIT_S, first_rate)
        for title, expr in panel_exprs(dashboard()):
            answer = prom.query(concrete(expr))
            assert answer["status"] == "success", f"{title}: {expr}: {answer}"
        # Every alert rule has been evaluated on the real series, without error; nothing is firing.
        rules = wait_for(
            lambda: (
                [r for r in prom.rules() if r.get("lastEvaluation", "").startswith("0001")] == []
                and prom.rules()
            ),
            SCRAPE_WAIT_S,
            "every alert rule to be evaluated",
        )
        assert len(rules) == ALERTS.read_text().count("- alert: ")
        for rule in rules:
            assert rule["health"] == "ok", rule
            assert rule["state"] == "inactive", rule


#: A card the simulated acquirer alpha never answers: the terminal hears 68, a reversal is queued and
#: delivered by store-and-forward.
SILENT_CARD = card(ALPHA_BIN, 999)


@trio_test
async def test_real_prometheus_scrapes_the_switch_and_reads_series_back(tmp_path: Path) -> None:
    sims = _sims()
    sims["alpha"]["card_faults"] = {SILENT_CARD: "no_answer"}
    async with running_switch(tmp_path / "switch", sims=sims, metrics_enabled=True) as h:
        await _mix(h, 0, first_card=1)
        async with signed_on(h, 1) as term:
            assert (await term.purchase(SILENT_CARD, 1_500)).response_code == "68"
        with trio.fail_after(10):
            while not h.sims["alpha"].records.reversals:  # store-and-forward delivered the 0400
                await trio.sleep(0.02)
        await trio.to_thread.run_sync(_check_with_prometheus, tmp_path / "prometheus", h.ports.metrics)
