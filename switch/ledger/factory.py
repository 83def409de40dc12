"""Build a backend or a writer from LedgerConfig (the one place that knows the backend names)."""

from __future__ import annotations

from switch.config import LedgerConfig
from switch.ledger import writer_lock
from switch.ledger.backend import LedgerBackend, LedgerStorageError
from switch.ledger.keys import load_signing_key
from switch.ledger.writer import LedgerWriter


def open_backend(cfg: LedgerConfig, *, create: bool = True, writer: bool = False) -> LedgerBackend:
    """`writer=True` for the writer thread's backend: it holds the single-writer lock for its life
    (PostgreSQL: advisory lock; SQLite: an OS lock beside the file, switch.ledger.writer_lock), so a
    second writer is refused with the holder named."""
    if cfg.backend == "sqlite":
        from switch.ledger.sqlite import SqliteBackend

        if not writer or cfg.path == ":memory:":
            return SqliteBackend(cfg.path, create=create)
        lock = writer_lock.acquire(cfg.path)  # before the writer reads its state from the file
        try:
            return writer_lock.hold_for_life_of(SqliteBackend(cfg.path, create=create), lock)
        except BaseException:
            lock.release()
            raise
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
