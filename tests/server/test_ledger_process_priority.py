"""The ledger writer process runs at a higher CPU priority than the switch when the switch may raise it
(every purchase waits for it twice; see ServerConfig.ledger_process_priority_steps), on every one of
its threads, and a switch that may not raise it (an unprivileged user) still starts and posts as before."""

from __future__ import annotations

import errno
import logging
import os
import resource
from pathlib import Path

import msgspec
import pytest

from switch.ledger.model import EntryKind
from switch.server import ledger_process
from switch.server.ledger_process import RemoteLedgerWriter
from switch.server.testbed import build
from tests.ledger.drafts import draft


@pytest.fixture
def config(tmp_path: Path):
    cfg, _ = build(tmp_path, {"alpha": 1}, packed_listener=False)
    return cfg


def _thread_nice_values(pid: int) -> list[int]:
    """The nice value of every thread of `pid` (/proc/<pid>/task/<tid>/stat, field 19)."""
    values = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        values.append(int(stat[stat.rindex(")") + 2 :].split()[16]))
    return values


def _may_raise(target_nice: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    lowest_allowed = 20 - soft if soft != resource.RLIM_INFINITY else -20
    return os.geteuid() == 0 or target_nice >= lowest_allowed


def test_every_thread_of_the_ledger_process_runs_above_the_switch_when_allowed(config) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    expected = max(-20, own - config.server.ledger_process_priority_steps)
    w = RemoteLedgerWriter(config)
    try:
        # a purchase through it: its writer and arm threads are up by now
        entries = w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        assert [e.seq for e in entries] == [0]
        nice = _thread_nice_values(w._proc.pid)
        assert len(nice) > 1, "the ledger process runs its writer on threads of its own"
        if _may_raise(expected):
            assert w.priority_raised
            assert set(nice) == {expected}
        else:
            assert not w.priority_raised
            assert set(nice) == {own}
    finally:
        w.close(30)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own, "the switch's own priority is left alone"


def test_a_switch_that_may_not_raise_it_starts_and_posts_as_before(
    config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(which: int, who: int, prio: int) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ledger_process.os, "setpriority", refused)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with caplog.at_level(logging.INFO, logger="switch.server.ledger_process"):
        w = RemoteLedgerWriter(config)
    try:
        assert not w.priority_raised
        assert "keeps the switch's CPU priority" in caplog.text
        entries = w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        assert [e.seq for e in entries] == [0]
        assert set(_thread_nice_values(w._proc.pid)) == {own}
    finally:
        w.close(30)


def test_zero_steps_leave_the_ledger_process_at_the_switch_priority(config) -> None:
    config = msgspec.structs.replace(
        config, server=msgspec.structs.replace(config.server, ledger_process_priority_steps=0)
    )
    own = os.getpriority(os.PRIO_PROCESS, 0)
    w = RemoteLedgerWriter(config)
    try:
        assert not w.priority_raised
        assert [
            e.seq for e in w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        ] == [0]
        assert set(_thread_nice_values(w._proc.pid)) == {own}
    finally:
        w.close(30)
