"""The ledger writer in its own process (switch.server.ledger_process.RemoteLedgerWriter) keeps the
in-process writer's contract: entries numbered and durable before on_done, idempotent repeats answered
with the originals, rule and conflict errors delivered as their ledger classes, state kept across a
restart, and a dead child never reported as success."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from switch.ledger.codec import decode_draft
from switch.ledger.model import EntryKind, IdempotencyConflict
from switch.ledger.rules import LedgerRejected
from switch.ledger.sqlite import SqliteBackend
from switch.ledger.writer import LedgerUnavailable
from switch.server.ledger_process import RemoteLedgerWriter
from switch.server.testbed import build
from tests.ledger.drafts import draft


@pytest.fixture
def config(tmp_path: Path):
    cfg, _ = build(tmp_path, {"alpha": 1}, packed_listener=False)
    return cfg


def _stored(config) -> list:
    b = SqliteBackend(config.ledger.path, create=False)
    try:
        return [decode_draft(r.body) for r in b.iter_entry_rows(0)]
    finally:
        b.close()


def test_entries_are_durable_numbered_and_repeats_return_the_originals(config) -> None:
    w = RemoteLedgerWriter(config)
    try:
        first = w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        second = w.append([draft("k2", EntryKind.PURCHASE, "000000000002", 700)], timeout_s=30)
        assert [e.seq for e in first + second] == [0, 1]
        assert second[0].draft.amount_minor == 700
        # the same key and payload again: the original entry, nothing new written
        again = w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        assert [e.seq for e in again] == [0]
        assert w.size == 2
        # many submissions in one message, answered each on its own
        done: list = []
        finished = threading.Event()

        def on_done(entries, error) -> None:
            done.append((entries, error))
            if len(done) == 3:
                finished.set()

        w.submit_many(
            [([draft(f"m{i}", EntryKind.PURCHASE, f"00000000001{i}", 100 + i)], on_done) for i in range(3)]
        )
        w.flush()  # one message for the three
        assert finished.wait(30)
        assert sorted(e[0][0].seq for e in done) == [2, 3, 4]
    finally:
        w.close(30)
    assert [d.idempotency_key for d in _stored(config)] == ["k1", "k2", "m0", "m1", "m2"]


def test_errors_arrive_as_their_ledger_classes(config) -> None:
    w = RemoteLedgerWriter(config)
    try:
        w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        with pytest.raises(IdempotencyConflict):  # same key, different payload
            w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 501)], timeout_s=30)
        with pytest.raises(LedgerRejected):  # refund above the original
            w.append([draft("r1", EntryKind.REFUND, "000000000009", 900, "000000000001")], timeout_s=30)
        ok = w.append([draft("k3", EntryKind.PURCHASE, "000000000003", 5)], timeout_s=30)
        assert ok[0].seq == 1  # the failures wrote nothing
    finally:
        w.close(30)


def test_a_restarted_process_continues_the_ledger(config) -> None:
    w = RemoteLedgerWriter(config)
    w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
    w.close(30)
    w = RemoteLedgerWriter(config)
    try:
        assert w.size == 1
        assert w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)[0].seq == 0
        assert w.append([draft("k2", EntryKind.PURCHASE, "000000000002", 5)], timeout_s=30)[0].seq == 1
    finally:
        w.close(30)


def test_a_dead_child_fails_pending_and_later_submissions(config) -> None:
    w = RemoteLedgerWriter(config)
    try:
        w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)
        w._proc.kill()
        w._proc.join(10)
        with pytest.raises(LedgerUnavailable):
            w.append([draft("k2", EntryKind.PURCHASE, "000000000002", 5)], timeout_s=30)
        with pytest.raises(LedgerUnavailable):
            w.submit([draft("k3", EntryKind.PURCHASE, "000000000003", 5)], lambda e, err: None)
    finally:
        w.close(5)
    assert [d.idempotency_key for d in _stored(config)] == ["k1"]


def test_a_ledger_that_cannot_open_is_a_clear_start_error(config, tmp_path: Path) -> None:
    import msgspec

    bad = msgspec.structs.replace(
        config, ledger=msgspec.structs.replace(config.ledger, checkpoint_key_file=str(tmp_path / "missing"))
    )
    with pytest.raises(LedgerUnavailable, match="ledger writer process"):
        RemoteLedgerWriter(bad)


def test_arms_are_durable_in_the_child_before_their_callback(config) -> None:
    from switch.codec import keys as keymod
    from switch.server.armed import ArmedStore

    w = RemoteLedgerWriter(config)
    try:
        got: list = []
        armed = threading.Event()
        reversal = {"t": "0400", "2": "4000000000000002", "37": "000000000001", "52": "AB" * 8}
        w.arm(
            [("alpha", "000000000001", reversal), ("alpha", "000000000002", reversal)],
            5,
            lambda e, v: (got.append(e), armed.set()),
        )
        w.release([("alpha", "000000000002")])
        w.flush()
        assert armed.wait(30) and got == [None]
        store = ArmedStore(config.server.armed_path, kek=keymod.load_kek(config.keys))
        try:
            rows = store.all()
        finally:
            store.close()
        assert [(r[1], "52" in r[2]) for r in rows] == [("000000000001", False)]
    finally:
        w.close(30)


def _armed_rrns(config) -> list[str]:
    from switch.codec import keys as keymod
    from switch.server.armed import ArmedStore

    store = ArmedStore(config.server.armed_path, kek=keymod.load_kek(config.keys))
    try:
        return sorted(r[1] for r in store.all())
    finally:
        store.close()


def test_arms_and_releases_of_messages_sent_back_to_back_apply_in_order(config) -> None:
    """The child writes the arms of every message it has read in one group: each flush still gets its
    own answer, and a release sent after its arm (next message) removes it, never the other way."""
    w = RemoteLedgerWriter(config)
    try:
        answered: list = []
        done = threading.Semaphore(0)
        reversal = {"t": "0400", "2": "4000000000000002", "37": "000000000001"}
        for n in range(1, 31):
            w.arm([("alpha", f"{n:012d}", reversal)], n, lambda e, v: (answered.append(e), done.release()))
            if n % 3 == 0:  # released in the message right after its arm's
                w.release([("alpha", f"{n - 2:012d}")])
            w.submit_many([([draft(f"k{n}", EntryKind.PURCHASE, f"{n:012d}", 100 + n)], lambda e, err: None)])
            w.flush()
        for _ in range(30):
            assert done.acquire(timeout=30)
        assert answered == [None] * 30
        w.append([draft("last", EntryKind.PURCHASE, "000000000099", 1)], timeout_s=30)
    finally:
        w.close(30)
    released = {f"{n - 2:012d}" for n in range(3, 31, 3)}
    assert _armed_rrns(config) == sorted(f"{n:012d}" for n in range(1, 31) if f"{n:012d}" not in released)
    assert len(_stored(config)) == 31


def _run_and_exit_without_close(config, tmp_path: Path, body: str) -> None:
    """Run `body` in a fresh interpreter that has a RemoteLedgerWriter `w` on `config` and exits
    without close() or any wait (the switch dying right after its last call)."""
    import subprocess
    import sys

    import msgspec

    cfg_file = tmp_path / "cfg.msgpack"
    cfg_file.write_bytes(msgspec.msgpack.encode(config))
    script = (
        "import msgspec, sys\n"
        "from switch.config import SwitchConfig\n"
        "from switch.server.ledger_process import RemoteLedgerWriter\n"
        "from tests.ledger.drafts import draft\n"
        "from switch.ledger.model import EntryKind\n"
        "if __name__ == '__main__':\n"
        "    cfg = msgspec.msgpack.decode(open(sys.argv[1], 'rb').read(), type=SwitchConfig)\n"
        "    w = RemoteLedgerWriter(cfg)\n"
    ) + "".join(f"    {line}\n" for line in body.splitlines())
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [sys.executable, "-c", script, str(cfg_file)], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr


def test_exit_without_close_writes_the_last_messages_arms_and_posts(config, tmp_path: Path) -> None:
    """The switch dies right after a flush: the child still writes that message's arms and posts."""
    _run_and_exit_without_close(
        config,
        tmp_path,
        """\
for n in (1, 2, 3):
    w.arm([('alpha', f'{n:012d}', {'t': '0400', '37': f'{n:012d}'})], n, lambda e, v: None)
    d = draft(f'k{n}', EntryKind.PURCHASE, f'{n:012d}', 5)
    w.submit_many([([d], lambda e, err: None)])
    w.flush()""",
    )
    assert _armed_rrns(config) == ["000000000001", "000000000002", "000000000003"]
    assert [d.idempotency_key for d in _stored(config)] == ["k1", "k2", "k3"]


def test_signals_to_the_process_group_leave_the_child_to_the_switch(config) -> None:
    import os
    import signal

    w = RemoteLedgerWriter(config)
    try:
        os.kill(w._proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        os.kill(w._proc.pid, signal.SIGTERM)  # and so does a service manager's stop
        assert w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)[0].seq == 0
    finally:
        w.close(30)
    assert w._proc.exitcode == 0


def test_exit_without_close_commits_what_was_submitted(config, tmp_path: Path) -> None:
    submit = "w.submit([draft('late', EntryKind.PURCHASE, '000000000009', 5)], lambda e, err: None)"
    _run_and_exit_without_close(config, tmp_path, submit)  # exits with the submission queued
    assert [d.idempotency_key for d in _stored(config)] == ["late"]


def test_results_read_by_the_event_loop_after_attach_pump(config) -> None:
    """attach_pump: the thread stops, the caller reads (trio does, switch.server.core.ledger_pump):
    results arrive only through pump(), a blocking append on the pumping thread reads for itself,
    and a dead child makes pump() report it and fail what is pending."""
    import select

    w = RemoteLedgerWriter(config)
    try:
        w.append([draft("k1", EntryKind.PURCHASE, "000000000001", 500)], timeout_s=30)  # the thread
        sock = w.attach_pump()
        done: list = []
        w.submit([draft("k2", EntryKind.PURCHASE, "000000000002", 700)], lambda e, err: done.append((e, err)))
        for _ in range(300):  # nobody else reads now: nothing arrives until we pump
            if done:
                break
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready:
                assert w.pump()
        assert [e.seq for e in done[0][0]] == [1] and done[0][1] is None
        # a blocking append from the pumping thread itself pumps until answered
        again = w.append([draft("k3", EntryKind.PURCHASE, "000000000003", 5)], timeout_s=30)
        assert [e.seq for e in again] == [2]
        failed: list = []
        w._proc.kill()
        w._proc.join(10)
        w.submit([draft("k4", EntryKind.PURCHASE, "000000000004", 9)], lambda e, err: failed.append(err))
        for _ in range(300):
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready and not w.pump():
                break
        assert failed and isinstance(failed[0], LedgerUnavailable)
        with pytest.raises(LedgerUnavailable):
            w.submit([draft("k5", EntryKind.PURCHASE, "000000000005", 9)], lambda e, err: None)
    finally:
        w.close(30)
    assert [d.idempotency_key for d in _stored(config)] == ["k1", "k2", "k3"]
