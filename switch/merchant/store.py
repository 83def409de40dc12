"""The registry store: merchants, contracts, terminals, terminal keys, renewals and cutovers, in the SAME
database as the ledger (its own tables), with an append-only audit table.

Why JSON bodies plus a few key columns: every record is a validated msgspec Struct; storing its JSON
keeps one code path for SQLite and PostgreSQL (the same SQL, only the placeholder differs) and lets a
record gain fields with defaults without a migration. Optimistic concurrency: each row has a `version`;
an update names the version it read and fails (`RegistryConflict`) if someone else changed the row
meanwhile, so the CLI, the API and the running switch never overwrite each other's changes silently.

Audit: every change writes, in the same transaction, one `registry_audit` row: who (actor), what
(action, object kind and id), when (at_ms), and the record before and after as JSON with key material
masked (`mask_record`). Triggers make the audit table append-only, like the ledger's tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from switch.ledger.backend import key_range_seqs_sql
from switch.ledger.sqlite import attach_index
from switch.merchant.model import (
    AuditRecord,
    Contract,
    Merchant,
    RegistryError,
    Renewal,
    Terminal,
    TerminalKey,
)

R = TypeVar("R", bound=msgspec.Struct)

#: object kind -> (table, record type). Keys are stored per (terminal, index): id "T1/0".
KINDS: dict[str, tuple[str, type[msgspec.Struct]]] = {
    "merchant": ("reg_merchants", Merchant),
    "contract": ("reg_contracts", Contract),
    "terminal": ("reg_terminals", Terminal),
    "key": ("reg_terminal_keys", TerminalKey),
    "renewal": ("reg_renewals", Renewal),
}
#: Busy wait for another connection's write lock (SQLite).
BUSY_TIMEOUT_MS = 5_000

_enc = msgspec.json.Encoder()


class RegistryConflict(RegistryError):
    """The record changed since it was read (or already exists / does not exist)."""


def mask_record(kind: str, record: msgspec.Struct | None) -> str:
    """JSON of a record safe for the audit trail: encrypted keys shown only by length and check value."""
    if record is None:
        return ""
    data = msgspec.to_builtins(record)
    if kind == "key":
        data["encrypted_hex"] = f"[encrypted key, {len(data.get('encrypted_hex', ''))} hex]"
    return _enc.encode(data).decode()


def schema(dialect: str) -> list[str]:
    big = "BIGINT" if dialect == "postgres" else "INTEGER"
    serial = "BIGSERIAL PRIMARY KEY" if dialect == "postgres" else "INTEGER PRIMARY KEY AUTOINCREMENT"
    stmts = [
        f"""CREATE TABLE IF NOT EXISTS {table} (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, version {big} NOT NULL, body TEXT NOT NULL)"""
        for table, _ in KINDS.values()
    ]
    stmts += [f"CREATE INDEX IF NOT EXISTS {t}_owner ON {t} (owner, id)" for t, _ in KINDS.values()]
    stmts.append(f"""CREATE TABLE IF NOT EXISTS reg_cutovers (
        to_seq {big} PRIMARY KEY, from_seq {big} NOT NULL, at_ms {big} NOT NULL, actor TEXT NOT NULL)""")
    stmts.append(f"""CREATE TABLE IF NOT EXISTS registry_audit (
        seq {serial}, at_ms {big} NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        object_kind TEXT NOT NULL, object_id TEXT NOT NULL, before TEXT NOT NULL, after TEXT NOT NULL)""")
    stmts.append(
        "CREATE INDEX IF NOT EXISTS registry_audit_object ON registry_audit (object_kind, object_id)"
    )
    for table in ("registry_audit", "reg_cutovers"):
        if dialect == "postgres":
            stmts += [
                "CREATE OR REPLACE FUNCTION registry_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN RAISE EXCEPTION 'registry table % is append-only', TG_TABLE_NAME; END $$",
                f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION registry_append_only()",
            ]
        else:
            stmts += [
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'registry table {table} is append-only'); END"
                for op in ("UPDATE", "DELETE")
            ]
    return stmts


class Cutover(msgspec.Struct, frozen=True):
    """A closed batch: ledger entries with from_seq <= seq < to_seq."""

    from_seq: int
    to_seq: int
    at_ms: int
    actor: str


class RegistryStore:
    """One DB-API connection (sqlite3 or psycopg) to the ledger's database. One thread at a time."""

    def __init__(self, conn: Any, dialect: str, ledger_path: str = "") -> None:
        self.conn = conn
        self.dialect = dialect
        #: SQLite file ledgers: reads of the ledger's index tables go through a second connection with
        #: the index file attached (switch.ledger.sqlite.attach_index), opened on first use, so the
        #: registry's own BEGIN IMMEDIATE never locks the index file (nor waits for an index run).
        self._ledger_path = ledger_path
        self._ledger_conn: Any = None
        self.p = "%s" if dialect == "postgres" else "?"
        self._write(lambda cur: [cur.execute(s) for s in schema(dialect)])

    @classmethod
    def open_sqlite(cls, path: str | Path) -> RegistryStore:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return cls(conn, "sqlite", "" if str(path) == ":memory:" else str(path))

    @classmethod
    def open_postgres(cls, dsn: str) -> RegistryStore:
        import psycopg

        return cls(psycopg.connect(dsn, autocommit=True), "postgres")

    def close(self) -> None:
        self.conn.close()
        if self._ledger_conn is not None:
            self._ledger_conn.close()

    def ledger_rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read-only query on the ledger's tables, index tables included."""
        if not self._ledger_path:
            return self._rows(sql, params)
        if self._ledger_conn is None:
            conn = sqlite3.connect(self._ledger_path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            attach_index(conn, self._ledger_path)
            self._ledger_conn = conn
        cur = self._ledger_conn.cursor()
        try:
            cur.execute(sql, params)
            return cur.fetchall()
        finally:
            cur.close()

    # --- plumbing --------------------------------------------------------------------------------
    def _write(self, fn: Any) -> Any:
        cur = self.conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            out = fn(cur)
            cur.execute("COMMIT")
            return out
        except BaseException:
            try:
                cur.execute("ROLLBACK")
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            return cur.fetchall()
        finally:
            cur.close()

    # --- records ---------------------------------------------------------------------------------
    def get(self, kind: str, id_: str, type_: type[R]) -> tuple[R, int] | None:
        table, _ = KINDS[kind]
        rows = self._rows(f"SELECT body, version FROM {table} WHERE id = {self.p}", (id_,))
        if not rows:
            return None
        return msgspec.json.decode(rows[0][0], type=type_), int(rows[0][1])

    def list(
        self, kind: str, type_: type[R], *, owner: str | None = None, after_id: str = "", limit: int = 1_000
    ) -> list[R]:
        table, _ = KINDS[kind]
        p = self.p
        where, params = f"id > {p}", [after_id]
        if owner is not None:
            where += f" AND owner = {p}"
            params.append(owner)
        rows = self._rows(f"SELECT body FROM {table} WHERE {where} ORDER BY id LIMIT {int(limit)}", params)
        return [msgspec.json.decode(r[0], type=type_) for r in rows]

    def save(
        self,
        kind: str,
        id_: str,
        owner: str,
        record: msgspec.Struct,
        *,
        actor: str,
        action: str,
        at_ms: int,
        expect_version: int | None,
    ) -> int:
        """Insert (expect_version=None: must not exist) or update (must be at `expect_version`), with
        the audit row, in one transaction. Returns the new version."""
        table, _ = KINDS[kind]
        p = self.p
        body = _enc.encode(record).decode()

        def tx(cur: Any) -> int:
            cur.execute(f"SELECT body, version FROM {table} WHERE id = {p}", (id_,))
            row = cur.fetchone()
            before = None
            if expect_version is None:
                if row is not None:
                    raise RegistryConflict(f"{kind} {id_} already exists")
                cur.execute(
                    f"INSERT INTO {table} (id, owner, version, body) VALUES ({p}, {p}, 1, {p})",
                    (id_, owner, body),
                )
                version = 1
            else:
                if row is None:
                    raise RegistryConflict(f"{kind} {id_} does not exist")
                if int(row[1]) != expect_version:
                    raise RegistryConflict(
                        f"{kind} {id_} changed meanwhile (version {row[1]}, "
                        f"expected {expect_version}): read it again"
                    )
                before = msgspec.json.decode(row[0], type=KINDS[kind][1])
                version = expect_version + 1
                cur.execute(
                    f"UPDATE {table} SET body = {p}, version = {p} WHERE id = {p}", (body, version, id_)
                )
            cur.execute(
                "INSERT INTO registry_audit (at_ms, actor, action, object_kind, object_id, before, after) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})",
                (at_ms, actor, action, kind, id_, mask_record(kind, before), mask_record(kind, record)),
            )
            return version

        result: int = self._write(tx)
        return result

    def audit(
        self, *, object_kind: str | None = None, object_id: str | None = None, limit: int = 1_000
    ) -> list[AuditRecord]:
        p = self.p
        where, params = [], []
        if object_kind is not None:
            where.append(f"object_kind = {p}")
            params.append(object_kind)
        if object_id is not None:
            where.append(f"object_id = {p}")
            params.append(object_id)
        sql = "SELECT seq, at_ms, actor, action, object_kind, object_id, before, after FROM registry_audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._rows(sql + f" ORDER BY seq LIMIT {int(limit)}", params)
        return [
            AuditRecord(
                seq=int(r[0]),
                at_ms=int(r[1]),
                actor=r[2],
                action=r[3],
                object_kind=r[4],
                object_id=r[5],
                before=r[6],
                after=r[7],
            )
            for r in rows
        ]

    def changed_since(self, after_seq: int, limit: int = 1_000) -> list[tuple[int, str, str]]:
        """(audit seq, object kind, object id) of registry changes after `after_seq`, oldest first: how
        a running switch picks up changes made by the CLI or another process (an indexed range scan
        of the append-only audit)."""
        rows = self._rows(
            f"SELECT seq, object_kind, object_id FROM registry_audit WHERE seq > {self.p} "
            f"ORDER BY seq LIMIT {int(limit)}",
            (after_seq,),
        )
        return [(int(a), str(b), str(c)) for a, b, c in rows]

    def last_audit_seq(self) -> int:
        rows = self._rows("SELECT COALESCE(MAX(seq), 0) FROM registry_audit")
        return int(rows[0][0]) if rows else 0

    # --- cutovers --------------------------------------------------------------------------------
    def cutovers(self) -> list[Cutover]:
        rows = self._rows("SELECT from_seq, to_seq, at_ms, actor FROM reg_cutovers ORDER BY to_seq")
        return [Cutover(int(a), int(b), int(c), str(d)) for a, b, c, d in rows]

    def last_cutover(self) -> Cutover | None:
        rows = self._rows(
            "SELECT from_seq, to_seq, at_ms, actor FROM reg_cutovers ORDER BY to_seq DESC LIMIT 1"
        )
        return (
            None if not rows else Cutover(int(rows[0][0]), int(rows[0][1]), int(rows[0][2]), str(rows[0][3]))
        )

    def add_cutover(self, c: Cutover) -> None:
        p = self.p

        def tx(cur: Any) -> None:
            cur.execute(
                f"INSERT INTO reg_cutovers (to_seq, from_seq, at_ms, actor) VALUES ({p}, {p}, {p}, {p})",
                (c.to_seq, c.from_seq, c.at_ms, c.actor),
            )
            cur.execute(
                "INSERT INTO registry_audit (at_ms, actor, action, object_kind, object_id, before, after) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})",
                (c.at_ms, c.actor, "cutover", "cutover", str(c.to_seq), "", _enc.encode(c).decode()),
            )

        self._write(tx)

    def ledger_seqs_by_key_prefix(self, prefix: str, limit: int = 100) -> list[int]:
        """Seqs of ledger entries whose idempotency key starts with `prefix` (a range scan of the
        ledger's key index plus its unindexed tail, switch.ledger.backend.key_range_seqs_sql; used for
        status by terminal + STAN). Read-only on the ledger.

        A prefix is a byte-order range only under a C collation. SQLite compares bytes; a PostgreSQL
        database with a linguistic collation (en_US, ICU) sorts '/' and digits differently (keys
        of another STAN may fall inside the range, keys of this one outside), so there the range is
        taken in the "C" collation, served by an index in that collation which the registry adds
        to the ledger's `key_index` on first use (the database's own order is used when it is C)."""
        p = self.p
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        key = "idempotency_key"
        if self.dialect == "postgres" and not self._byte_ordered():
            key = 'idempotency_key COLLATE "C"'
        rows = self.ledger_rows(key_range_seqs_sql(p, limit, key), (prefix, upper) * 2)
        return [int(r[0]) for r in rows]

    _byte_order: bool | None = None

    def _byte_ordered(self) -> bool:
        """PostgreSQL: does the database's default collation sort text byte by byte? (Once per store;
        when not, the "C"-collated key index is created if missing.)"""
        if self._byte_order is None:
            probe = self._rows("SELECT 'Z' < 'a' AND '-x' < '/a' AND '/z' < '0' AND '9' < 'A'")
            self._byte_order = bool(probe[0][0])
            if not self._byte_order:
                self._write(
                    lambda cur: cur.execute(
                        "CREATE INDEX IF NOT EXISTS reg_key_index_c "
                        'ON key_index (idempotency_key COLLATE "C")'
                    )
                )
        return self._byte_order
