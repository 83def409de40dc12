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
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from switch.ledger.backend import (
    SQLITE,
    TXN_COLUMNS,
    LedgerStorageError,
    SqlBackend,
    TxnRow,
)

#: How long a statement waits for another connection's lock before failing.
DEFAULT_BUSY_TIMEOUT_MS = 5_000
_json = msgspec.json.Encoder()
_SQL_IDEMPOTENCY = (
    "SELECT idempotency_key, seq, body FROM entries "
    "WHERE idempotency_key IN (SELECT value FROM json_each(?1))"
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
        except sqlite3.Error as exc:
            raise LedgerStorageError(f"cannot open ledger {self.path}: {exc}") from None
        return conn

    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN IMMEDIATE")

    # --- writer side: one constant statement per lookup (see the module docstring) ---------------
    def find_idempotency(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        if not keys:
            return {}
        rows = self._all(_SQL_IDEMPOTENCY, (_json.encode(list(keys)),))
        return {key: (seq, bytes(body)) for key, seq, body in rows}

    def txn_rows(self, rrns: Iterable[str]) -> list[TxnRow]:
        wanted = sorted(set(rrns))
        if not wanted:
            return []
        return [TxnRow(*r) for r in self._all(_SQL_TXN_ROWS, (_json.encode(wanted),))]
