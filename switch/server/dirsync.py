"""Syncing a directory, so that a file created, renamed or removed in it stays so after a power loss.

Why a function of its own: fsync of a file makes its bytes durable, not its name. Every store that
creates or replaces a file (the RRN high-water mark, the armed-reversal slots and the migration of their
old SQLite file, key files written by `switch keys`) must also sync the directory that holds the name.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_parent_dir(path: str | Path) -> None:
    """fsync the directory that holds `path` (its entries: creations, renames, removals)."""
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
