"""Build a backend or a writer from LedgerConfig (the one place that knows the backend names)."""

from __future__ import annotations

from switch.config import LedgerConfig
from switch.ledger.backend import LedgerBackend, LedgerStorageError
from switch.ledger.keys import load_signing_key
from switch.ledger.writer import LedgerWriter


def open_backend(cfg: LedgerConfig, *, create: bool = True, writer: bool = False) -> LedgerBackend:
    """`writer=True` for the writer thread's backend (PostgreSQL: holds the single-writer lock)."""
    if cfg.backend == "sqlite":
        from switch.ledger.sqlite import SqliteBackend

        return SqliteBackend(cfg.path, create=create)
    if cfg.backend == "postgres":
        if not cfg.dsn:
            raise LedgerStorageError("ledger.backend = 'postgres' needs ledger.dsn")
        from switch.ledger.postgres import PostgresBackend

        return PostgresBackend(
            cfg.dsn,
            create=create,
            writer=writer,
            connect_timeout_s=cfg.pg_connect_timeout_s,
            statement_timeout_ms=cfg.pg_statement_timeout_ms,
            writer_lock_timeout_ms=cfg.pg_writer_lock_timeout_ms,
        )
    raise LedgerStorageError(f"unknown ledger backend {cfg.backend!r}")


def open_writer(cfg: LedgerConfig) -> LedgerWriter:
    """The writer for a running switch: signing key from config (required), backend created if new."""
    key = load_signing_key(cfg)
    return LedgerWriter(open_backend(cfg, writer=True), signing_key=key, config=cfg)
