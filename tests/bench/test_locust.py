"""bench/locustfile.py for real: `locust --headless` against a switch started as its own process
(`switch run` with two `switch acquirer sim` processes, bench/e2e.py's TestBed) for a few seconds; its
JSON statistics must show every transaction type succeeding and no failure at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.bedloader import ROOT, e2e

#: Users (= terminals, one connection each) and run length; short so the test stays cheap.
USERS = 4
RUN_S = 5
#: Longest the locust process may take (start, run, stop).
LOCUST_TIMEOUT_S = 90


def _locust(bed, run_s: int = RUN_S) -> subprocess.CompletedProcess:
    argv = [
        str(Path(sys.executable).with_name("locust")),
        "-f", str(ROOT / "bench" / "locustfile.py"),
        "--headless", "-u", str(USERS), "-r", str(USERS), "-t", f"{run_s}s",
        "--stop-timeout", "5", "--only-summary", "--json", "--skip-log-setup",
        "--switch-config", str(bed.config_path),
    ]  # fmt: skip
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S, cwd=ROOT, check=False
    )


def test_locust_mix_against_a_running_switch(tmp_path: Path) -> None:
    # Half the terminals on each listener: the ASCII profile and the packed (BCD + TPDU) one.
    with e2e.TestBed(tmp_path, terminals=USERS // 2, packed=True) as bed:
        proc = _locust(bed)
        metrics = e2e.scrape(bed.metrics_port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = {s["name"]: s for s in json.loads(proc.stdout)}
    assert set(stats) == {"sign_on", "purchase", "refund", "void", "inquiry"}, sorted(stats)
    assert stats["sign_on"]["num_requests"] == USERS
    for name, s in stats.items():
        assert s["method"] == "ISO8583"
        assert s["num_failures"] == 0, (name, s)
        assert s["num_requests"] > 0, name
    assert stats["purchase"]["num_requests"] > stats["refund"]["num_requests"]
    # What locust counted is what the switch answered: approved purchases on the switch's own metrics.
    approved = metrics[
        ("switch_transactions_total", (("mti", "0200"), ("processing_code", "00"), ("response_code", "00")))
    ]
    assert approved == stats["purchase"]["num_requests"]
    # Every terminal of the config signed on, so both profiles (users take terminals in config order).
    assert {t.profile for t in bed.config.terminals} == {"terminal_ascii", "terminal_packed"}
    assert len(bed.config.terminals) == USERS
    assert metrics[("switch_sign_ons_total", ())] == USERS


def test_locust_reports_failures_it_cannot_hide(tmp_path: Path) -> None:
    """The check above can fail: with one terminal fewer than users, the extra user's sign-on is
    reported as a failure that names the cause, and locust exits non-zero."""
    with e2e.TestBed(tmp_path, terminals=USERS - 1) as bed:
        proc = _locust(bed, run_s=2)
    assert proc.returncode != 0
    stats = {s["name"]: s for s in json.loads(proc.stdout)}
    assert stats["sign_on"]["num_failures"] == 1
    assert stats["sign_on"]["num_requests"] == USERS
    assert stats["purchase"]["num_failures"] == 0
    assert "user stopped: more users than terminals (3) in the config" in proc.stderr


def test_locust_refuses_bad_options_with_one_clear_line(tmp_path: Path) -> None:
    import msgspec

    from switch.server.testbed import build

    config, _ = build(tmp_path, {"alpha": 6001, "beta": 6002}, terminals_per_listener=1)
    path = tmp_path / "switch.toml"
    path.write_text(e2e.toml_dumps(msgspec.to_builtins(config)))
    for option, message in (
        (["--mix", "purchase=x"], "--mix: 'purchase=x' is not kind=weight"),
        (["--switch-ports", "ascii=port"], "--switch-ports: 'ascii=port' is not listener=port"),
        (["--switch-config", str(tmp_path / "missing.toml")], "cannot read config"),
    ):
        argv = [
            str(Path(sys.executable).with_name("locust")), "-f", str(ROOT / "bench" / "locustfile.py"),
            "--headless", "-u", "1", "-t", "1s", "--skip-log-setup", "--switch-config", str(path), *option,
        ]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S, check=False)
        assert proc.returncode == 2, (option, proc.stderr[-2000:])
        assert f"locustfile: {message}" in proc.stderr, (option, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
