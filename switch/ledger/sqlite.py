"""SQLite backend: the embedded default (one file, nothing to install).

Durability: WAL journal with synchronous=FULL, so a COMMIT returns only after the WAL is fsync'd; one
write transaction per group commit (BEGIN IMMEDIATE takes the write lock up front, so a second writer
fails fast with "database is locked" after busy_timeout_ms instead of deadlocking mid-batch).

Why JSON-array lookups: the writer's per-batch lookups (idempotency keys, transaction families) bind
ONE JSON array to one constant statement (`IN (SELECT value FROM json_each(?))`, the same index
searches as before) instead of `IN (?, ?, ...)` lists whose text changes with the count: the statement
stays prepared in the connection's cache, the bind is one value, and a batch makes one statement per
lookup instead of one per MAX_IN_LIST chunk (each statement step releases and retakes the GIL).
Measured single-threaded (1,000-entry batches): 1.8 -> 1.4 us of writer CPU per entry for both lookups.

Why the index tables are a file of their own (`<database>.index`, attached as schema `ix`): a SQLite
write transaction holds the write lock of every file it writes for its whole duration, so an index
run (switch.ledger.backend, "Why index runs": 140-450 ms) in the entries file stopped every commit
behind it. In their own file, with their own WAL and write lock, a run on the writer's background
indexer connection (switch.ledger.writer) reads `entries` from a snapshot (readers never block a WAL
writer) while the writer keeps committing batches. The watermark (`index_runs`) is in the index file,
in the same transaction as the rows it covers, so one statement sees index rows and watermark from
one snapshot of that file; its snapshot of the entries file is taken first (main is opened first in a
statement), and whatever the order, every entry at or past the watermark it sees is scanned as tail:
no lookup misses an entry. The entries file stays the source of truth: a missing index file is
recreated empty (the writer's first run indexes everything; lookups are exact meanwhile) and
`verify` proves the index matches. Consequences: writes start with a deferred BEGIN (BEGIN IMMEDIATE
would lock both files), so each transaction locks only the file it writes; the writer lock
(switch.ledger.writer_lock) covers both files, since only the writer process writes either; a backup
copies both (a copy of the entries file alone is complete: its index is rebuilt).

Why multi-row inserts: `executemany` steps one statement per row, and Python's sqlite3 releases and
retakes the GIL around every step; with another thread of the process running Python, each retake can
wait for that thread's switch interval. `INSERT ... VALUES (...), (...)` with up to MAX_ROWS_PER_INSERT
rows binds a flat parameter list and steps once per chunk: a 1,000-entry batch takes ~7 steps per table
instead of ~1,000. Chunk sizes are powers of two, so the few statement texts stay in the connection's
statement cache.

Why WAL checkpoints run on a thread of their own (`start_background_checkpoints`, the writer's
connection only): by default the connection that commits also checkpoints, whenever the WAL passes
1,000 pages -- in the writer's commit, every ~5,600 entries, copying ~4 MB into the database file and
fsyncing it while every caller waits. Measured with bench/ledger.py (100k entries, switch-shaped
keys): storage 60-74k entries/s and a p99 batch write of 43-70 ms with it; 99-113k/s and 19-22 ms
with checkpoints out of the commit path. Every CHECKPOINT_EVERY_ENTRIES committed entries the
checkpointer runs a PASSIVE checkpoint (it never blocks the writer or a reader) on its own connection,
with the GIL released, on the other core; SQLite restarts the WAL at the next write once a checkpoint
has caught up before the writer's next transaction begins -- under sustained full batches it rarely
does, and the WAL grows to the safety valve: the writer's connection keeps an automatic checkpoint at
WRITER_AUTOCHECKPOINT_PAGES (64 MB of WAL), in the commit, which then finds nearly all of the work
done and restarts the WAL.
Durability is unchanged: a commit is durable once its WAL frames are fsynced; checkpoints only move
committed pages into the database file.

Why batches are written by a connection of their own in C (`switch._speedups.ledger.SqliteBatchWriter`,
a file database with the ledger extension built): Python's sqlite3 binds every value with the GIL
held and releases and retakes it around every statement step (~13 per 1,000-entry batch). With the
commit pipeline the writer thread runs Python the whole time the committer commits, so each retake
waited up to a GIL switch interval (5 ms), and so did the commit's start: traced, a 1,000-entry cycle
took 19 ms of which the write 12 and the wait for the GIL ~6. The C writer copies the rows' values
under the GIL (integers, and the bytes of every text and blob into a buffer of its own) and runs
BEGIN, the inserts and COMMIT (with its fsync) with the GIL released, once per batch. Same
statements, same transaction, same durability (WAL, synchronous=FULL: read back on its connection
when it opens, `_check_durability`, else LedgerStorageError); on any error it rolls back and
`write_batch` raises LedgerStorageError. Without the extension (or with SWITCH_LEDGER_PURE=1)
batches go through sqlite3 as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import msgspec

from switch.ledger import fast
from switch.ledger.backend import (
    BALANCE_COLUMNS,
    ENTRY_COLUMNS,
    NODE_COLUMNS,
    SCHEMA_VERSION,
    SQLITE,
    TAIL_BLOCKS_CTE,
    TAIL_KEY_FILTER,
    TXN_COLUMNS,
    LedgerStorageError,
    SqlBackend,
    TxnRow,
)

log = logging.getLogger(__name__)

#: The writer's own automatic checkpoint once background checkpoints run: a bound, not the usual path.
WRITER_AUTOCHECKPOINT_PAGES = 16_384
#: The checkpointer runs after a commit once this many entries were committed since its last
#: checkpoint (~3 MB of WAL, about SQLite's own 1,000-page default) or CHECKPOINT_MIN_INTERVAL_S has
#: passed, and at least every CHECKPOINT_IDLE_S. Not after every commit: under light load batches are
#: a few entries, and a checkpoint (with its fsync of the database file) per commit doubled the fsyncs
#: that every other durable hop (the armed store's, the ledger's own) waits behind.
CHECKPOINT_EVERY_ENTRIES = 4_000
CHECKPOINT_MIN_INTERVAL_S = 0.25
CHECKPOINT_IDLE_S = 1.0
#: A checkpoint that ends behind the writer (frames committed while it copied) is followed by at most
#: this many more, each copying only what came meanwhile: once one ends caught up, SQLite restarts the
#: WAL at the next write instead of letting it grow to the safety valve.
CHECKPOINT_CHASE_ROUNDS = 4

#: The index file beside the database (INDEX_TABLES), and the schema name it is attached under.
INDEX_FILE_SUFFIX = ".index"
INDEX_SCHEMA = "ix"
#: How long a statement waits for another connection's lock before failing.
DEFAULT_BUSY_TIMEOUT_MS = 5_000
#: Rows per multi-row INSERT (a power of two; 256 entries rows bind 2,816 values, well under SQLite's
#: 32,766-variable limit).
MAX_ROWS_PER_INSERT = 256
_TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "entries": ENTRY_COLUMNS,
    "merkle_nodes": NODE_COLUMNS,
    "balance_history": BALANCE_COLUMNS,
}
_json = msgspec.json.Encoder()
#: The writer's lookup: the key index only (it keeps the unindexed tail's keys in memory).
_SQL_IDEMPOTENCY_INDEXED = (
    "SELECT e.idempotency_key, e.seq, e.body FROM key_index k "
    "JOIN entries e ON e.seq = k.seq AND e.idempotency_key = k.idempotency_key "
    "WHERE k.idempotency_key IN (SELECT value FROM json_each(?1))"
)
#: Everyone else's: the key index plus the tail, in one statement (one snapshot).
_SQL_IDEMPOTENCY = (
    f"{TAIL_BLOCKS_CTE}{_SQL_IDEMPOTENCY_INDEXED} UNION ALL SELECT idempotency_key, seq, body FROM entries "
    f"WHERE {TAIL_KEY_FILTER} AND idempotency_key IN (SELECT value FROM json_each(?1))"
)
_SQL_TXN_ROWS = (
    f"SELECT {TXN_COLUMNS} FROM entries WHERE rrn IN (SELECT value FROM json_each(?1)) "
    f"UNION SELECT {TXN_COLUMNS} FROM entries "
    "WHERE original_rrn <> '' AND original_rrn IN (SELECT value FROM json_each(?1)) ORDER BY seq"
)


class SqliteBackend(SqlBackend):
    dialect = SQLITE

    def __init__(
        self, path: str | Path, *, create: bool = True, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
    ) -> None:
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        if not create and self.path != ":memory:" and not Path(self.path).exists():
            raise LedgerStorageError(f"no ledger database at {self.path}")
        super().__init__()
        if create:
            self.create_schema()
        elif self.index_db and self._index_file_missing():
            self.create_schema()  # a schema-3 ledger whose index file is gone: an empty one (all tail)

    _checkpointer: WalCheckpointer | None = None
    #: Run on the C batch writer's connection when it opens; `_check_durability` then reads back
    #: what the commits depend on.
    _BATCH_WRITER_PRAGMAS: tuple[str, ...] = ("PRAGMA synchronous = FULL",)
    #: The C batch writer (module docstring), opened at the first batch; False: not available.
    _batch_writer: Any = None
    _autocheckpoint_pages: int | None = None

    def start_background_checkpoints(self) -> None:
        """Move WAL checkpoints off this connection's commits onto a thread with its own connection
        (see the module docstring). For the writer's backend; a no-op in memory or when started."""
        if self.path == ":memory:" or self._checkpointer is not None:
            return
        self._autocheckpoint_pages = WRITER_AUTOCHECKPOINT_PAGES
        pragma = f"PRAGMA main.wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}"
        self.conn.execute(pragma)
        if self._batch_writer:  # it commits: its own automatic checkpoint is the one that counts
            self._batch_writer.execute(pragma)
        self._checkpointer = WalCheckpointer(self.path, self.busy_timeout_ms)

    def write_batch(self, batch: Any) -> None:
        writer = self._batch_writer if self._batch_writer is not None else self._open_batch_writer()
        if writer:
            tables: list[tuple[int, list[Any]]] = []
            if batch.entries:
                tables.append((0, batch.entries))
            if batch.nodes:
                tables.append((1, batch.nodes))
            if batch.balances:
                tables.append((2, batch.balances))
            if batch.tree_head is not None:
                tables.append((3, [batch.tree_head]))
            if batch.checkpoint is not None:
                tables.append((4, [batch.checkpoint]))
            try:
                writer.write(tables)
            except (RuntimeError, ValueError, TypeError, OverflowError, UnicodeError) as exc:
                raise LedgerStorageError(f"ledger commit failed: {exc}") from exc
        else:
            super().write_batch(batch)
        if self._checkpointer is not None:
            self._checkpointer.committed(len(batch.entries))

    def writes_without_gil(self) -> bool:
        """Whether `write_batch` commits with the GIL released once it has copied the rows out (the
        C batch writer; switch.ledger.writer "Pipeline" then waits for its committer to start)."""
        writer = self._batch_writer if self._batch_writer is not None else self._open_batch_writer()
        return bool(writer)

    def _open_batch_writer(self) -> Any:
        """The C batch writer of a file database when the extension runs; False otherwise (then
        batches go through sqlite3). Opened at the first batch: readers never write."""
        self._batch_writer = False
        open_writer = fast.sqlite_batch_writer() if self.path != ":memory:" else None
        if open_writer is None:
            return False
        pragmas = list(self._BATCH_WRITER_PRAGMAS)
        if self._autocheckpoint_pages is not None:
            pragmas.append(f"PRAGMA main.wal_autocheckpoint = {self._autocheckpoint_pages}")
        inserts = [self.dialect.insert(t, c) for t, c in _TABLE_COLUMNS.items()]
        inserts += [self._sql_head, self._sql_checkpoint]
        try:
            writer = open_writer(self.path, self.busy_timeout_ms, inserts, pragmas)
        except (RuntimeError, MemoryError) as exc:
            log.warning("ledger: batches go through sqlite3 (%s)", exc)
            return False
        try:
            _check_durability(writer, self.path)
        except BaseException:
            writer.close()
            self._batch_writer = None  # not False: every batch tries again and fails the same way
            raise
        self._batch_writer = writer
        return writer

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._batch_writer:
            self._batch_writer.close()
        self._batch_writer = None
        super().close()

    def create_schema(self) -> None:
        """Create or upgrade the schema; a current one is left alone without a write transaction:
        BEGIN IMMEDIATE takes the write locks of both files, and holding the entries file's while
        waiting for the index file's (an index run in progress) would stop the writer's commits."""
        if self.index_db and self._schema_current():
            return
        super().create_schema()

    def _schema_current(self) -> bool:
        main = self._all("SELECT 1 FROM main.sqlite_master WHERE name = 'ledger_meta'")
        if not main:
            return False
        version = self._all("SELECT value FROM main.ledger_meta WHERE key = 'schema_version'")
        return bool(version) and version[0][0] == str(SCHEMA_VERSION) and not self._index_file_missing()

    def _index_file_missing(self) -> bool:
        """Schema 3 and no index tables in the index file (deleted, or never copied with a backup)."""
        version = self._all("SELECT value FROM main.ledger_meta WHERE key = 'schema_version'")
        if not version or version[0][0] != str(SCHEMA_VERSION):
            return False
        return not self._all(f"SELECT 1 FROM {INDEX_SCHEMA}.sqlite_master WHERE name = 'index_runs'")

    def _connect(self) -> Any:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal" and self.path != ":memory:":
                raise LedgerStorageError(f"{self.path}: cannot switch to WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            if self.path != ":memory:":
                attach_index(conn, self.path)
        except sqlite3.Error as exc:
            raise LedgerStorageError(f"cannot open ledger {self.path}: {exc}") from None
        return conn

    @property
    def index_db(self) -> str:  # type: ignore[override]
        return "" if self.path == ":memory:" else f"{INDEX_SCHEMA}."

    def _begin(self, cur: Any) -> None:
        # One file: BEGIN IMMEDIATE takes its write lock up front. Two files: IMMEDIATE would lock
        # both, so a deferred BEGIN; the first write takes the lock of the file it writes only.
        cur.execute("BEGIN IMMEDIATE" if self.path == ":memory:" else "BEGIN")

    def _begin_schema(self, cur: Any) -> None:
        cur.execute("BEGIN IMMEDIATE")

    def open_reader(self) -> SqliteBackend | None:
        """A second connection for the writer's lookups while a batch commits (switch.ledger.writer,
        "Pipeline"); None for an in-memory database, which a second connection would not see."""
        if self.path == ":memory:":
            return None
        return SqliteBackend(self.path, create=False, busy_timeout_ms=self.busy_timeout_ms)

    def open_indexer(self) -> SqliteBackend | None:
        """The connection of the writer's background index runs (switch.ledger.writer); None for an
        in-memory database (runs then happen in line)."""
        return self.open_reader()

    def _insert_many(self, cur: Any, table: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Multi-row INSERTs in chunks of MAX_ROWS_PER_INSERT, then of falling powers of two."""
        columns = _TABLE_COLUMNS.get(table)
        if columns is None:
            cur.executemany(sql, rows)
            return
        i, n = 0, len(rows)
        while i < n:
            k = min(MAX_ROWS_PER_INSERT, 1 << ((n - i).bit_length() - 1))
            cur.execute(_multi_insert(table, columns, k), list(chain.from_iterable(rows[i : i + k])))
            i += k

    # --- writer side: one constant statement per lookup (see the module docstring) ---------------
    def find_idempotency(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        if not keys:
            return {}
        rows = self._all(_SQL_IDEMPOTENCY, (_json.encode(list(keys)),))
        return {key: (seq, bytes(body)) for key, seq, body in rows}

    def find_idempotency_indexed(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        if not keys:
            return {}
        rows = self._all(_SQL_IDEMPOTENCY_INDEXED, (_json.encode(list(keys)),))
        return {key: (seq, bytes(body)) for key, seq, body in rows}

    def txn_rows(self, rrns: Iterable[str]) -> list[TxnRow]:
        wanted = sorted(set(rrns))
        if not wanted:
            return []
        return [TxnRow(*r) for r in self._all(_SQL_TXN_ROWS, (_json.encode(wanted),))]


def _check_durability(writer: Any, path: str) -> None:
    """Refuse a C batch writer whose connection would not commit as the sqlite3 path does: the
    database in WAL mode, synchronous = FULL (2), read back on that very connection.

    Raises LedgerStorageError rather than falling back to sqlite3: the fallback writes the same file
    through the same library, so whatever kept these settings from holding (a file not in WAL
    mode, a library that refuses the setting) is a fault to stop on, not to route around -- a
    payments ledger must not commit with less durability than it states."""
    try:
        mode = writer.pragma("journal_mode")
        sync = writer.pragma("synchronous")
    except RuntimeError as exc:
        writer_error = f"cannot read the batch writer's settings: {exc}"
        raise LedgerStorageError(f"ledger {path}: {writer_error}") from exc
    if (mode or "").lower() != "wal" or sync != "2":
        raise LedgerStorageError(
            f"ledger {path}: the batch writer's connection has journal_mode={mode}, synchronous={sync}"
            " (need wal and 2, FULL)"
        )


class WalCheckpointer:
    """A thread running PASSIVE WAL checkpoints of one ledger file (and its index file) on a
    connection of its own, every CHECKPOINT_EVERY_ENTRIES committed entries and at least every
    CHECKPOINT_IDLE_S. A failed
    checkpoint is logged and retried the next time: it never fails a commit (the writer's own
    automatic checkpoint still bounds the WAL)."""

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        attach_index(self._conn, path)
        self._wake = threading.Event()
        self._since = 0  # entries committed since the last checkpoint (the committing thread adds)
        self._next_at = 0.0  # monotonic time from which a commit wakes the checkpointer anyway
        self._stopping = False
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._loop, name="ledger-wal-checkpointer", daemon=True)
        self._thread.start()

    def committed(self, entries: int) -> None:
        """A batch of `entries` is durable (called by the one thread that commits)."""
        self._since += entries
        if self._since >= CHECKPOINT_EVERY_ENTRIES or time.monotonic() >= self._next_at:
            self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._conn.close()

    def _loop(self) -> None:
        while True:
            poked = self._wake.wait(CHECKPOINT_IDLE_S)
            self._wake.clear()
            if self._stopping:
                return
            self._since = 0
            self._next_at = time.monotonic() + CHECKPOINT_MIN_INTERVAL_S
            try:
                for _ in range(CHECKPOINT_CHASE_ROUNDS):
                    busy, log_frames, done_frames = self._conn.execute(
                        "PRAGMA main.wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if busy or log_frames == done_frames or self._stopping:
                        break
                if not poked:  # the index file's WAL (index runs are rare: no hurry)
                    self._conn.execute(f"PRAGMA {INDEX_SCHEMA}.wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            except sqlite3.Error as exc:
                log.warning("ledger WAL checkpoint failed (retried): %s", exc)


def index_path(db_path: str | Path) -> str:
    """The index file of the SQLite ledger at `db_path` (back it up with the database)."""
    return f"{db_path}{INDEX_FILE_SUFFIX}"


def attach_index(conn: sqlite3.Connection, db_path: str | Path) -> None:
    """Attach the ledger's index file to `conn` (a connection to the ledger file at `db_path`), so the
    index tables resolve by their plain names. Raw-SQL readers of the ledger (the merchant registry)
    use this too; they must not write in a transaction that spans both files."""
    conn.execute(f"ATTACH DATABASE ? AS {INDEX_SCHEMA}", (index_path(db_path),))
    mode = conn.execute(f"PRAGMA {INDEX_SCHEMA}.journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise LedgerStorageError(f"{index_path(db_path)}: cannot switch to WAL (got {mode})")
    conn.execute(f"PRAGMA {INDEX_SCHEMA}.synchronous = FULL")


_multi_cache: dict[tuple[str, int], str] = {}


def _multi_insert(table: str, columns: tuple[str, ...], rows: int) -> str:
    sql = _multi_cache.get((table, rows))
    if sql is None:
        one = "(" + ", ".join("?" * len(columns)) + ")"
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([one] * rows)
        _multi_cache[(table, rows)] = sql
    return sql
