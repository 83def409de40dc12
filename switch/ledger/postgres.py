"""PostgreSQL backend on psycopg 3: the same schema, triggers and queries as SQLite, bulk writes by COPY.

Why these choices:
- Durability is the server's default commit: `synchronous_commit` at least `on` (a COMMIT returns after
  the WAL is flushed). We refuse a server running with `fsync=off` and raise a session's
  `synchronous_commit=off` back to `on`: an acknowledgement must mean the entry survives a crash.
- Bulk rows go in with binary COPY (one round trip per table per batch; ~2x executemany here). Column
  types are declared once, so Python ints always travel as int8 and bytes as bytea.
- The connection runs in autocommit mode and `write_batch` opens its own `BEGIN ... COMMIT`: reads never
  leave an idle transaction open (which would hold back vacuum and hide later commits from a reader).
- One writer per ledger: a backend opened with `writer=True` (the writer thread's) holds a session-level
  advisory lock for its life, taken before the writer loads its state; every write transaction also
  takes the same lock at transaction level, so any other session's batch waits (bounded) instead of
  interleaving. After a crash the new writer waits for the dead writer's session to end first.
- Every wait is bounded: connect timeout, statement timeout (covers a COMMIT stuck on a dead disk) and
  TCP keepalives; a broken connection is reopened on the next call, never silently reused.

Ambiguous commits: if the connection dies after COMMIT was sent, the batch may or may not be durable.
`write_batch` raises (callers are failed: no false success); the writer must re-read its state
(`entry_count`) before the next batch, and idempotency keys make retries safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from switch.ledger.backend import (
    BALANCE_COLUMNS,
    COPY_TYPES,
    ENTRY_COLUMNS,
    NODE_COLUMNS,
    POSTGRES,
    SCHEMA_VERSION,
    TAIL_BLOCKS_CTE,
    TAIL_KEY_FILTER,
    TXN_COLUMNS,
    UPGRADABLE_VERSIONS,
    BatchRows,
    LedgerStorageError,
    SqlBackend,
    TxnRow,
)

#: Bounds on every wait on the server (named limits, overridable per backend).
DEFAULT_CONNECT_TIMEOUT_S = 10
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
#: How long a writer waits for the previous writer's session to end (a killed process's server side
#: may still be finishing its last COMMIT) before giving up.
DEFAULT_WRITER_LOCK_TIMEOUT_MS = 10_000
#: Writer lock: pg_advisory_lock(ADVISORY_LOCK_CLASS, hashtext(current_schema())) -- one per ledger
#: schema, so two ledgers in one database (different search_path) do not exclude each other.
ADVISORY_LOCK_CLASS = 0x1ED6E5
_LOCK_ARGS = "%s, hashtext(current_schema())"
#: synchronous_commit values that mean "durable on this server before COMMIT returns" (or stronger).
DURABLE_COMMIT_LEVELS = frozenset({"on", "local", "remote_write", "remote_apply"})

#: Columns of the tables written by binary COPY (types: backend.COPY_TYPES, same order).
_COPY_COLUMNS: dict[str, tuple[str, ...]] = {
    "entries": ENTRY_COLUMNS,
    "merkle_nodes": NODE_COLUMNS,
    "balance_history": BALANCE_COLUMNS,
}


class PostgresBackend(SqlBackend):
    """A ledger in one PostgreSQL database (schema created on first use unless create=False)."""

    dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        create: bool = True,
        connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        writer: bool = False,
        writer_lock_timeout_ms: int = DEFAULT_WRITER_LOCK_TIMEOUT_MS,
    ) -> None:
        if min(connect_timeout_s, statement_timeout_ms, writer_lock_timeout_ms) <= 0:
            raise ValueError("connect_timeout_s, statement_timeout_ms and writer_lock_timeout_ms must be > 0")
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self.writer = writer
        self.writer_lock_timeout_ms = writer_lock_timeout_ms
        super().__init__()
        self._copy_sql = {
            table: sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
            )
            for table, columns in _COPY_COLUMNS.items()
        }
        if create:
            self.create_schema()
        elif not self._has_schema():
            raise LedgerStorageError(f"no ledger schema in database {self._where()}")

    # --- connection -----------------------------------------------------------------------------
    def _connect(self) -> Any:
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=self.connect_timeout_s,
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
                application_name="switch-ledger",
            )
        except psycopg.Error as exc:
            raise LedgerStorageError(f"cannot connect to ledger database {self._where()}: {exc}") from None
        try:
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
            fsync = conn.execute("SHOW fsync").fetchone()
            if fsync is None or fsync[0] != "on":
                raise LedgerStorageError(
                    f"ledger database {self._where()} runs with fsync={fsync and fsync[0]}: "
                    "commits would not be durable"
                )
            level = conn.execute("SHOW synchronous_commit").fetchone()
            if level is None or level[0] not in DURABLE_COMMIT_LEVELS:
                conn.execute("SET synchronous_commit = on")
            if self.writer:
                self._claim_writer(conn)
        except psycopg.Error as exc:
            conn.close()
            raise LedgerStorageError(f"cannot set up ledger session on {self._where()}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _claim_writer(self, conn: Any) -> None:
        """Hold the ledger's writer lock for this session's life, waiting (bounded) for a previous
        writer's session to end: its last COMMIT is then settled, so the state the writer loads next
        (entry count, Merkle edge) is final. A live second writer makes this fail, not interleave."""
        conn.execute(f"SET lock_timeout = {int(self.writer_lock_timeout_ms)}")
        try:
            conn.execute(f"SELECT pg_advisory_lock({_LOCK_ARGS})", (ADVISORY_LOCK_CLASS,))
        except psycopg.errors.LockNotAvailable:
            raise LedgerStorageError(
                f"another ledger writer holds {self._where()} (waited {self.writer_lock_timeout_ms} ms)"
            ) from None
        conn.execute("RESET lock_timeout")

    def open_reader(self) -> PostgresBackend:
        """A second session for the writer's lookups while a batch commits (switch.ledger.writer,
        "Pipeline"); it never writes, so it takes no writer lock."""
        return PostgresBackend(
            self.dsn,
            create=False,
            connect_timeout_s=self.connect_timeout_s,
            statement_timeout_ms=self.statement_timeout_ms,
        )

    def open_indexer(self) -> PostgresBackend:
        """The session of the writer's background index runs (switch.ledger.writer)."""
        return self.open_reader()

    def write_index_run(self, from_seq: int, to_seq: int, at_ms: int) -> None:
        self._ensure_connected()
        super().write_index_run(from_seq, to_seq, at_ms)

    def _has_schema(self) -> bool:
        row = self._all("SELECT to_regclass('ledger_meta') IS NOT NULL")[0]
        return bool(row[0]) and self.meta("schema_version") is not None

    def _where(self) -> str:
        """The DSN without secrets, for error messages."""
        try:
            params = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "(unparseable DSN)"
        return " ".join(f"{k}={v}" for k, v in params.items() if k in ("host", "port", "dbname", "user"))

    def _ensure_connected(self) -> None:
        """Reopen a connection the server or network broke (a failed batch left it unusable)."""
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = self._connect()

    def close(self) -> None:
        self.conn.close()

    # --- SqlBackend hooks -------------------------------------------------------------------------
    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN")
        cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK_ARGS})", (ADVISORY_LOCK_CLASS,))

    def _begin_index_run(self, cur: Any) -> None:
        # Not the writer's lock: the writer's session holds it for its life, and a run must not wait
        # for (or hold up) the writer's commits; MVCC lets both write at once. A lock of its own
        # keeps two runs from racing (the watermark check and the primary keys would refuse one).
        cur.execute("BEGIN")
        cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK_ARGS})", (ADVISORY_LOCK_CLASS + 1,))

    def _insert_many(self, cur: Any, table: str, sql_text: str, rows: list[tuple[Any, ...]]) -> None:
        copy_sql = self._copy_sql.get(table)
        if copy_sql is None:
            cur.executemany(sql_text, rows)
            return
        with cur.copy(copy_sql) as copy:
            copy.set_types(list(COPY_TYPES[table]))
            for row in rows:
                copy.write_row(row)

    def _all(self, sql_text: str, params: Any = ()) -> list[Any]:
        self._ensure_connected()
        return super()._all(sql_text, params)

    # --- writer side ------------------------------------------------------------------------------
    # The writer looks up every key and rrn of a batch before writing it. One statement with a text[]
    # parameter (`= ANY(%s)`) instead of IN-lists of 900 placeholders: constant SQL text, so psycopg
    # prepares it once, and PostgreSQL plans it in microseconds (measured: the IN-list versions cost
    # ~30 us per entry, more than the COPY and the commit together).
    _SQL_IDEMPOTENCY_INDEXED = (
        "SELECT e.idempotency_key, e.seq, e.body FROM key_index k "
        "JOIN entries e ON e.seq = k.seq AND e.idempotency_key = k.idempotency_key "
        "WHERE k.idempotency_key = ANY(%(keys)s)"
    )
    _SQL_IDEMPOTENCY = (
        f"{TAIL_BLOCKS_CTE}{_SQL_IDEMPOTENCY_INDEXED} UNION ALL "
        "SELECT idempotency_key, seq, body FROM entries "
        f"WHERE {TAIL_KEY_FILTER} AND idempotency_key = ANY(%(keys)s)"
    )
    _SQL_TXN_ROWS = (
        f"SELECT {TXN_COLUMNS} FROM entries WHERE rrn = ANY(%s) "
        f"UNION SELECT {TXN_COLUMNS} FROM entries WHERE original_rrn <> '' AND original_rrn = ANY(%s)"
    )

    def find_idempotency(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        if not keys:
            return {}
        rows = self._all(self._SQL_IDEMPOTENCY, {"keys": list(keys)})
        return {key: (int(seq), bytes(body)) for key, seq, body in rows}

    def find_idempotency_indexed(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        if not keys:
            return {}
        rows = self._all(self._SQL_IDEMPOTENCY_INDEXED, {"keys": list(keys)})
        return {key: (int(seq), bytes(body)) for key, seq, body in rows}

    def txn_rows(self, rrns: Iterable[str]) -> list[TxnRow]:
        wanted = sorted(set(rrns))
        if not wanted:
            return []
        rows = self._all(self._SQL_TXN_ROWS, (wanted, wanted))
        return sorted((TxnRow(*r) for r in rows), key=lambda r: r.seq)

    def create_schema(self) -> None:
        """Create the schema if it is missing. An existing one is left alone (no lock taken): re-running
        the DDL would queue behind a live writer's lock and briefly lock every table."""
        self._ensure_connected()
        try:
            if self._has_schema():
                version = self.meta("schema_version")
                if version in {str(v) for v in UPGRADABLE_VERSIONS}:
                    super().create_schema()  # upgrades in place, under the schema's write lock
                    return
                if version != str(SCHEMA_VERSION):
                    raise LedgerStorageError(
                        f"ledger schema version {version} in {self._where()} is not the supported "
                        f"{SCHEMA_VERSION}"
                    )
                return
            super().create_schema()
        except psycopg.Error as exc:
            raise LedgerStorageError(f"cannot create ledger schema in {self._where()}: {exc}") from None

    def write_batch(self, batch: BatchRows) -> None:
        self._ensure_connected()
        super().write_batch(batch)
