"""`switch demo` finishes by itself, exits 0 when healthy and ends with the JSON summary."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_and_prints_json_last() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "switch", "demo", "--seconds", "2", "--terminals", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert any("txns" in line for line in lines)  # progress lines while it ran
    summary = json.loads(lines[-1])
    for key in ("approved", "timeouts", "reversals_pending", "double_postings", "ledger_verified"):
        assert key in summary
    assert summary["approved"] > 0
    assert summary["ledger_verified"] is True
    assert summary["double_postings"] == 0
    assert summary["reversals_pending"] == 0
