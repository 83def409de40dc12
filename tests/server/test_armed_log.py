"""The armed-reversal log (switch.server.armed): what a switch finds after a restart or a crash is
every arm it was told was durable and not released, never a reversal it did not arm; the two slot files
take turns without losing anything; released records are scrubbed; one process writes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from switch.codec.keys import Kek
from switch.codec.sealing import FieldSealer
from switch.config import ServerConfig
from switch.server import armed
from switch.server.armed import ArmedStore, ArmedStoreError

KEK = Kek(bytes(range(32)))
SMALL = armed.MIN_ARMED_SLOT_BYTES  # 64 KiB: a few hundred arms per slot, so the slots take turns


class Killed(BaseException):
    """The process dies here (raised from a patched step; BaseException: nothing catches it)."""


def killed(*args: object, **kwargs: object) -> bytes:
    raise Killed


def reversal(rrn: str) -> dict[str, str]:
    return {"t": "0400", "2": "4761739001010119", "4": "000000001000", "37": rrn, "52": "AB" * 8}


def rrn(i: int) -> str:
    return f"{i:012d}"


def rrns(store: ArmedStore) -> list[str]:
    return [r for _, r, _ in store.all()]


def test_arms_survive_a_reopen_in_arming_order_and_releases_remove_them(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK)
    store.arm_many([("alpha", rrn(3), reversal(rrn(3)))], now_ms=30)
    store.apply(
        [
            (True, ("alpha", rrn(1), reversal(rrn(1)), 10)),
            (True, ("beta", rrn(2), reversal(rrn(2)), 20)),
            (False, ("alpha", rrn(1))),
            (True, ("alpha", rrn(4), None, 40)),  # a request without a reversal arms nothing
        ]
    )
    assert len(store) == 2
    store.close()
    reopened = ArmedStore(path, kek=KEK)
    assert [(a, r) for a, r, _ in reopened.all()] == [("beta", rrn(2)), ("alpha", rrn(3))]
    assert reopened.all()[0][2] == {"t": "0400", "2": "4761739001010119", "4": "000000001000", "37": rrn(2)}
    reopened.release_many([("beta", rrn(2)), ("alpha", rrn(3)), ("alpha", rrn(99))])  # 99: never armed
    reopened.close()
    assert rrns(ArmedStore(path, kek=KEK)) == []


def test_the_slots_take_turns_without_losing_an_arm_and_scrub_what_was_released(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    expected: set[str] = set()
    for i in range(3_000):  # ~300 bytes per arm: about a dozen moves between the two slots
        ops: list = [(True, ("alpha", rrn(i), reversal(rrn(i)), i))]
        if i >= 5:
            ops.append((False, ("alpha", rrn(i - 5))))  # five in flight, as on a quiet link
            expected.discard(rrn(i - 5))
        store.apply(ops)
        expected.add(rrn(i))
    generation = store._epoch[0]
    assert generation > 10, "the test should have made the slots take turns"
    store.close()
    assert set(rrns(ArmedStore(path, kek=KEK, slot_bytes=SMALL))) == expected
    # the slot not in use holds no record: what was released there was overwritten with zeros
    slots = [Path(f"{path}{suffix}").read_bytes() for suffix in armed.SLOT_SUFFIXES]
    epochs = [armed._header_epoch(raw[: armed.HEADER_BYTES]) for raw in slots]
    current = max((0, 1), key=lambda i: epochs[i][0])  # type: ignore[index]
    assert epochs[current][0] == generation  # type: ignore[index]
    other = slots[1 - current]
    assert other[armed.HEADER_BYTES :] == bytes(len(other) - armed.HEADER_BYTES)


def test_a_live_set_larger_than_a_slot_grows_the_slot(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    store.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)) for i in range(600)])  # ~180 KB at once
    store.close()
    assert len(rrns(ArmedStore(path, kek=KEK, slot_bytes=SMALL))) == 600
    assert max(p.stat().st_size for p in tmp_path.glob("armed.db*")) > SMALL


def test_a_torn_last_write_ends_the_log_and_keeps_everything_before_it(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"  # the first generation is in this slot file
    store = ArmedStore(path, kek=KEK)
    store.arm_many([("alpha", rrn(1), reversal(rrn(1)))], 1)
    store.arm_many([("alpha", rrn(2), reversal(rrn(2)))], 2)
    end_of_second = store._head
    store.close()
    with open(path, "r+b") as f:  # the crash tore the second record: its last bytes never arrived
        f.seek(end_of_second - 40)
        f.write(bytes(40))
    reopened = ArmedStore(path, kek=KEK)
    assert rrns(reopened) == [rrn(1)]
    reopened.arm_many([("alpha", rrn(3), reversal(rrn(3)))], 3)
    reopened.close()
    assert rrns(ArmedStore(path, kek=KEK)) == [rrn(1), rrn(3)]


def test_records_behind_a_hole_left_by_a_crash_never_come_back(tmp_path: Path) -> None:
    """Power lost during the sync of a group [2, 3]: 3's bytes reached the disk, 2's did not. Neither
    was acknowledged. Reading stops at the hole; the next writer must not let 3 (or a release behind
    the hole) become readable by filling the hole with a record of the same length."""
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK)
    store.arm_many([("alpha", rrn(1), reversal(rrn(1)))], 1)
    start_of_second = store._head
    store.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)) for i in (2, 3)])
    store.close()
    with open(path, "r+b") as f:
        f.seek(start_of_second)
        f.write(bytes(200))  # record 2 never reached the disk
    after_crash = ArmedStore(path, kek=KEK)
    assert rrns(after_crash) == [rrn(1)]
    after_crash.arm_many([("alpha", rrn(4), reversal(rrn(4)))], 4)  # same length as record 2
    after_crash.close()
    assert rrns(ArmedStore(path, kek=KEK)) == [rrn(1), rrn(4)]


def test_a_rotation_cut_before_its_header_is_never_read_later(tmp_path: Path, monkeypatch) -> None:
    """Killed between a rotation's body sync and its header: the old slot stays current. A later
    rotation into the same slot with the same generation number must not read the dead body's
    records (they would bring released reversals back)."""
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    store.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)) for i in range(100)])

    monkeypatch.setattr(armed, "_header", killed)
    with pytest.raises(Killed):
        for i in range(1_000, 10_000):  # traffic until the slot is full and a rotation starts
            store.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)), (False, ("alpha", rrn(i)))])
    monkeypatch.undo()
    store.close()  # the process is gone: its files and lock with it
    after_kill = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    assert len(after_kill) == 100
    after_kill.release_many([("alpha", rrn(i)) for i in range(100)])  # their outcomes are durable
    after_kill.close()  # and a crash (or a stop) right there: the slot was full, this moved slots
    again = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    assert rrns(again) == []
    for i in range(20_000, 20_400):  # traffic moves the log on, across slots
        again.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)), (False, ("alpha", rrn(i)))])
    again.close()
    assert rrns(ArmedStore(path, kek=KEK, slot_bytes=SMALL)) == []


def test_a_first_header_torn_by_a_crash_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    ArmedStore(path, kek=KEK).close()
    path.write_bytes(b"SWARM" + bytes(armed.DEFAULT_SLOT_BYTES - 5))  # the header half written
    store = ArmedStore(path, kek=KEK)
    assert len(store) == 0
    store.arm_many([("alpha", rrn(1), reversal(rrn(1)))], 1)
    store.close()
    assert rrns(ArmedStore(path, kek=KEK)) == [rrn(1)]


CRASHER = textwrap.dedent(
    """
    import sys
    from switch.codec.keys import Kek
    from switch.server.armed import ArmedStore

    store = ArmedStore(sys.argv[1], kek=Kek(bytes(range(32))), slot_bytes=65536)
    fields = {"t": "0400", "2": "4761739001010119", "4": "000000001000"}
    i = 0
    while True:
        ops = [(True, ("alpha", f"{i:012d}", fields, i))]
        if i >= 3:
            ops.append((False, ("alpha", f"{i - 3:012d}")))
        store.apply(ops)
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
        i += 1
    """
)


@pytest.mark.parametrize("kill_after", [150, 700, 1_900])
def test_after_sigkill_every_acknowledged_arm_not_released_is_there_and_nothing_else(
    tmp_path: Path, kill_after: int
) -> None:
    """A process arms (and releases the arm three back) in a loop, across many slot moves, and is
    killed with SIGKILL mid-stream. Arm i was acknowledged when its line was printed; the release of
    i-3 went out in the same write as arm i."""
    path = tmp_path / "armed.db"
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if int(line) >= kill_after:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    last = max([kill_after, *(int(line) for line in proc.stdout.read().split())])  # lines still in the pipe
    found = {int(r) for r in rrns(ArmedStore(path, kek=KEK))}
    # the state after the last acknowledged write, or after the one in flight when the kill came
    assert found in ({last - 2, last - 1, last}, {last - 1, last, last + 1}), (last, sorted(found))


def test_one_process_writes_and_others_may_read(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    writer = ArmedStore(path, kek=KEK)
    writer.arm_many([("alpha", rrn(1), reversal(rrn(1)))], 1)
    reader = ArmedStore(path, kek=KEK)  # e.g. the switch at start-up, while its ledger process writes
    assert rrns(reader) == [rrn(1)]
    with pytest.raises(ArmedStoreError, match="in use by another process"):
        reader.arm_many([("alpha", rrn(2), reversal(rrn(2)))], 2)
    reader.close()
    writer.close()
    second = ArmedStore(path, kek=KEK)  # the lock went with the writer
    second.arm_many([("alpha", rrn(2), reversal(rrn(2)))], 2)
    assert rrns(second) == [rrn(1), rrn(2)]
    second.close()


def test_a_reader_reads_again_when_the_writer_moves_slots_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`switch keys check` against a running switch: the writer moves to the other slot (and zeroes
    the one the reader chose) between the reader's look at the headers and its read of the data."""
    path = tmp_path / "armed.db"
    writer = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    writer.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)) for i in range(20)])
    read_file = armed._read_file
    moved: list[int] = []

    def read_while_the_writer_moves(p: str) -> bytes:
        if not moved:
            generation = writer._epoch[0]
            i = 1_000
            while writer._epoch[0] == generation:
                writer.apply([(True, ("alpha", rrn(i), reversal(rrn(i)), i)), (False, ("alpha", rrn(i)))])
                i += 1
            moved.append(i)
        return read_file(p)

    monkeypatch.setattr(armed, "_read_file", read_while_the_writer_moves)
    reader = ArmedStore(path, kek=KEK, slot_bytes=SMALL)
    assert moved and len(reader) == 20
    reader.close()
    writer.close()


def test_a_failed_sync_refuses_every_later_arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArmedStore(tmp_path / "armed.db", kek=KEK)
    store.arm_many([("alpha", rrn(1), reversal(rrn(1)))], 1)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(armed.os, "fdatasync", failing)
    with pytest.raises(ArmedStoreError, match="write failed"):
        store.arm_many([("alpha", rrn(2), reversal(rrn(2)))], 2)
    monkeypatch.undo()
    with pytest.raises(ArmedStoreError, match="restart the switch"):
        store.arm_many([("alpha", rrn(3), reversal(rrn(3)))], 3)
    assert rrns(store) == [rrn(1)]  # what the switch knows as armed did not change
    store.close()


@pytest.mark.parametrize("content", [b"something else entirely\n" * 1_000, b"small\n"])
def test_a_file_that_is_not_an_armed_log_stops_the_start(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "armed.db"
    path.write_bytes(content)
    with pytest.raises(ArmedStoreError, match="not an armed-reversal log"):
        ArmedStore(path, kek=KEK)
    assert path.read_bytes() == content  # and it was left as it was


def test_an_sqlite_store_of_an_older_switch_is_moved_into_the_log(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    sealer = FieldSealer(KEK, armed.SEAL_PURPOSE)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE armed (acquirer TEXT NOT NULL, rrn TEXT NOT NULL, fields BLOB NOT NULL, "
        "created_ms INTEGER NOT NULL, PRIMARY KEY (acquirer, rrn))"
    )
    for i in (2, 1):
        sealed = sealer.seal(reversal(rrn(i)), armed._context("alpha", rrn(i)))
        conn.execute("INSERT INTO armed VALUES ('alpha', ?, ?, ?)", (rrn(i), sealed, i))
    conn.close()
    store = ArmedStore(path, kek=KEK)
    assert rrns(store) == [rrn(1), rrn(2)]
    store.close()
    assert not path.read_bytes().startswith(b"SQLite format 3")
    assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    assert rrns(ArmedStore(path, kek=KEK)) == [rrn(1), rrn(2)]


OLD_SWITCH = textwrap.dedent(
    """
    import os, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE armed (acquirer TEXT NOT NULL, rrn TEXT NOT NULL, fields BLOB NOT NULL, "
        "created_ms INTEGER NOT NULL, PRIMARY KEY (acquirer, rrn))"
    )
    for i in range(3):  # rows of the oldest format: fields in clear
        body = '{"2":"4761739001010119","4":"000000000100","37":"00000000000%d"}' % i
        conn.execute("INSERT INTO armed VALUES ('alpha', ?, ?, ?)", ("00000000000%d" % i, body.encode(), i))
    os._exit(0)  # killed: no checkpoint, the rows are in the WAL only
    """
)


def migrate_killed_then_again(
    path: Path, monkeypatch: pytest.MonkeyPatch, *, left_behind: bool = False
) -> None:
    """Open the store of OLD_SWITCH with a step patched to kill it; then (unpatched, as after a
    restart) it opens with the three rows, and nothing of the old file is left."""
    with pytest.raises(Killed):
        ArmedStore(path, kek=KEK)
    monkeypatch.undo()
    if left_behind:
        assert any(p.name.startswith("armed.db.sqlite") for p in path.parent.iterdir())
    store = ArmedStore(path, kek=KEK)
    assert rrns(store) == [rrn(0), rrn(1), rrn(2)]
    store.close()
    assert not any(p.name.startswith("armed.db.sqlite") for p in path.parent.iterdir())


def test_an_older_file_killed_with_its_rows_in_the_wal_is_migrated_and_scrubbed(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    subprocess.run([sys.executable, "-c", OLD_SWITCH, str(path)], check=True, timeout=60)
    assert Path(f"{path}-wal").stat().st_size > 0
    store = ArmedStore(path, kek=KEK)
    assert rrns(store) == [rrn(0), rrn(1), rrn(2)]
    assert store.all()[0][2]["2"] == "4761739001010119"
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"9001010119" not in raw  # neither the database nor its WAL left a PAN behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["armed.db", "armed.db-b", "armed.db.lock"]


@pytest.mark.parametrize("cut", ["before the log's commit", "while scrubbing the old file"])
def test_a_migration_cut_short_is_finished_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    path = tmp_path / "armed.db"
    subprocess.run([sys.executable, "-c", OLD_SWITCH, str(path)], check=True, timeout=60)
    if cut == "before the log's commit":
        monkeypatch.setattr(armed, "_header", killed)
    else:
        monkeypatch.setattr(armed.armed_legacy, "scrub", killed)
    migrate_killed_then_again(path, monkeypatch)
    assert b"9001010119" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert not any(p.name.startswith("armed.db.sqlite") for p in tmp_path.iterdir())


@pytest.mark.parametrize("unlinks_done", [0, 1, 2])
def test_a_scrub_cut_between_its_files_is_finished_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unlinks_done: int
) -> None:
    """Killed after the log's commit, part-way through removing the old files (WAL and shm first,
    the database last): the next start still sees what is left and scrubs it."""
    path = tmp_path / "armed.db"
    subprocess.run([sys.executable, "-c", OLD_SWITCH, str(path)], check=True, timeout=60)
    real_unlink = os.unlink
    done: list[str] = []

    def unlink(name: str) -> None:
        if len(done) == unlinks_done:
            raise Killed
        real_unlink(name)
        done.append(name)

    monkeypatch.setattr(armed.armed_legacy.os, "unlink", unlink)
    migrate_killed_then_again(path, monkeypatch, left_behind=True)
    assert not any(p.name.startswith("armed.db.sqlite") for p in tmp_path.iterdir())
    assert b"9001010119" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_a_migration_whose_first_header_was_torn_reads_the_old_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "armed.db"
    subprocess.run([sys.executable, "-c", OLD_SWITCH, str(path)], check=True, timeout=60)
    real_header = armed._header
    monkeypatch.setattr(armed, "_header", lambda epoch: real_header(epoch)[:11] + bytes(17))  # torn
    monkeypatch.setattr(armed.armed_legacy, "scrub", killed)  # and the power went right after
    migrate_killed_then_again(path, monkeypatch)


def test_a_reader_gives_up_clearly_when_the_headers_never_hold_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "armed.db"
    ArmedStore(path, kek=KEK).arm_many([("alpha", rrn(1), reversal(rrn(1)))], 1)
    calls = iter(range(1_000))
    real_headers = ArmedStore._headers  # each look differs from the one before (a busy writer)
    monkeypatch.setattr(ArmedStore, "_headers", lambda self: real_headers(self) + [None] * (next(calls) % 2))
    with pytest.raises(ArmedStoreError, match="changing under the reader; retry"):
        ArmedStore(path, kek=KEK)


def test_the_slot_size_is_a_named_limit() -> None:
    with pytest.raises(msgspec.ValidationError, match="armed_slot_bytes must be at least 65536"):
        msgspec.convert({"armed_slot_bytes": 4096}, ServerConfig)
    with pytest.raises(ValueError, match="slot_bytes"):
        ArmedStore("unused.db", kek=KEK, slot_bytes=4096)


@pytest.mark.parametrize("ledger_writer_process", [True, False])
def test_a_damaged_armed_file_stops_the_switch_start_with_its_reason(
    tmp_path: Path, ledger_writer_process: bool
) -> None:
    from switch.server.app import StartupError, Switch
    from switch.server.testbed import build

    config, _ = build(
        tmp_path, {"alpha": 1, "beta": 2}, server={"ledger_writer_process": ledger_writer_process}
    )
    Path(config.server.armed_path).write_bytes(b"not armed reversals\n" * 1_000)
    with pytest.raises(StartupError, match=r"armed\.db: not an armed-reversal log"):
        Switch(config)
