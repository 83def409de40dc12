"""SQLite backend: the embedded default (one file, nothing to install).

Durability: WAL journal with synchronous=FULL, so a COMMIT returns only after the WAL is fsync'd; one
write transaction per group commit (BEGIN IMMEDIATE takes the write lock up front, so a second writer
fails fast with "database is locked" after busy_timeout_ms instead of deadlocking mid-batch).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from switch.ledger.backend import SQLITE, LedgerStorageError, SqlBackend

#: How long a statement waits for another connection's lock before failing.
DEFAULT_BUSY_TIMEOUT_MS = 5_000


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
