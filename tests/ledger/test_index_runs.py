"""Index runs (switch.ledger.backend, "Why index runs"): the idempotency-key and merchant indexes are
filled in sorted runs, and every lookup stays exact on both sides of the watermark, across restarts,
after a failed run, and on a ledger upgraded from schema 1."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger.backend import (
    INDEX_TABLES,
    SQLITE,
    LedgerBackend,
    LedgerStorageError,
    key_range_seqs_sql,
    merchant_seqs_sql,
    schema,
)
from switch.ledger.model import EntryKind, IdempotencyConflict, Side
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import LedgerCorrupt
from switch.ledger.sqlite import SqliteBackend, index_path
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter
from tests.ledger.conftest import LedgerDb, SqliteDb
from tests.ledger.drafts import draft

#: Small runs so a test crosses several watermarks.
RUN = 7
CFG = LedgerConfig(batch_window_ms=0, max_batch_entries=4, index_run_entries=RUN)


def _sale(i: int, amount: int = 100) -> object:
    return draft(f"tk:T{i % 3}/M{i % 2}/{i:06d}:out", EntryKind.PURCHASE, f"{i:012d}", amount,
                 at_ms=1_000 + i, merchant_id=f"M{i % 2}")  # fmt: skip


def _post(writer: LedgerWriter, lo: int, hi: int) -> None:
    for i in range(lo, hi):
        writer.append([_sale(i)])  # type: ignore[list-item]


def _writer(db: LedgerDb, key: Ed25519PrivateKey, cfg: LedgerConfig = CFG) -> LedgerWriter:
    return LedgerWriter(db.open(), signing_key=key, config=cfg)


def test_repeats_and_conflicts_are_exact_on_both_sides_of_the_watermark_and_after_restart(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    w = _writer(ledger_backend, signing_key)
    _post(w, 0, 17)
    w.close()
    reader = ledger_backend.open()
    watermark = reader.index_watermark()
    assert 0 < watermark < 17, "17 entries with runs of 7: some indexed, a tail left"
    reader.close()

    w = _writer(ledger_backend, signing_key)  # restart: the tail's keys come back from storage
    try:
        for i in (0, watermark - 1, watermark, 16):  # below the watermark and in the tail
            assert w.append([_sale(i)])[0].seq == i  # type: ignore[list-item]
            with pytest.raises(IdempotencyConflict):
                w.append([_sale(i, amount=999)])  # type: ignore[list-item]
        assert w.size == 17, "no repeat and no conflict posted anything"
        _post(w, 17, 30)
    finally:
        w.close()

    reader = ledger_backend.open()
    try:
        keys = [str(_sale(i).idempotency_key) for i in range(30)]  # type: ignore[attr-defined]
        found = reader.find_idempotency([*keys, "tk:unknown"])
        assert {k: v[0] for k, v in found.items()} == {k: i for i, k in enumerate(keys)}
        assert verify_ledger(reader, signing_key.public_key()).ok
    finally:
        reader.close()


def test_merchant_queries_cover_index_and_tail(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    w = _writer(ledger_backend, signing_key)
    _post(w, 0, 23)
    w.close()
    be = ledger_backend.open()
    try:
        assert 0 < be.index_watermark() < 23
        totals = LedgerReader(be).merchant_totals("M1", 1_003, 1_020)  # at_ms 1003..1019
        expected = [i for i in range(3, 20) if i % 2 == 1]
        assert [(t.kind, t.count, t.amount_minor) for t in totals] == [
            ("purchase", len(expected), 100 * len(expected))
        ]
        p = be.dialect.placeholder
        rows = be._all(merchant_seqs_sql(p, 100), ("M0", 1_000, 1_022) * 2)  # type: ignore[attr-defined]
        assert [r[0] for r in rows] == list(range(0, 23, 2))
        rows = be._all(merchant_seqs_sql(p, 3), ("M0", 1_000, 1_022) * 2)  # type: ignore[attr-defined]
        assert [r[0] for r in rows] == [0, 2, 4]
        rows = be._all(key_range_seqs_sql(p, 100), ("tk:T1/", "tk:T10") * 2)  # type: ignore[attr-defined]
        assert [r[0] for r in rows] == [i for i in range(22, -1, -1) if i % 3 == 1]
    finally:
        be.close()


def test_a_failed_run_changes_nothing_and_is_retried(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = ledger_backend.open()
    real = type(backend).write_index_run  # the indexer thread's backend is another instance
    calls: list[tuple[int, int]] = []
    on_indexer: list[bool] = []

    def flaky(self: LedgerBackend, from_seq: int, to_seq: int, at_ms: int) -> None:
        calls.append((from_seq, to_seq))
        on_indexer.append(threading.current_thread().name.endswith("-indexer"))
        if len(calls) == 1:
            raise LedgerStorageError("disk said no")
        real(self, from_seq, to_seq, at_ms)  # type: ignore[arg-type]

    monkeypatch.setattr(type(backend), "write_index_run", flaky)
    w = LedgerWriter(backend, signing_key=signing_key, config=CFG)
    _post(w, 0, 12)  # every append is its own batch: the run is due after entry 7
    assert w.append([_sale(3)])[0].seq == 3  # type: ignore[list-item]
    w.close()
    assert all(on_indexer), "runs happen on the indexer thread, off the commit path"
    assert calls[0] == (0, RUN), "the first run covers the first run's worth"
    assert calls[1][0] == 0 and calls[1][1] > RUN, "retried after a later batch, same start"
    reader = ledger_backend.open()
    try:
        assert reader.index_watermark() == calls[-1][1]
        assert reader.index_problems() == []
        assert verify_ledger(reader, signing_key.public_key()).ok
    finally:
        reader.close()


def test_a_run_must_start_at_the_watermark(ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey) -> None:
    w = _writer(ledger_backend, signing_key, LedgerConfig(batch_window_ms=0, index_run_entries=1_000))
    _post(w, 0, 5)
    w.close()
    be = ledger_backend.open()
    try:
        with pytest.raises(LedgerStorageError, match="watermark"):
            be.write_index_run(2, 5, 0)  # entries 0 and 1 would never be indexed
        assert be.index_watermark() == 0
    finally:
        be.close()


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("DELETE FROM key_index WHERE seq = 3", "key_index holds 6 rows"),
        ("DELETE FROM balance_index WHERE seq = 3", "balance_index holds"),
        ("UPDATE merchant_index SET merchant_id = 'M9' WHERE seq = 2",
         "merchant_index holds 7 rows (6 matching"),
        ("UPDATE entries SET idempotency_key = (SELECT idempotency_key FROM entries WHERE seq = 0) "
         "WHERE seq = 9", "more than one entry"),
    ],
)  # fmt: skip
def test_verify_names_index_tables_that_disagree_with_the_entries(
    tmp_path: Path, signing_key: Ed25519PrivateKey, statement: str, problem: str
) -> None:
    db = SqliteDb(tmp_path / "ledger.db")
    w = _writer(db, signing_key)
    _post(w, 0, 10)
    w.close()
    tampered = db.tampered_copy([statement])
    be = tampered.open()
    try:
        assert not verify_ledger(be, signing_key.public_key()).ok
        assert any(problem in p for p in be.index_problems())
    finally:
        be.close()


def _downgrade_to_schema_1(path: Path) -> None:
    """What a schema 1 ledger looked like: B-tree indexes on entries, balance_history clustered by
    account, no index tables."""
    Path(index_path(path)).unlink()  # schema 1 had no index file (nor index tables)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE balance_history RENAME TO b2")
    conn.execute(
        "CREATE TABLE balance_history (account TEXT NOT NULL, currency TEXT NOT NULL, seq INTEGER NOT NULL, "
        "first_seq INTEGER NOT NULL, balance_minor INTEGER NOT NULL, PRIMARY KEY (account, currency, seq)) "
        "WITHOUT ROWID"
    )
    conn.execute("INSERT INTO balance_history SELECT * FROM b2")
    conn.execute("DROP TABLE b2")
    conn.execute(
        "CREATE TRIGGER balance_history_no_update BEFORE UPDATE ON balance_history "
        "BEGIN SELECT RAISE(ABORT, 'append-only'); END"
    )
    conn.execute("CREATE UNIQUE INDEX entries_idempotency_key ON entries (idempotency_key)")
    conn.execute("CREATE INDEX entries_merchant_time ON entries (merchant_id, at_ms)")
    conn.execute("UPDATE ledger_meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_a_schema_1_ledger_is_upgraded_and_indexed_on_first_writer_start(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    db = SqliteDb(tmp_path / "ledger.db")
    w = _writer(db, signing_key, LedgerConfig(batch_window_ms=0, index_run_entries=1_000))
    _post(w, 0, 9)
    w.close()
    _downgrade_to_schema_1(db.path)

    before = _balances(db)
    be: LedgerBackend = SqliteBackend(db.path)  # create=True upgrades
    assert be._all("SELECT COUNT(*) FROM balance_history")[0][0] > 0  # type: ignore[attr-defined]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        be._all("UPDATE balance_history SET balance_minor = 0")  # type: ignore[attr-defined]
    names = {r[0] for r in be._all("SELECT name FROM sqlite_master WHERE type = 'index'")}  # type: ignore[attr-defined]
    assert "entries_idempotency_key" not in names and "entries_merchant_time" not in names
    assert be.meta("schema_version") == "3"
    assert be.find_idempotency([str(_sale(4).idempotency_key)])[str(_sale(4).idempotency_key)][0] == 4  # type: ignore[attr-defined]
    be.close()

    w = _writer(db, signing_key, LedgerConfig(batch_window_ms=0, index_run_entries=5))
    try:
        assert w.append([_sale(1)])[0].seq == 1  # type: ignore[list-item]
    finally:
        w.close()
    be = db.open()
    try:
        assert be.index_watermark() == 9, "the start-up run indexed the whole history"
        assert verify_ledger(be, signing_key.public_key()).ok
        assert _balances(db) == before
    finally:
        be.close()


def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    SqliteBackend(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE ledger_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerStorageError, match="schema version 99"):
        SqliteBackend(path)


def _balances(db: LedgerDb) -> list[tuple[str, str, list[int]]]:
    """Every account's balance after each entry, through the reader (index + tail)."""
    be = db.open()
    try:
        reader = LedgerReader(be)
        n = be.entry_count()
        return [(r.account, r.currency, [reader.balance(r.account, r.currency, s) for s in range(-1, n)])
                for r in be.latest_balances()]  # fmt: skip
    finally:
        be.close()


def test_balances_as_of_any_seq_equal_the_fold_on_both_sides_of_the_watermark(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    w = _writer(
        ledger_backend,
        signing_key,
        LedgerConfig(batch_window_ms=0, max_batch_entries=3, index_run_entries=10),
    )
    for lo in range(0, 17, 3):  # batches of 3 entries: a balance row summarises several entries
        done = threading.Event()
        w.submit_many(
            [(i, [_sale(i, amount=10 + i)]) for i in range(lo, min(17, lo + 3))],
            lambda r, done=done: done.set(),
        )
        assert done.wait(10)
    w.close()
    be = ledger_backend.open()
    try:
        assert be.index_watermark() == 12, "one run after the 4th batch, 5 entries in the tail"
        effects = [
            {(p.account, p.currency): p.amount_minor if p.side is Side.DEBIT else -p.amount_minor
             for p in _sale(i, amount=10 + i).postings}  # type: ignore[attr-defined]
            for i in range(17)
        ]  # fmt: skip
        running: dict[tuple[str, str], int] = {}
        expected = []
        for a, c in sorted({k for e in effects for k in e}):
            values = [0]
            for e in effects:
                values.append(values[-1] + e.get((a, c), 0))
            expected.append((a, c, values))
            running[(a, c)] = values[-1]
        assert _balances(ledger_backend) == expected
        assert {(r.account, r.currency): r.balance_minor for r in be.latest_balances()} == running
    finally:
        be.close()


def test_tail_lookups_span_several_blocks_of_the_block_index(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    """entries_key_by_block groups the tail in blocks of 1,024 seqs: keys in every tail block, at
    block edges, are found by key and by key range."""
    w = _writer(ledger_backend, signing_key, LedgerConfig(batch_window_ms=0, index_run_entries=1_500))
    for lo in range(0, 2_500, 500):
        done = threading.Event()
        w.submit_many([(i, [_sale(i)]) for i in range(lo, lo + 500)], lambda r, done=done: done.set())
        assert done.wait(30)
    w.close()
    be = ledger_backend.open()
    try:
        assert be.index_watermark() == 1_500 and be.entry_count() == 2_500
        seqs = [0, 1_499, 1_500, 2_047, 2_048, 2_499]
        keys = [str(_sale(i).idempotency_key) for i in seqs]  # type: ignore[attr-defined]
        assert {k: v[0] for k, v in be.find_idempotency(keys).items()} == dict(zip(keys, seqs))
        for seq, key in zip(seqs, keys):
            rows = be._all(key_range_seqs_sql(be.dialect.placeholder, 5), (key, key + " ") * 2)  # type: ignore[attr-defined]
            assert [r[0] for r in rows] == [seq]
    finally:
        be.close()


def test_a_run_in_progress_does_not_hold_up_commits(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    """An index run's write transaction (here held open on an indexer connection, uncommitted) used to
    hold the entries file's write lock: every commit waited for it. Now commits go through meanwhile."""
    w = _writer(ledger_backend, signing_key, LedgerConfig(batch_window_ms=0, index_run_entries=1_000))
    ix = ledger_backend.open().open_indexer()  # type: ignore[attr-defined]
    cur = ix.conn.cursor()
    try:
        _post(w, 0, 2)
        ix._begin_index_run(cur)
        cur.execute("INSERT INTO key_index (idempotency_key, seq) VALUES ('held-by-a-run', 0)")
        for i in range(2, 6):  # the writer commits while the run's transaction is open
            assert w.append([_sale(i)], timeout_s=30)[0].seq == i  # type: ignore[list-item]
            ledger_backend.open().close()  # and readers open (a current schema takes no write lock)
        ix.conn.rollback()
    finally:
        cur.close()
        ix.close()
        w.close()
    be = ledger_backend.open()
    try:
        assert be.entry_count() == 6 and be.index_problems() == []
    finally:
        be.close()


def test_the_index_file_is_rebuilt_from_the_entries_when_lost(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """SQLite: the entries file is the source of truth; without its index file (a backup of the
    entries file alone) lookups stay exact and the writer's first start indexes everything again."""
    db = SqliteDb(tmp_path / "ledger.db")
    w = _writer(db, signing_key)
    _post(w, 0, 17)
    w.close()
    for suffix in ("", "-wal", "-shm"):
        Path(index_path(db.path) + suffix).unlink(missing_ok=True)
    reader = db.open(create=False)
    try:
        assert reader.index_watermark() == 0
        key = str(_sale(12).idempotency_key)  # type: ignore[attr-defined]
        assert reader.find_idempotency([key])[key][0] == 12
    finally:
        reader.close()
    w = _writer(db, signing_key)
    try:
        assert w.append([_sale(5)])[0].seq == 5  # type: ignore[list-item]
        with pytest.raises(IdempotencyConflict):
            w.append([_sale(5, amount=7)])  # type: ignore[list-item]
    finally:
        w.close()
    be = db.open()
    try:
        assert be.index_watermark() >= RUN * 2 and verify_ledger(be, signing_key.public_key()).ok
    finally:
        be.close()


def test_lookups_stay_exact_while_a_run_is_in_flight(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the indexer's run is held (not committed), the writer keeps committing, and repeats and
    conflicts of keys in the run's range, below it and past it are all recognised."""
    backend = ledger_backend.open()
    real = type(backend).write_index_run
    started, release = threading.Event(), threading.Event()

    def held(self: LedgerBackend, from_seq: int, to_seq: int, at_ms: int) -> None:
        started.set()
        release.wait(30)
        real(self, from_seq, to_seq, at_ms)  # type: ignore[arg-type]

    monkeypatch.setattr(type(backend), "write_index_run", held)
    w = LedgerWriter(backend, signing_key=signing_key, config=CFG)
    try:
        _post(w, 0, RUN)  # the run [0, RUN) is handed to the indexer after this batch
        assert started.wait(30)
        _post(w, RUN, 2 * RUN + 3)  # committed while the run is held
        for i in (0, RUN - 1, RUN, 2 * RUN + 2):  # in the held run, and past it
            assert w.append([_sale(i)])[0].seq == i  # type: ignore[list-item]
            with pytest.raises(IdempotencyConflict):
                w.append([_sale(i, amount=999)])  # type: ignore[list-item]
        assert w.size == 2 * RUN + 3
        release.set()
        _post(w, 2 * RUN + 3, 3 * RUN + 3)  # the run settles; the next ones follow
        for i in (1, 2 * RUN + 4):
            assert w.append([_sale(i)])[0].seq == i  # type: ignore[list-item]
    finally:
        release.set()
        w.close()
    reader = ledger_backend.open()
    try:
        assert reader.index_watermark() > RUN
        assert reader.index_problems() == []
        assert verify_ledger(reader, signing_key.public_key()).ok
    finally:
        reader.close()


def test_a_schema_2_ledger_moves_its_index_to_the_index_file(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Schema 2 kept the index tables in the entries file: the upgrade drops them there (derived data)
    and the writer's start-up run rebuilds them in the index file."""
    db = SqliteDb(tmp_path / "ledger.db")
    w = _writer(db, signing_key)
    _post(w, 0, 17)
    w.close()
    before = _balances(db)
    conn = sqlite3.connect(db.path)  # what schema 2 looked like: the same tables, in the main file
    conn.execute("ATTACH DATABASE ? AS ix", (index_path(db.path),))
    for stmt in schema(SQLITE):
        if any(f"EXISTS {t} " in stmt or f"ON {t} " in stmt for t in INDEX_TABLES):
            conn.execute(stmt.replace(" IF NOT EXISTS ", " IF NOT EXISTS main."))
    for table in INDEX_TABLES:
        conn.execute(f"INSERT INTO main.{table} SELECT * FROM ix.{table}")
    conn.execute("UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(index_path(db.path) + suffix).unlink(missing_ok=True)

    w = _writer(db, signing_key, LedgerConfig(batch_window_ms=0, index_run_entries=5))
    try:
        assert w.append([_sale(16)])[0].seq == 16  # type: ignore[list-item]
    finally:
        w.close()
    be = db.open()
    try:
        assert be.meta("schema_version") == "3"
        main_tables = {r[0] for r in be._all("SELECT name FROM main.sqlite_master")}  # type: ignore[attr-defined]
        assert not main_tables & set(INDEX_TABLES), "the entries file no longer holds index tables"
        assert be.index_watermark() == 17 and verify_ledger(be, signing_key.public_key()).ok
        assert _balances(db) == before
    finally:
        be.close()


def test_an_index_ahead_of_its_entries_is_refused_at_writer_start(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """SQLite: an entries file restored from an older copy beside a newer index file. The index claims
    seqs the entries do not hold; trusting it would hide new entries from the idempotency lookup (a
    repeat posted twice after a restart), so the writer refuses to start and says what to do."""
    newer = SqliteDb(tmp_path / "newer.db")
    w = _writer(newer, signing_key)
    _post(w, 0, 17)
    w.close()
    older = SqliteDb(tmp_path / "older.db")
    w = _writer(older, signing_key)
    _post(w, 0, 3)
    w.close()
    for suffix in ("", "-wal", "-shm"):
        Path(index_path(older.path) + suffix).unlink(missing_ok=True)
        src = Path(index_path(newer.path) + suffix)
        if src.exists():
            Path(index_path(older.path) + suffix).write_bytes(src.read_bytes())
    with pytest.raises(LedgerCorrupt, match="index does not belong to these entries"):
        _writer(older, signing_key)
    for suffix in ("", "-wal", "-shm"):  # the remedy the message names: move the index away
        Path(index_path(older.path) + suffix).unlink(missing_ok=True)
    w = _writer(older, signing_key)
    try:
        assert w.size == 3 and w.append([_sale(2)])[0].seq == 2  # type: ignore[list-item]
    finally:
        w.close()


def test_a_run_that_raised_after_committing_is_taken_as_done(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL can lose the connection after COMMIT was sent: the run is stored but reported as
    failed. The writer asks storage for the watermark instead of retrying from the old one forever
    (every retry would be refused as not starting at the watermark)."""
    backend = ledger_backend.open()
    real = type(backend).write_index_run
    calls: list[tuple[int, int]] = []

    def commits_then_raises(self: LedgerBackend, from_seq: int, to_seq: int, at_ms: int) -> None:
        calls.append((from_seq, to_seq))
        real(self, from_seq, to_seq, at_ms)  # type: ignore[arg-type]
        if len(calls) == 1:
            raise LedgerStorageError("connection lost after COMMIT")

    monkeypatch.setattr(type(backend), "write_index_run", commits_then_raises)
    w = LedgerWriter(backend, signing_key=signing_key, config=CFG)
    try:
        _post(w, 0, 3 * RUN + 2)
        assert w.append([_sale(1)])[0].seq == 1  # type: ignore[list-item]
    finally:
        w.close()
    starts = [lo for lo, _ in calls]
    assert starts == sorted(set(starts)), f"no run retried from a stale watermark: {calls}"
    reader = ledger_backend.open()
    try:
        assert reader.index_watermark() == calls[-1][1] >= 2 * RUN
        assert reader.index_problems() == []
    finally:
        reader.close()
