"""Pre-stored ("armed") reversals: written durably BEFORE an acquirer request leaves.

Why: between writing a request to the acquirer and committing its outcome to the ledger the switch can
crash. If the acquirer approved, money moved that the ledger does not show. So the processor hands the
reversal of every request along with it (`SendToAcquirer.reversal`); the server stores it here first
(one fsync per batch of requests), and every armed reversal is later either fired (`QueueReversal`
moves it to store-and-forward) or released (`ReleaseReversal`, the outcome is durable). At start-up the
armed ones still here are given to the processor (`Recovered.armed`), which fires those the ledger does
not explain.

Card data: the reversal needs the PAN, so it is kept sealed (switch.codec.sealing, AES-256-GCM under a
data key derived from the KEK, bound to the row's acquirer and RRN); track data, PIN block, ICC data and
MACs are never written; deleted bytes are zeroed (secure_delete). Rows written before sealing are
re-sealed, and the file vacuumed, when it is opened; every row must open under the KEK, or the start
stops with a clear error.

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

from switch.codec.keys import Kek
from switch.codec.sealing import FieldSealer, SealingError, decode_legacy, is_legacy, row_context

#: Purpose of this store's data keys (each store derives its own).
SEAL_PURPOSE = "armed"

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
    """Armed reversals in one SQLite file (WAL). Card data: the PAN is kept sealed under a data key
    derived from `kek` (`previous_keks` only open: KEK rotation); track data, PIN block, ICC data and
    MACs are dropped before writing."""

    def __init__(self, path: str | Path, *, kek: Kek, previous_keks: Iterable[Kek] = ()) -> None:
        self.path = str(path)
        self._sealer = FieldSealer(kek, SEAL_PURPOSE, previous=previous_keks)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.executescript(_SCHEMA)
            _seal_old_rows(self._conn, self._sealer)
        except (sqlite3.Error, OSError, SealingError) as exc:
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def arm_many(self, items: Iterable[tuple[str, str, Mapping[str, Any] | None]], now_ms: int) -> None:
        """Store (acquirer, rrn, reversal fields) durably; returns after the fsync."""
        seal = self._sealer.seal
        rows = [(acq, rrn, seal(f, _context(acq, rrn)), now_ms) for acq, rrn, f in items if f is not None]
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
                row: tuple = (acq, rrn, self._sealer.seal(f, _context(acq, rrn)), now_ms)
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
        """Every armed reversal, opened (recovery); ArmedStoreError names a row that does not open."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT acquirer, rrn, fields FROM armed ORDER BY created_ms"
            ).fetchall()
        try:
            return [(a, r, self._sealer.open(f, _context(a, r))) for a, r, f in rows]
        except SealingError as exc:
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None

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


def _context(acquirer: str, rrn: str) -> bytes:
    """The row identity a sealed armed reversal is bound to (the table's primary key)."""
    return row_context(SEAL_PURPOSE, acquirer, rrn)


def _seal_old_rows(conn: sqlite3.Connection, sealer: FieldSealer) -> None:
    """Check that every row opens; re-seal rows written in clear (before sealing) or under a previous
    KEK. After re-sealing clear rows the file is rebuilt and the WAL emptied, so no old page with a
    clear PAN survives."""
    fixed = []
    had_clear = False
    for acquirer, rrn, data in conn.execute("SELECT acquirer, rrn, fields FROM armed").fetchall():
        ctx = _context(acquirer, rrn)
        if is_legacy(data):
            fixed.append((sealer.seal(decode_legacy(data), ctx), acquirer, rrn))
            had_clear = True
            continue
        fields = sealer.open(data, ctx)
        if not sealer.sealed_under_current_kek(data):
            fixed.append((sealer.seal(fields, ctx), acquirer, rrn))
    if not fixed:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("UPDATE armed SET fields = ? WHERE acquirer = ? AND rrn = ?", fixed)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if had_clear:
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
