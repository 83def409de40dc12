"""The PostgreSQL side of the `ledger_backend` fixture: a ledger in a schema of the test's fresh database.

Why a schema and not a database per ledger: `tampered_copy` must copy a ledger while its backends are
still connected, and PostgreSQL can only clone a database nobody is connected to. A schema copy
(`CREATE TABLE ... (LIKE ... INCLUDING ALL)` + `INSERT ... SELECT`) works under live connections and
leaves the append-only triggers behind, as the tamper tests want (triggers are not copied by LIKE).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from switch.ledger.backend import LedgerBackend
from switch.ledger.postgres import PostgresBackend

#: Every table of the ledger schema (switch.ledger.backend.schema), copied by tampered_copy.
LEDGER_TABLES = (
    "entries",
    "merkle_nodes",
    "tree_heads",
    "checkpoints",
    "balance_history",
    "key_index",
    "merchant_index",
    "balance_index",
    "index_runs",
    "ledger_meta",
)


class PgLedgerDb:
    """One ledger = one schema of a test database; `open()` returns a new PostgresBackend on it."""

    name = "postgres"

    def __init__(self, dsn: str, schema: str | None = None) -> None:
        """`dsn` as pg_dsn gives it (search_path = the test's fresh schema); `schema` overrides it."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            if schema is None:
                row = conn.execute("SELECT current_schema()").fetchone()
                if row is None or row[0] is None:
                    raise AssertionError(f"no schema on the search_path of {dsn!r}")
                schema = str(row[0])
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        self.base_dsn = dsn
        self.schema = schema
        self.dsn = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
        self._copies = 0

    def open(self, *, create: bool = True) -> LedgerBackend:
        return PostgresBackend(self.dsn, create=create)

    def tampered_copy(self, statements: list[str]) -> PgLedgerDb:
        """A copy of this ledger without the append-only triggers, with `statements` run in it."""
        self._copies += 1
        copy = PgLedgerDb(self.base_dsn, f"{self.schema}_tampered{self._copies}")
        src, dst = sql.Identifier(self.schema), sql.Identifier(copy.schema)
        with psycopg.connect(self.base_dsn, autocommit=True) as conn, conn.transaction():
            for table in LEDGER_TABLES:
                t = sql.Identifier(table)
                conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE {}.{} INCLUDING ALL)").format(dst, t, src, t))
                conn.execute(sql.SQL("INSERT INTO {}.{} SELECT * FROM {}.{}").format(dst, t, src, t))
        with psycopg.connect(copy.dsn, autocommit=True) as conn, conn.transaction():
            for stmt in statements:
                conn.execute(stmt.encode())
        return copy
