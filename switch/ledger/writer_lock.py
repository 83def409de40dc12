"""One writer per SQLite ledger: an exclusive OS lock held for the writer's life.

Why: the ledger's group-commit writer keeps its state (size, Merkle frontier, balances) in memory and
assumes nobody else appends; a second writer on the same file (a CLI command that posts while
`switch run` is up) would interleave entries behind its back. PostgreSQL already refuses that with a
per-schema advisory lock (switch.ledger.postgres); this is the same promise for SQLite.

How: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<database>.writer-lock` beside the database. flock locks
belong to the open file description, so the kernel drops the lock when the holder closes the file or
dies in any way (SIGKILL included): there is no stale lock to clean up, and a leftover file means
nothing. Two opens in one process conflict too, so tests can show the refusal in-process. The holder
writes its pid into the file (after taking the lock) so the refusal can name it.

One lock covers both files of a SQLite ledger (`<database>` and its index file `<database>.index`,
switch.ledger.sqlite): only the writer process writes either (its indexer thread writes the index).
"""

from __future__ import annotations

import errno
import fcntl
import os
import weakref
from pathlib import Path
from typing import Any

from switch.ledger.backend import LedgerStorageError

#: Suffix of the lock file created beside the database file.
LOCK_SUFFIX = ".writer-lock"
#: Longest holder description read back from a lock file (it holds a pid and a program name).
MAX_HOLDER_BYTES = 200


class WriterLocked(LedgerStorageError):
    """Another process (or another writer in this one) holds the ledger's writer lock."""

    def __init__(self, db_path: str, holder: str) -> None:
        self.db_path = db_path
        self.holder = holder
        super().__init__(
            f"ledger {db_path} already has a writer ({holder}): a second writer would corrupt it. "
            "While the switch runs, make the change through its admin API (the merchant commands do "
            "that by themselves when the API is reachable, or use --api URL); otherwise stop that "
            "process first"
        )


def lock_path(db_path: str | Path) -> Path:
    return Path(f"{db_path}{LOCK_SUFFIX}")


class WriterLock:
    """The held lock; `release()` (idempotent) gives it up. Also released when garbage collected or
    when the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        self._fd = None
        self._finalizer()  # closes the fd: the kernel drops the flock with it


def acquire(db_path: str | Path, *, what: str = "ledger writer") -> WriterLock:
    """Take the writer lock of the SQLite ledger at `db_path` or raise `WriterLocked` naming the holder.
    Never waits: a running writer holds it for its whole life, so waiting would only hang."""
    path = lock_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LedgerStorageError(f"cannot open writer lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WriterLocked(str(db_path), holder) from None
        raise LedgerStorageError(f"cannot lock {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what})\n".encode(), 0)
    except OSError:
        pass  # the lock is what matters; the holder text is only for the refusal message
    return WriterLock(path, fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, MAX_HOLDER_BYTES, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def hold_for_life_of(backend: Any, lock: WriterLock) -> Any:
    """Tie `lock` to `backend`: released when the backend is closed (or collected). Returns the backend.

    The backend class is not changed (the ledger's own modules stay as they are): its instance's
    `close` is wrapped."""
    inner_close = backend.close

    def close() -> None:
        try:
            inner_close()
        finally:
            lock.release()

    backend.close = close
    backend.writer_lock = lock
    return backend
