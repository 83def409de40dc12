"""SQLite batches written by the C batch writer (switch._speedups.ledger.SqliteBatchWriter, see
switch.ledger.sqlite) land exactly as through Python's sqlite3, in one transaction: a batch that
fails leaves nothing behind, and the writer's callers of that batch hear of it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

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
