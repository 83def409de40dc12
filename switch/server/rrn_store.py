"""The durable high-water mark of reserved RRNs (switch.processing.rrn asks for blocks).

One small file holding the next unreserved RRN as decimal text. `reserve(count)` takes an exclusive
`flock` (several switch processes may share the file), reads the mark, writes mark + count to a temp
file, fsyncs it, renames it over the original and fsyncs the directory, and only then returns the
block's start. A crash at any point either keeps the old mark (the block was never handed out) or
the new one (the block is skipped): RRNs never repeat.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from switch.server.dirsync import sync_parent_dir

#: RRNs start at 1 (000000000000 is never issued).
FIRST_RRN = 1


class RrnStoreError(RuntimeError):
    """The RRN file cannot be read or written; the message names the path."""


class RrnStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def reserve(self, count: int) -> int:
        """Durably reserve [start, start + count) and return start."""
        if count < 1:
            raise RrnStoreError(f"cannot reserve {count} RRNs")
        try:
            with open(self._lock_path, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                start = self._read()
                self._write(start + count)
                return start
        except OSError as exc:
            raise RrnStoreError(f"RRN file {self.path}: {exc.strerror}") from None

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return FIRST_RRN
        if not text.isdigit():
            raise RrnStoreError(f"RRN file {self.path} does not hold a number; refusing to guess")
        return max(FIRST_RRN, int(text))

    def _write(self, mark: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{mark}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        sync_parent_dir(self.path)
