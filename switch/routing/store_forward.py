"""Durable store-and-forward queue: reversals and advices the switch owes an acquirer.

Why durable before acknowledging: a reversal exists because money may have moved at the acquirer while
the terminal was told "timed out". If the switch forgot it in a crash the cardholder would be charged
for nothing. So :meth:`StoreForward.append` returns only once the row is fsynced (SQLite WAL,
synchronous=FULL), and the caller answers the terminal after that.

Life of an item:
    append (0400 / 0420 / 0120 / 0220) -> due(now) -> mark_sent -> ... answer -> complete(id)
                                           ^                |
                                           +-- no answer: due again after the backoff, sent as a repeat
A repeat goes out with the repeat MTI (0401, 0421, 0121, 0221). Call :meth:`mark_sent` *before* writing
the bytes: if the process dies between the two, the item is still counted as sent and the next attempt
is a repeat, which an acquirer must accept (it answers a repeat of something it never saw like the
original). The reverse order could send a second "original" for a message already delivered.

Retry schedule: the n-th attempt is followed by ``min(max_retry_interval_ms, retry_interval_ms * 2**(n-1))``
of quiet; retries never stop (a reversal is owed until the acquirer answers), but the depth and the age
of the oldest item are exposed for alerting.

Card data: the acquirer needs the PAN to find the original, so it is kept, but sealed
(switch.codec.sealing: AES-256-GCM under a data key derived from the KEK, the row's id, acquirer, MTI
and clear fields bound as associated data). Track data, PIN block, CVV, ICC data and MACs
(masking.WIPED_FIELDS) are never written. Items are opened only when read to be sent (`due`, `get`);
a completed item's sealed part is removed at once, and deleted bytes are zeroed (secure_delete), so
the file holds no readable PAN. The caller sets fields 11 (the link's STAN), 7 and 64 at send time.
Opening the file checks that every pending item opens under the given KEK(s): a wrong KEK or an
altered row stops the start with a clear error, not the first send. Files of schema 1 (clear fields)
are re-sealed, vacuumed and their WAL truncated when first opened.

Sans-I/O apart from the SQLite file: the clock is an argument. One connection guarded by a lock, so the
server may call from a worker thread (trio.to_thread) without tying the queue to one thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from switch.codec.keys import Kek
from switch.codec.masking import WIPED_FIELDS, mask_fields
from switch.codec.sealing import (
    SEALED_FIELDS,
    FieldSealer,
    SealedRecord,
    SealingError,
    decode_legacy,
    decode_record,
    is_legacy,
    row_context,
)
from switch.config import StoreForwardConfig

#: Original MTI -> the MTI of its repeats.
REPEAT_MTI: dict[str, str] = {"0400": "0401", "0420": "0421", "0120": "0121", "0220": "0221"}
SCHEMA_VERSION = 2  # 2: `fields` holds a sealed record (switch.codec.sealing); 1: a clear field dict
#: Purpose of the data keys of this store (each store derives its own).
SEAL_PURPOSE = "saf"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS saf_item (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id completes nothing
    dedup_key     TEXT UNIQUE,
    acquirer      TEXT NOT NULL,
    mti           TEXT NOT NULL,
    fields        BLOB NOT NULL,  -- sealed record: clear fields + AES-GCM sealed PAN (none once done)
    created_ms    INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_due_ms   INTEGER NOT NULL,
    last_sent_ms  INTEGER,
    completed_ms  INTEGER,
    response_code TEXT
);
CREATE INDEX IF NOT EXISTS saf_pending_due ON saf_item (next_due_ms, id) WHERE completed_ms IS NULL;
CREATE INDEX IF NOT EXISTS saf_pending_age ON saf_item (created_ms) WHERE completed_ms IS NULL;
"""

_COLUMNS = "id, dedup_key, acquirer, mti, fields, created_ms, attempts, next_due_ms, last_sent_ms"
_record_encoder = msgspec.json.Encoder()


class StoreForwardError(RuntimeError):
    """The queue file cannot be used (unreadable, wrong schema); the message names the path."""


class StoreForwardFullError(StoreForwardError):
    """``store_forward.max_depth`` items are pending: the caller must not acknowledge (answer 96)."""


class SafItem(msgspec.Struct, frozen=True):
    """One pending reversal or advice, opened to be sent: `fields` holds the PAN in clear (repr masks)."""

    id: int
    dedup_key: str | None
    acquirer: str
    mti: str
    fields: dict[str, str]
    created_ms: int
    attempts: int
    next_due_ms: int
    last_sent_ms: int | None

    @property
    def send_mti(self) -> str:
        """The MTI for the next send: the original the first time, the repeat MTI after that."""
        return self.mti if self.attempts == 0 else REPEAT_MTI[self.mti]

    def __repr__(self) -> str:
        return (
            f"SafItem(id={self.id}, acquirer={self.acquirer!r}, mti={self.mti}, attempts={self.attempts}, "
            f"next_due_ms={self.next_due_ms}, fields={mask_fields(self.fields)!r})"
        )

    __str__ = __repr__


def _context(item_id: int, acquirer: str, mti: str) -> bytes:
    """The row identity a sealed record is bound to."""
    return row_context(SEAL_PURPOSE, item_id, acquirer, mti)


class StoreForward:
    """The queue over one SQLite file. Open with :meth:`open`; :meth:`close` when done."""

    def __init__(
        self, conn: sqlite3.Connection, config: StoreForwardConfig, path: str, sealer: FieldSealer
    ) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.config = config
        self.path = path
        self.sealer = sealer
        self._depth = conn.execute("SELECT count(*) FROM saf_item WHERE completed_ms IS NULL").fetchone()[0]

    @classmethod
    def open(
        cls,
        config: StoreForwardConfig,
        path: str | Path | None = None,
        *,
        kek: Kek,
        previous_keks: Iterable[Kek] = (),
    ) -> StoreForward:
        """Open (creating if needed) the queue at ``path`` or ``config.path``; pending items survive.

        ``kek`` seals new items and opens old ones; ``previous_keks`` only open (KEK rotation: pending
        items sealed under one of them are re-sealed under ``kek`` here)."""
        if config.retry_interval_ms < 1 or config.max_retry_interval_ms < config.retry_interval_ms:
            raise StoreForwardError(
                "store_forward: need 1 <= retry_interval_ms <= max_retry_interval_ms, got "
                f"{config.retry_interval_ms} and {config.max_retry_interval_ms}"
            )
        if config.max_depth < 1:
            raise StoreForwardError(f"store_forward.max_depth must be >= 1, got {config.max_depth}")
        where = str(path if path is not None else config.path)
        sealer = FieldSealer(kek, SEAL_PURPOSE, previous=previous_keks)
        try:
            if where != ":memory:":
                Path(where).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")  # freed bytes zeroed: no PAN left in free pages
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                conn.close()
                raise StoreForwardError(
                    f"store-and-forward file {where}: schema version {version}, "
                    f"this build reads {SCHEMA_VERSION} (and upgrades 1)"
                )
            conn.executescript(_SCHEMA)
            if version == 1:
                _upgrade_clear_rows(conn, sealer)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            _check_and_reseal(conn, sealer)
        except (sqlite3.Error, OSError) as exc:
            raise StoreForwardError(f"store-and-forward file {where}: {exc}") from None
        except SealingError as exc:
            conn.close()
            raise StoreForwardError(f"store-and-forward file {where}: {exc}") from None
        return cls(conn, config, where, sealer)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StoreForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreForward({self.path!r}, depth={self._depth})"

    def _item(self, row: tuple) -> SafItem:
        """A row opened for sending; StoreForwardError (naming the row, never a value) if it does not."""
        try:
            fields = self.sealer.open(row[4], _context(row[0], row[2], row[3]))
        except SealingError as exc:
            raise StoreForwardError(f"store-and-forward file {self.path}: {exc}") from None
        return SafItem(
            id=row[0],
            dedup_key=row[1],
            acquirer=row[2],
            mti=row[3],
            fields=fields,
            created_ms=row[5],
            attempts=row[6],
            next_due_ms=row[7],
            last_sent_ms=row[8],
        )

    # --- writing -------------------------------------------------------------------------------
    def append(
        self,
        acquirer: str,
        mti: str,
        fields: Mapping[str, str],
        now_ms: int,
        dedup_key: str | None = None,
    ) -> int:
        """Store one item durably and return its id. Returns once the row is on disk.

        ``dedup_key`` (say ``"reversal:" + rrn``) makes the append idempotent: an item already stored
        under that key, pending or completed, is not stored again and its id is returned.
        """
        return self.append_many([(acquirer, mti, fields, dedup_key)], now_ms)[0]

    def append_many(
        self, items: Iterable[tuple[str, str, Mapping[str, str], str | None]], now_ms: int
    ) -> list[int]:
        """Store several items in one durable commit (one fsync); ids in input order.

        All or nothing: when the batch would exceed max_depth nothing is stored.
        """
        rows = []
        for acquirer, mti, fields, dedup_key in items:
            if mti not in REPEAT_MTI:
                raise ValueError(f"store-and-forward takes {sorted(REPEAT_MTI)}, not MTI {mti!r}")
            if not acquirer:
                raise ValueError("store-and-forward item needs an acquirer name")
            clean = {k: v for k, v in fields.items() if k not in WIPED_FIELDS and k != "t"}
            rows.append((dedup_key, acquirer, mti, clean, now_ms, now_ms))
        ids: list[int] = []
        with self._lock, self._txn():
            added = 0
            for row in rows:
                dedup_key = row[0]
                if dedup_key is not None:
                    found = self._conn.execute(
                        "SELECT id FROM saf_item WHERE dedup_key = ?", (dedup_key,)
                    ).fetchone()
                    if found is not None:
                        ids.append(found[0])
                        continue
                if self._depth + added >= self.config.max_depth:
                    raise StoreForwardFullError(
                        f"store-and-forward queue holds {self._depth + added} pending items "
                        f"(store_forward.max_depth={self.config.max_depth})"
                    )
                # the id is part of the sealed record's associated data, so insert, then seal
                cur = self._conn.execute(
                    "INSERT INTO saf_item (dedup_key, acquirer, mti, fields, created_ms, next_due_ms) "
                    "VALUES (?, ?, ?, x'', ?, ?)",
                    (dedup_key, row[1], row[2], row[4], row[5]),
                )
                item_id = int(cur.lastrowid or 0)
                sealed = self.sealer.seal(row[3], _context(item_id, row[1], row[2]))
                self._conn.execute("UPDATE saf_item SET fields = ? WHERE id = ?", (sealed, item_id))
                ids.append(item_id)
                added += 1
        self._depth += added
        return ids

    def mark_sent(self, item_id: int, now_ms: int) -> None:
        """Record an attempt (before the bytes are written) and schedule the next retry."""
        self.mark_sent_many([item_id], now_ms)

    def mark_sent_many(self, item_ids: Iterable[int], now_ms: int) -> None:
        cfg = self.config
        with self._lock, self._txn():
            for item_id in item_ids:
                row = self._conn.execute(
                    "SELECT attempts FROM saf_item WHERE id = ? AND completed_ms IS NULL", (item_id,)
                ).fetchone()
                if row is None:
                    continue  # completed meanwhile (an answer to an earlier attempt): nothing to send
                attempts = row[0] + 1
                backoff_ms = min(
                    cfg.max_retry_interval_ms, cfg.retry_interval_ms * 2 ** min(attempts - 1, 40)
                )
                self._conn.execute(
                    "UPDATE saf_item SET attempts = ?, last_sent_ms = ?, next_due_ms = ? WHERE id = ?",
                    (attempts, now_ms, now_ms + backoff_ms, item_id),
                )

    def complete(self, item_id: int, now_ms: int, response_code: str | None = None) -> bool:
        """The acquirer answered: the item is done (and its sealed PAN removed: a completed item is
        kept for its dedup key only). False when it was already complete or unknown."""
        with self._lock, self._txn():
            row = self._conn.execute(
                "SELECT fields FROM saf_item WHERE id = ? AND completed_ms IS NULL", (item_id,)
            ).fetchone()
            done = row is not None
            if done:
                self._conn.execute(
                    "UPDATE saf_item SET completed_ms = ?, response_code = ?, fields = ? WHERE id = ?",
                    (now_ms, response_code, _stripped(row[0]), item_id),
                )
        if done:
            self._depth -= 1
        return done

    def prune_completed(self, completed_before_ms: int) -> int:
        """Delete completed items older than the cutoff (their dedup keys are forgotten). Returns count."""
        with self._lock, self._txn():
            cur = self._conn.execute(
                "DELETE FROM saf_item WHERE completed_ms IS NOT NULL AND completed_ms < ?",
                (completed_before_ms,),
            )
            return cur.rowcount

    # --- reading -------------------------------------------------------------------------------
    def due(self, now_ms: int, max_items: int = 100, acquirer: str | None = None) -> list[SafItem]:
        """Pending items whose next attempt is due, oldest due first, at most ``max_items``."""
        sql = f"SELECT {_COLUMNS} FROM saf_item WHERE completed_ms IS NULL AND next_due_ms <= ?"
        args: tuple = (now_ms,)
        if acquirer is not None:
            sql += " AND acquirer = ?"
            args += (acquirer,)
        sql += " ORDER BY next_due_ms, id LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*args, max_items)).fetchall()
        return [self._item(r) for r in rows]

    def get(self, item_id: int) -> SafItem | None:
        """A pending item by id (None once complete)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM saf_item WHERE id = ? AND completed_ms IS NULL", (item_id,)
            ).fetchone()
        return self._item(row) if row else None

    def next_due_ms(self, acquirer: str | None = None) -> int | None:
        """When :meth:`due` next returns something, or None when nothing is pending."""
        sql = "SELECT min(next_due_ms) FROM saf_item WHERE completed_ms IS NULL"
        args: tuple = ()
        if acquirer is not None:
            sql += " AND acquirer = ?"
            args = (acquirer,)
        with self._lock:
            return self._conn.execute(sql, args).fetchone()[0]

    def depth(self, acquirer: str | None = None) -> int:
        """Pending items (all, or one acquirer's): a metric and the max_depth bound."""
        if acquirer is None:
            return self._depth
        with self._lock:
            return self._conn.execute(
                "SELECT count(*) FROM saf_item WHERE completed_ms IS NULL AND acquirer = ?", (acquirer,)
            ).fetchone()[0]

    def oldest_age_ms(self, now_ms: int) -> int:
        """Age of the oldest pending item (0 when empty): alert when reversals stay undelivered."""
        with self._lock:
            oldest = self._conn.execute(
                "SELECT min(created_ms) FROM saf_item WHERE completed_ms IS NULL"
            ).fetchone()[0]
        return 0 if oldest is None else max(0, now_ms - oldest)

    # --- internals -----------------------------------------------------------------------------
    def _txn(self) -> _Transaction:
        return _Transaction(self._conn, self.path)


def _stripped(data: bytes) -> bytes:
    """A record without its sealed part (legacy clear rows lose their sealed fields too)."""
    try:
        clear = decode_record(data).clear
    except SealingError:
        clear = {k: v for k, v in decode_legacy(data).items() if k not in SEALED_OR_WIPED}
    return _record_encoder.encode(SealedRecord(clear, None))


SEALED_OR_WIPED = WIPED_FIELDS | SEALED_FIELDS


def _upgrade_clear_rows(conn: sqlite3.Connection, sealer: FieldSealer) -> None:
    """Schema 1 -> 2: seal the clear fields of pending items, drop them from completed ones, then
    rebuild the file and empty the WAL so no old page with a clear PAN survives anywhere."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute("SELECT id, acquirer, mti, fields, completed_ms FROM saf_item").fetchall()
        for item_id, acquirer, mti, data, completed_ms in rows:
            if not is_legacy(data):
                continue
            if completed_ms is None:
                fields = decode_legacy(data)
                new = sealer.seal(fields, _context(item_id, acquirer, mti))
            else:
                new = _stripped(data)
            conn.execute("UPDATE saf_item SET fields = ? WHERE id = ?", (new, item_id))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _check_and_reseal(conn: sqlite3.Connection, sealer: FieldSealer) -> None:
    """Every pending item must open (wrong KEK or altered rows stop the start, naming the row);
    items sealed under a previous KEK are re-sealed under the current one."""
    rows = conn.execute(
        "SELECT id, acquirer, mti, fields FROM saf_item WHERE completed_ms IS NULL"
    ).fetchall()
    stale = []
    for item_id, acquirer, mti, data in rows:
        ctx = _context(item_id, acquirer, mti)
        fields = sealer.open(data, ctx)
        if not sealer.sealed_under_current_kek(data):
            stale.append((sealer.seal(fields, ctx), item_id))
    if stale:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE saf_item SET fields = ? WHERE id = ?", stale)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; sqlite errors become StoreForwardError."""

    __slots__ = ("_conn", "_path")

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self._path = path

    def __enter__(self) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreForwardError(f"store-and-forward file {self._path}: {exc}") from None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except sqlite3.Error as err:
                self._conn.execute("ROLLBACK")
                raise StoreForwardError(f"store-and-forward file {self._path}: {err}") from None
        self._conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreForwardError(f"store-and-forward file {self._path}: {exc}") from None
