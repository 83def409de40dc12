"""SQLite batches written by the C batch writer (switch._speedups.ledger.SqliteBatchWriter, see
switch.ledger.sqlite) land exactly as through Python's sqlite3, in one transaction: a batch that
fails leaves nothing behind, and the writer's callers of that batch hear of it."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger import fast
from switch.ledger.backend import BatchRows, LedgerStorageError
from switch.ledger.model import EntryKind
from switch.ledger.sqlite import SqliteBackend
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter

from .drafts import draft

TABLES = {
    "entries": "seq",
    "merkle_nodes": "level, idx",
    "balance_history": "seq, account, currency",
    "tree_heads": "tree_size",
    "checkpoints": "tree_size",
}


@pytest.fixture(params=[True, False], ids=["c-writer", "sqlite3"])
def c_writer(request: pytest.FixtureRequest) -> Iterator[bool]:
    if request.param and fast.sqlite_batch_writer() is None:
        pytest.fail("the ledger extension's SQLite batch writer is not available")
    previous = fast.use_fast_path(request.param)
    yield request.param
    fast.use_fast_path(previous)


def _batch(start: int, n: int, *, checkpoint: bool = False) -> BatchRows:
    """n entries from seq `start`, with awkward but valid values (non-ASCII text, 64-bit amounts,
    bytes and bytearray blobs)."""
    entries = [
        (s, f"kë{s}/✓", "purchase", f"{s:012d}", "" if s % 3 else f"{s - 1:012d}", 1_760_000_000_000 + s,
         f"M{s % 5}", (2**62) if s % 7 == 0 else 100 + s, "978", bytearray(b"\x00body\xff" * (s % 4 + 1)),
         bytes(range(32)) if s % 2 else bytearray(32))
        for s in range(start, start + n)
    ]  # fmt: skip
    return BatchRows(
        entries=entries,
        nodes=[(8, start, bytes([start % 256]) * 32)],
        balances=[(f"merchant:M{i}:payable", "978", start + n - 1, start, -(2**40) - i) for i in range(3)],
        tree_head=(start + n, b"\x01" * 32, 1_760_000_000_000),
        checkpoint=(start + n, b"\x02" * 32, 1, "key-1", b"\x03" * 64) if checkpoint else None,
    )


def _dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY {o}").fetchall() for t, o in TABLES.items()}
    finally:
        conn.close()


def test_both_write_paths_store_the_same_rows(tmp_path: Path) -> None:
    dumps = []
    for use_c in (True, False):
        previous = fast.use_fast_path(use_c)
        try:
            path = tmp_path / f"{use_c}.db"
            backend = SqliteBackend(path)
            assert backend.writes_without_gil() is use_c
            backend.write_batch(_batch(0, 300))
            backend.write_batch(_batch(300, 1, checkpoint=True))
            last = (302, b"\x04" * 32, 5, "key-2", b"\x05" * 64)  # a checkpoint alone, as at shutdown
            backend.write_batch(BatchRows(entries=[], nodes=[], balances=[], tree_head=None, checkpoint=last))
            backend.close()
            dumps.append(_dump(path))
        finally:
            fast.use_fast_path(previous)
    assert dumps[0]["entries"][7][7] == 2**62 and dumps[0]["entries"][1][1] == "kë1/✓"
    assert dumps[0] == dumps[1]


def test_a_failing_batch_leaves_nothing_and_the_next_one_commits(tmp_path: Path, c_writer: bool) -> None:
    path = tmp_path / "ledger.db"
    backend = SqliteBackend(path)
    backend.write_batch(_batch(0, 10))
    with pytest.raises(LedgerStorageError, match="UNIQUE"):
        backend.write_batch(_batch(5, 10, checkpoint=True))  # seq 5..9 exist: the whole batch goes
    assert backend.entry_count() == 10
    assert backend.last_tree_head() == (10, b"\x01" * 32, 1_760_000_000_000)
    assert backend.last_checkpoint_size() == 0
    assert backend.nodes(8, 0, 100) == [(0, bytes(32))]  # the failed batch's node (8, 5) is gone too
    backend.write_batch(_batch(10, 5))
    assert backend.entry_count() == 15
    backend.close()


def test_a_locked_database_fails_the_batch_after_the_busy_timeout(tmp_path: Path, c_writer: bool) -> None:
    path = tmp_path / "ledger.db"
    backend = SqliteBackend(path, busy_timeout_ms=50)
    backend.write_batch(_batch(0, 10))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write lock
    try:
        with pytest.raises(LedgerStorageError, match="locked"):
            backend.write_batch(_batch(10, 10))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert backend.entry_count() == 10
    backend.write_batch(_batch(10, 10))
    assert backend.entry_count() == 20
    backend.close()


def test_the_pipelined_writer_fails_the_callers_of_a_batch_that_cannot_commit(
    tmp_path: Path, signing_key: Ed25519PrivateKey, c_writer: bool
) -> None:
    """Through the writer (commit pipeline on): a commit refused by SQLite fails exactly its callers;
    the writer reloads, and later batches commit and verify."""
    path = tmp_path / "ledger.db"
    cfg = LedgerConfig(batch_window_ms=0, pipeline_min_batch_entries=1)
    with LedgerWriter(SqliteBackend(path, busy_timeout_ms=50), signing_key=signing_key, config=cfg) as w:
        w.append([draft(f"k{i}", EntryKind.PURCHASE, f"{i:012d}", 100 + i) for i in range(50)])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(LedgerStorageError, match="locked"):
                w.append([draft("blocked", EntryKind.PURCHASE, "000000000999", 5)])
        finally:
            other.execute("ROLLBACK")
            other.close()
        again = w.append([draft("blocked", EntryKind.PURCHASE, "000000000999", 5)])
        assert again[0].seq == 50  # the refused batch left no entry behind
        w.append([draft(f"k{i}", EntryKind.PURCHASE, f"{i:012d}", 100 + i) for i in range(50, 80)])
        assert w.size == 81
    reader = SqliteBackend(path, create=False)
    report = verify_ledger(reader, signing_key.public_key())
    reader.close()
    assert report.ok and report.tree_size == 81


# --- the C batch writer on its own terms (not only as SqliteBackend calls it) ---------------------


def _c_writer_on(path: Path, inserts: list[str], pragmas: tuple[str, ...] = ()) -> Any:
    cls = fast.sqlite_batch_writer()
    if cls is None:
        pytest.fail("the ledger extension's SQLite batch writer is not available")
    return cls(str(path), 1000, inserts, list(pragmas))


def _table(path: Path, schema: str = "CREATE TABLE t (a INTEGER PRIMARY KEY, b BLOB)") -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(f"PRAGMA journal_mode = WAL; {schema};")
    conn.close()
    return path


def _rows(path: Path, table: str = "t") -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


class _Rows:
    """Rows whose iteration runs `between` after the first row: Python code in the middle of a
    write's copy, as another thread's could run there."""

    def __init__(
        self, rows: list[tuple[object, ...]], between: Callable[[], None], length: int | None = None
    ):
        self.rows, self.between, self.length = rows, between, length

    def __len__(self) -> int:
        return len(self.rows) if self.length is None else self.length

    def __iter__(self) -> Iterator[tuple[object, ...]]:
        for i, row in enumerate(self.rows):
            yield row
            if i == 0:
                self.between()


def test_a_second_call_while_a_write_is_under_way_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    path = _table(tmp_path / "t.db")
    writer = _c_writer_on(path, ["INSERT INTO t VALUES (?, ?)"])
    refused: list[BaseException] = []

    def other_thread_write() -> None:
        try:
            writer.write([(0, [(99, b"other thread")])])
        except RuntimeError as exc:
            refused.append(exc)

    def meanwhile() -> None:
        thread = threading.Thread(target=other_thread_write)
        thread.start()
        thread.join()
        for call in (lambda: writer.write([(0, [(98, b"re-entered")])]), writer.close,
                     lambda: writer.execute("PRAGMA user_version = 5")):  # fmt: skip
            with pytest.raises(RuntimeError, match="in use"):
                call()

    writer.write([(0, _Rows([(1, b"one"), (2, b"two")], meanwhile))])
    assert len(refused) == 1 and "in use" in str(refused[0])
    assert _rows(path) == [(1, b"one"), (2, b"two")]  # neither the other thread's row nor 98
    thread = threading.Thread(target=lambda: writer.write([(0, [(3, b"three")])]))
    thread.start()
    thread.join()  # once the first call has ended, another thread's write goes through
    assert _rows(path)[-1] == (3, b"three")
    writer.close()


def test_values_are_copied_before_the_commit(tmp_path: Path) -> None:
    """A bytearray changed (and resized) after its row was copied does not change what is stored."""
    path = _table(tmp_path / "t.db")
    writer = _c_writer_on(path, ["INSERT INTO t VALUES (?, ?)"])
    blob = bytearray(b"as handed over")

    def change() -> None:
        blob[:] = b"changed afterwards, and much longer than before" * 100

    writer.write([(0, _Rows([(1, blob), (2, "text ë")], change))])
    writer.close()
    assert _rows(path) == [(1, b"as handed over"), (2, "text ë")]


def test_rows_that_change_between_counting_and_copying_are_refused(tmp_path: Path) -> None:
    path = _table(tmp_path / "t.db")
    writer = _c_writer_on(path, ["INSERT INTO t VALUES (?, ?)"])
    rows = [(1, b"a"), (2, b"b")]
    with pytest.raises(ValueError, match="more than counted"):
        writer.write([(0, _Rows(rows, lambda: None, length=1))])
    with pytest.raises(ValueError, match="fewer than counted"):
        writer.write([(0, _Rows(rows, lambda: None, length=3))])
    assert _rows(path) == []
    writer.write([(0, rows)])
    writer.close()
    assert _rows(path) == rows


def test_a_statement_whose_parameters_sqlite_counts_differently_is_refused(tmp_path: Path) -> None:
    path = _table(tmp_path / "t.db")
    with pytest.raises(RuntimeError, match="parameters"):
        _c_writer_on(path, ["INSERT INTO t VALUES (?1, ?1)"])  # 2 '?' but one parameter


def test_a_failed_commit_leaves_nothing_and_the_next_batch_commits(tmp_path: Path) -> None:
    """COMMIT itself refused (a deferred foreign key): the writer rolls back and can go on."""
    schema = (
        "CREATE TABLE p (id INTEGER PRIMARY KEY);"
        "CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    path = _table(tmp_path / "t.db", schema)
    writer = _c_writer_on(
        path, ["INSERT INTO p VALUES (?)", "INSERT INTO c VALUES (?, ?)"], ("PRAGMA foreign_keys = ON",)
    )
    with pytest.raises(RuntimeError, match="FOREIGN KEY"):
        writer.write([(0, [(1,)]), (1, [(10, 1), (11, 2)])])  # parent 2 missing: found at COMMIT
    assert _rows(path, "p") == [] and _rows(path, "c") == []
    writer.write([(0, [(1,), (2,)]), (1, [(10, 1), (11, 2)])])
    writer.close()
    assert _rows(path, "c") == [(10, 1), (11, 2)]


def test_the_batch_writer_connection_commits_in_wal_with_synchronous_full(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "ledger.db")
    backend.write_batch(_batch(0, 3))
    writer = backend._batch_writer
    assert writer, "the C batch writer was not used"
    assert (writer.pragma("journal_mode"), writer.pragma("synchronous")) == ("wal", "2")
    assert writer.path == str((tmp_path / "ledger.db").resolve())
    backend.close()


def test_a_batch_writer_without_full_synchronous_commits_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused with LedgerStorageError, every time: never a silent fall back to weaker commits."""
    if fast.sqlite_batch_writer() is None:
        pytest.fail("the ledger extension's SQLite batch writer is not available")
    monkeypatch.setattr(SqliteBackend, "_BATCH_WRITER_PRAGMAS", ("PRAGMA synchronous = NORMAL",))
    backend = SqliteBackend(tmp_path / "ledger.db")
    for _ in range(2):
        with pytest.raises(LedgerStorageError, match="synchronous=1"):
            backend.write_batch(_batch(0, 3))
    assert backend.entry_count() == 0
    backend.close()


def test_an_insert_refused_by_a_trigger_fails_the_whole_batch(tmp_path: Path, c_writer: bool) -> None:
    path = tmp_path / "ledger.db"
    backend = SqliteBackend(path)
    backend.write_batch(_batch(0, 10))
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON checkpoints WHEN NEW.tree_size = 20"
        " BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )
    conn.commit()
    conn.close()
    with pytest.raises(LedgerStorageError, match="injected fault"):
        backend.write_batch(_batch(10, 10, checkpoint=True))  # the checkpoint is the last insert
    assert backend.entry_count() == 10 and backend.last_tree_head() == (10, b"\x01" * 32, 1_760_000_000_000)
    backend.write_batch(_batch(10, 10))
    assert backend.entry_count() == 20
    backend.close()
