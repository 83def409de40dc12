"""Reading the armed-reversal file of switches before the append log (an SQLite database), once.

Why it exists: a switch upgraded with armed reversals still on disk must not lose them -- each stands
for a request whose outcome the ledger may not show. `switch.server.armed.ArmedStore` finds the old
file at its path (by SQLite's header) and:
1. sets it aside (`set_aside`: renamed with its WAL and shared-memory files to `<path>.sqlite-migrating`,
   the directory synced), so the log's first slot, which has the same name, never holds its pages;
2. reads its rows (`read_rows`, a read-only connection: SQLite neither checkpoints nor deletes the WAL,
   whose frames may hold clear PANs of the oldest rows);
3. commits them to the log, then scrubs the set-aside files (`scrub`: zeros, synced, removed).
A crash before 3's commit leaves the set-aside file to read again; after it, only to scrub.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from switch.codec.sealing import FieldSealer, decode_legacy, is_legacy
from switch.server.dirsync import sync_parent_dir

#: The first 16 bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
#: Files SQLite keeps beside a database in WAL mode.
SIDE_FILES = ("-wal", "-shm", "-journal")
#: Suffix of the old database while it is being migrated.
MIGRATING_SUFFIX = ".sqlite-migrating"


def pending(path: str) -> bool:
    """An old database at `path`, or one set aside (or any of its side files) not yet scrubbed."""
    moved = path + MIGRATING_SUFFIX
    return is_sqlite(path) or any(os.path.exists(moved + s) for s in ("", *SIDE_FILES))


def set_aside(path: str) -> str:
    """Rename the old database at `path` (if there) and its side files; the name it now has."""
    moved = path + MIGRATING_SUFFIX
    if is_sqlite(path):
        for suffix in SIDE_FILES:  # side files first: a crash between leaves the database to move
            if os.path.exists(path + suffix):
                os.replace(path + suffix, moved + suffix)
        os.replace(path, moved)
        sync_parent_dir(path)
    return moved


def is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except FileNotFoundError:
        return False


def read_rows(
    path: str, sealer: FieldSealer, context: Callable[[str, str], bytes]
) -> list[tuple[str, str, dict[str, str], int]]:
    """(acquirer, rrn, opened fields, created_ms) of every row, oldest first. Rows written in clear
    (before sealing) are decoded; sealed rows are opened under the sealer's KEKs (SealingError names a
    row that does not open). Read-only: the files stay as they are for `scrub`."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        rows = conn.execute(
            "SELECT acquirer, rrn, fields, created_ms FROM armed ORDER BY created_ms"
        ).fetchall()
    finally:
        conn.close()
    out = []
    for acquirer, rrn, data, created_ms in rows:
        fields = decode_legacy(data) if is_legacy(data) else sealer.open(data, context(acquirer, rrn))
        out.append((acquirer, rrn, fields, int(created_ms)))
    return out


def scrub(path: str) -> None:
    """Overwrite the old database and its side files with zeros, sync them, and remove them: side
    files first, so a crash half-way still leaves a name `pending` finds."""
    for name in (*(path + s for s in SIDE_FILES), path):
        try:
            fd = os.open(name, os.O_WRONLY)
        except FileNotFoundError:
            continue
        try:
            size = os.fstat(fd).st_size
            zeros = bytes(min(size, 1 << 20))
            done = 0
            while done < size:
                done += os.pwrite(fd, zeros[: size - done], done)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(name)
    sync_parent_dir(path)
