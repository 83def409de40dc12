"""bench/e2e.py for real, briefly: the switch, two acquirer simulators and two load-generator processes;
it must show progress, print its table, and end with the one JSON object the issue defines, with no
error and a verified ledger holding exactly the approvals the terminals saw. (Speed is not asserted
here: the numbers are for docs/operations.md; this checks the bench is correct and runnable.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.bedloader import ROOT, e2e

BENCH_TIMEOUT_S = 180


def test_e2e_bench_runs_and_ends_with_its_json(tmp_path: Path) -> None:
    argv = [
        sys.executable, str(ROOT / "bench" / "e2e.py"),
        "--seconds", "1", "--warmup-seconds", "0", "--terminals", "4", "--loadgens", "2", "--window", "4",
        "--dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("auth_per_s", "p50_ms", "p99_ms", "p99_ms_at_half_load", "errors", "ledger_verified"):
        assert key in result, key
    assert result["errors"] == 0
    assert result["ledger_verified"] is True
    assert result["auth_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["interpreter"]["executable"] == sys.executable
    assert "[max]" in proc.stderr and "[fixed]" in proc.stderr, "no progress lines"
    assert "approved/s" in proc.stderr, "no table"
    assert "ledger:" in proc.stderr and "matches the approvals" in proc.stderr
    # the fixed run is at half the target's rate, or half the max when the max is below the target
    half_max = max(1, round(result["auth_per_s"] / 2))
    assert abs(result["offered_half_load_per_s"] - min(e2e.TARGET_AUTH_PER_S / 2, half_max)) <= 1


def test_e2e_bench_fixed_only_runs_at_the_given_rate(tmp_path: Path) -> None:
    argv = [
        sys.executable, str(ROOT / "bench" / "e2e.py"),
        "--seconds", "1", "--warmup-seconds", "0", "--terminals", "4", "--loadgens", "1",
        "--rate", "200", "--fixed-only", "--dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["offered_half_load_per_s"] == 200 and result["errors"] == 0 and result["ledger_verified"]
    assert "[fixed]" in proc.stderr and "[max]" not in proc.stderr


def test_toml_writer_round_trips_a_switch_config(tmp_path: Path) -> None:
    """The bench hands `switch run` a TOML written by e2e.toml_dumps: it must load back identical."""
    import msgspec

    from switch.config import load_config
    from switch.server.testbed import build

    config, _ = build(tmp_path, {"alpha": 6001, "beta": 6002}, terminals_per_listener=2, metrics_enabled=True)
    path = tmp_path / "switch.toml"
    path.write_text(e2e.toml_dumps(msgspec.to_builtins(config)))
    assert load_config(path) == config


def test_the_harness_runs_below_the_switchs_priority(tmp_path: Path) -> None:
    """--harness-nice: the acquirer simulators (and load generators, by the same hook) run that many
    nice steps below the switch, so the kernel serves the switch first when both are ready."""
    import os

    bed = e2e.TestBed(tmp_path, terminals=1, harness_nice=3)
    with bed:
        assert bed.switch is not None
        switch_nice = os.getpriority(os.PRIO_PROCESS, bed.switch.popen.pid)
        sims = [p for p in bed.procs if p.name.startswith("acquirer-")]
        assert len(sims) == 2
        for sim in sims:
            assert os.getpriority(os.PRIO_PROCESS, sim.popen.pid) == switch_nice + 3, sim.name
        assert switch_nice == os.getpriority(os.PRIO_PROCESS, 0)  # the switch keeps ours
