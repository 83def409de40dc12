"""Ledger test fixtures. `ledger_backend` is parametrized by backend name so the same tests run on
every backend: add a name to LEDGER_BACKENDS and a branch to `_make_db` (the PostgreSQL helper does).

A `LedgerDb` names one database: `open()` gives a NEW backend connection to it each call (the writer
owns one, readers and restarts take others), and `tampered_copy(statements)` copies the database, drops
the append-only triggers in the copy only, and runs the given SQL there (tamper tests)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.ledger.backend import APPEND_ONLY_TABLES, LedgerBackend
from switch.ledger.sqlite import SqliteBackend, index_path
from tests.pgcluster import pg_cluster, pg_database_dsn, pg_dsn, pg_session_db  # noqa: F401  (fixtures)

LEDGER_BACKENDS = ["sqlite", "postgres"]

#: A fixed test key (never used outside tests).
TEST_SEED = bytes(range(32))


class LedgerDb(Protocol):
    name: str

    def open(self, *, create: bool = True) -> LedgerBackend: ...

    def tampered_copy(self, statements: list[str]) -> LedgerDb: ...


class SqliteDb:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._copies = 0

    def open(self, *, create: bool = True) -> LedgerBackend:
        return SqliteBackend(self.path, create=create)

    def tampered_copy(self, statements: list[str]) -> SqliteDb:
        self._copies += 1
        dst_path = self.path.with_name(f"{self.path.stem}-tampered{self._copies}.db")
        for src_path, to_path in ((self.path, dst_path), (index_path(self.path), index_path(dst_path))):
            src = sqlite3.connect(src_path)  # both files: entries, and the index tables (schema 3)
            dst = sqlite3.connect(to_path)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
        dst = sqlite3.connect(dst_path)
        dst.execute("ATTACH DATABASE ? AS ix", (index_path(dst_path),))
        try:
            for table in APPEND_ONLY_TABLES:
                for db in ("main", "ix"):
                    dst.execute(f"DROP TRIGGER IF EXISTS {db}.{table}_no_update")
                    dst.execute(f"DROP TRIGGER IF EXISTS {db}.{table}_no_delete")
            for stmt in statements:
                dst.execute(stmt)
            dst.commit()
        finally:
            dst.close()
        return SqliteDb(dst_path)


def _make_db(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> LedgerDb:
    if name == "sqlite":
        return SqliteDb(tmp_path / "ledger.db")
    if name == "postgres":
        from tests.ledger.pg_cluster import PgLedgerDb

        return PgLedgerDb(request.getfixturevalue("pg_dsn"))
    raise AssertionError(f"unknown ledger backend {name!r}")


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerDb]:
    yield _make_db(request.param, tmp_path, request)


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(TEST_SEED)
