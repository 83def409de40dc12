"""Merchant test fixtures: `registry_db` runs a test on every backend the registry supports (SQLite
file, PostgreSQL schema of the session's throwaway cluster), each a fresh ledger + registry database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from switch.ledger.sqlite import SqliteBackend
from switch.merchant.store import RegistryStore
from tests.pgcluster import pg_cluster, pg_dsn, pg_session_db  # noqa: F401  (fixtures)

REGISTRY_BACKENDS = ["sqlite", "postgres"]


class RegistryDb:
    """One database holding the ledger and the registry; every `open_*` is a new connection."""

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where  # SQLite path or PostgreSQL DSN

    def open_backend(self, *, create: bool = True) -> Any:
        if self.name == "postgres":
            from switch.ledger.postgres import PostgresBackend

            return PostgresBackend(self.where, create=create)
        return SqliteBackend(self.where, create=create)

    def open_store(self) -> RegistryStore:
        if self.name == "postgres":
            return RegistryStore.open_postgres(self.where)
        return RegistryStore.open_sqlite(self.where)


@pytest.fixture(params=REGISTRY_BACKENDS)
def registry_db(request: pytest.FixtureRequest, tmp_path: Path) -> RegistryDb:
    if request.param == "postgres":
        return RegistryDb("postgres", request.getfixturevalue("pg_dsn"))
    return RegistryDb("sqlite", str(tmp_path / "ledger.db"))
