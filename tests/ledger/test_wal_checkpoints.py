"""SQLite WAL checkpoints run on the writer backend's own thread, not in its commits
(switch.ledger.sqlite, "Why WAL checkpoints run on a thread of their own"): while the writer commits,
the database file itself fills with the entries."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger.model import EntryKind
from switch.ledger.sqlite import WRITER_AUTOCHECKPOINT_PAGES, SqliteBackend
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter
from tests.ledger.drafts import draft


def test_the_wal_is_checkpointed_in_the_background_while_the_writer_commits(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    path = tmp_path / "ledger.db"
    backend = SqliteBackend(path)
    writer = LedgerWriter(backend, signing_key=signing_key,
                          config=LedgerConfig(batch_window_ms=0, max_batch_entries=500))  # fmt: skip
    wal = Path(f"{path}-wal")
    try:
        (mode,) = backend.conn.execute("PRAGMA main.wal_autocheckpoint").fetchone()
        assert mode == WRITER_AUTOCHECKPOINT_PAGES, "the commit's own checkpoint is only a far bound"
        high_water = 0
        for lo in range(0, 40_000, 500):
            writer.append(
                [draft(f"k{i}", EntryKind.PURCHASE, f"{i:012d}", 100 + i) for i in range(lo, lo + 500)]
            )
            high_water = max(high_water, wal.stat().st_size if wal.exists() else 0)
        checkpointer = backend._checkpointer
        assert checkpointer is not None and checkpointer.checkpoints > 0
        # Back-to-back full batches: the WAL may grow (up to its 64 MB valve), but its frames are
        # copied into the database file as the writer goes.
        assert high_water < WRITER_AUTOCHECKPOINT_PAGES * 4096, f"the WAL grew to {high_water} bytes"
        # A second connection reading only the database file (no WAL) already sees most entries.
        copy = tmp_path / "copy.db"
        copy.write_bytes(path.read_bytes())
        (n,) = sqlite3.connect(copy).execute("SELECT COUNT(*) FROM entries").fetchone()
        assert n >= 30_000, f"only {n} entries had reached the database file"
    finally:
        writer.close()
    reader = SqliteBackend(path, create=False)
    try:
        report = verify_ledger(reader, signing_key.public_key())
        assert report.ok and report.tree_size == 40_000
    finally:
        reader.close()
