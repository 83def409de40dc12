"""Fixtures of the simulator tests: `sim_port` runs `switch acquirer sim` (terminal profile, so the
`switch terminal` command can talk to it directly) in its own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def sim_port(tmp_path: Path):
    cfg = tmp_path / "sim.toml"
    cfg.write_text('profile = "terminal_ascii"\nbalances = { "4000000000000002" = 100 }\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "switch", "acquirer", "sim", "--port", "0", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
