"""Pre-stored ("armed") reversals: written durably BEFORE an acquirer request leaves.

Why: between writing a request to the acquirer and committing its outcome to the ledger the switch can
crash. If the acquirer approved, money moved that the ledger does not show. So the processor hands the
reversal of every request along with it (`SendToAcquirer.reversal`); the server stores it here first
(one fsync per batch of requests), and every armed reversal is later either fired (`QueueReversal`
moves it to store-and-forward) or released (`ReleaseReversal`, the outcome is durable). At start-up the
armed ones still here are given to the processor (`Recovered.armed`), which fires those the ledger does
not explain.

Releases are written without waiting for the fsync (synchronous=NORMAL for that transaction): a release
lost in a crash only leaves a spurious armed row, which recovery resolves against the ledger. Arms
always wait for the fsync (synchronous=FULL).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from switch.codec.masking import WIPED_FIELDS

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(dict[str, str])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS armed (
    acquirer   TEXT NOT NULL,
    rrn        TEXT NOT NULL,
    fields     BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (acquirer, rrn)
);
"""


#: Rows per multi-row INSERT/DELETE statement of `apply` (4 parameters each; SQLite allows 32,766).
MAX_ROWS_PER_STATEMENT = 500
_INSERT = "INSERT OR REPLACE INTO armed (acquirer, rrn, fields, created_ms) VALUES "
_DELETE = "DELETE FROM armed WHERE (acquirer, rrn) IN (VALUES "


class ArmedStoreError(RuntimeError):
    """The armed-reversal file cannot be used; the message names the path."""


class ArmedStore:
    """Armed reversals in one SQLite file (WAL). Card data: the PAN is kept (the reversal needs it);
    track data, PIN block, ICC data and MACs are dropped before writing."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def arm_many(self, items: Iterable[tuple[str, str, Mapping[str, Any] | None]], now_ms: int) -> None:
        """Store (acquirer, rrn, reversal fields) durably; returns after the fsync."""
        rows = [
            (acq, rrn, _enc.encode({k: str(v) for k, v in f.items() if k not in WIPED_FIELDS}), now_ms)
            for acq, rrn, f in items
            if f is not None
        ]
        if not rows:
            return
        with self._lock:
            self._write(
                "FULL",
                "INSERT OR REPLACE INTO armed (acquirer, rrn, fields, created_ms) VALUES (?,?,?,?)",
                rows,
            )

    def release_many(self, items: Iterable[tuple[str, str]]) -> None:
        rows = list(items)
        if not rows:
            return
        with self._lock:
            self._write("NORMAL", "DELETE FROM armed WHERE acquirer = ? AND rrn = ?", rows)

    def apply(self, ops: Iterable[tuple[bool, Any]]) -> None:
        """Inserts `(True, (acquirer, rrn, fields, now_ms))` and deletes `(False, (acquirer, rrn))` in
        the given order, in ONE transaction: fsynced (FULL) when it contains an insert, else NORMAL.

        The durable writer (switch.server.durable) groups everything queued meanwhile into one call.
        Runs of one kind become multi-row statements (`MAX_ROWS_PER_STATEMENT` rows each): the sqlite3
        module drops and retakes the GIL around every statement step, and on a busy trio thread each
        retake can wait a whole GIL switch interval, so a row per step would make the group slow."""
        runs: list[tuple[bool, list[tuple]]] = []
        any_insert = False
        for is_insert, item in ops:
            if is_insert:
                acq, rrn, f, now_ms = item
                if f is None:
                    continue
                row: tuple = (
                    acq,
                    rrn,
                    _enc.encode({k: str(v) for k, v in f.items() if k not in WIPED_FIELDS}),
                    now_ms,
                )
                any_insert = True
            else:
                row = (item[0], item[1])
            if runs and runs[-1][0] is is_insert:
                runs[-1][1].append(row)
            else:
                runs.append((is_insert, [row]))
        if not runs:
            return
        with self._lock:
            conn = self._conn
            try:
                conn.execute(f"PRAGMA synchronous={'FULL' if any_insert else 'NORMAL'}")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for is_insert, rows in runs:
                        for i in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
                            chunk = rows[i : i + MAX_ROWS_PER_STATEMENT]
                            params = [v for r in chunk for v in r]
                            if is_insert:
                                conn.execute(_INSERT + ",".join(["(?,?,?,?)"] * len(chunk)), params)
                            else:
                                conn.execute(_DELETE + ",".join(["(?,?)"] * len(chunk)) + ")", params)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None

    def all(self) -> list[tuple[str, str, dict[str, str]]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT acquirer, rrn, fields FROM armed ORDER BY created_ms"
            ).fetchall()
        return [(a, r, _dec.decode(f)) for a, r, f in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM armed").fetchone()[0])

    def _write(self, sync: str, sql: str, rows: list[tuple]) -> None:
        conn = self._conn
        try:
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None
