"""One ledger writer at a time on SQLite: a second writer is refused naming the holder, the lock goes
with the holder (closed or killed), and readers are never blocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from switch.config import LedgerConfig
from switch.ledger.factory import open_backend, open_writer
from switch.ledger.writer_lock import WriterLocked

HOLD = """
import sys, time
from switch.config import LedgerConfig
from switch.ledger.factory import open_backend
b = open_backend(LedgerConfig(path=sys.argv[1]), writer=True)
print("held", flush=True)
time.sleep(60)
"""


def test_second_writer_refused_until_the_first_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWITCH_CHECKPOINT_KEY", "11" * 32)
    cfg = LedgerConfig(path=str(tmp_path / "ledger.db"))
    first = open_writer(cfg)
    with pytest.raises(WriterLocked, match=rf"pid {os.getpid()}.*admin API"):
        open_writer(cfg)
    reader = open_backend(cfg, create=False)  # readers never take the lock
    assert reader.entry_count() == 0
    reader.close()
    first.close()
    second = open_writer(cfg)  # released with the first writer's backend
    second.close()


def test_lock_names_another_process_and_dies_with_it(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, db], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(WriterLocked, match=rf"pid {holder.pid}"):
            open_backend(LedgerConfig(path=db), writer=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    # Killed without any cleanup: the kernel dropped the lock, nothing stale is left.
    open_backend(LedgerConfig(path=db), writer=True).close()
