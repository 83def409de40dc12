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

Card data: the PAN is stored (the acquirer needs it to find the original); track data, PIN block, CVV,
ICC data and MACs (masking.WIPED_FIELDS) are dropped before the row is written, and the caller sets
fields 11 (the link's STAN), 7 and 64 at send time. The file is therefore card-data sensitive; protect it
like the ledger.

Sans-I/O apart from the SQLite file: the clock is an argument. One connection guarded by a lock, so the
server may call from a worker thread (trio.to_thread) without tying the queue to one thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from switch.codec.masking import WIPED_FIELDS, mask_fields
from switch.config import StoreForwardConfig

#: Original MTI -> the MTI of its repeats.
REPEAT_MTI: dict[str, str] = {"0400": "0401", "0420": "0421", "0120": "0121", "0220": "0221"}
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS saf_item (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id completes nothing
    dedup_key     TEXT UNIQUE,
    acquirer      TEXT NOT NULL,
    mti           TEXT NOT NULL,
    fields        BLOB NOT NULL,
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
_fields_encoder = msgspec.json.Encoder()
_fields_decoder = msgspec.json.Decoder(dict[str, str])


class StoreForwardError(RuntimeError):
    """The queue file cannot be used (unreadable, wrong schema); the message names the path."""


class StoreForwardFullError(StoreForwardError):
    """``store_forward.max_depth`` items are pending: the caller must not acknowledge (answer 96)."""


class SafItem(msgspec.Struct, frozen=True):
    """One pending reversal or advice as stored."""

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


def _row_to_item(row: tuple) -> SafItem:
    return SafItem(
        id=row[0],
        dedup_key=row[1],
        acquirer=row[2],
        mti=row[3],
        fields=_fields_decoder.decode(row[4]),
        created_ms=row[5],
        attempts=row[6],
        next_due_ms=row[7],
        last_sent_ms=row[8],
    )


class StoreForward:
    """The queue over one SQLite file. Open with :meth:`open`; :meth:`close` when done."""

    def __init__(self, conn: sqlite3.Connection, config: StoreForwardConfig, path: str) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.config = config
        self.path = path
        self._depth = conn.execute("SELECT count(*) FROM saf_item WHERE completed_ms IS NULL").fetchone()[0]

    @classmethod
    def open(cls, config: StoreForwardConfig, path: str | Path | None = None) -> StoreForward:
        """Open (creating if needed) the queue at ``path`` or ``config.path``; pending items survive."""
        if config.retry_interval_ms < 1 or config.max_retry_interval_ms < config.retry_interval_ms:
            raise StoreForwardError(
                "store_forward: need 1 <= retry_interval_ms <= max_retry_interval_ms, got "
                f"{config.retry_interval_ms} and {config.max_retry_interval_ms}"
            )
        if config.max_depth < 1:
            raise StoreForwardError(f"store_forward.max_depth must be >= 1, got {config.max_depth}")
        where = str(path if path is not None else config.path)
        try:
            if where != ":memory:":
                Path(where).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                conn.close()
                raise StoreForwardError(
                    f"store-and-forward file {where}: schema version {version}, "
                    f"this build reads {SCHEMA_VERSION}"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreForwardError(f"store-and-forward file {where}: {exc}") from None
        return cls(conn, config, where)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StoreForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreForward({self.path!r}, depth={self._depth})"

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
            clean = {k: str(v) for k, v in fields.items() if k not in WIPED_FIELDS and k != "t"}
            rows.append((dedup_key, acquirer, mti, _fields_encoder.encode(clean), now_ms, now_ms))
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
                cur = self._conn.execute(
                    "INSERT INTO saf_item (dedup_key, acquirer, mti, fields, created_ms, next_due_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
                ids.append(int(cur.lastrowid or 0))
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
        """The acquirer answered: the item is done. False when it was already complete or unknown."""
        with self._lock, self._txn():
            cur = self._conn.execute(
                "UPDATE saf_item SET completed_ms = ?, response_code = ? "
                "WHERE id = ? AND completed_ms IS NULL",
                (now_ms, response_code, item_id),
            )
            done = cur.rowcount == 1
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
        return [_row_to_item(r) for r in rows]

    def get(self, item_id: int) -> SafItem | None:
        """A pending item by id (None once complete)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM saf_item WHERE id = ? AND completed_ms IS NULL", (item_id,)
            ).fetchone()
        return _row_to_item(row) if row else None

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
