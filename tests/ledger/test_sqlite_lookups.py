"""The SQLite writer's batch lookups (idempotency keys, transaction families) bind one JSON array:
keys with JSON-special characters and more keys than one IN list held must still be found."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger.backend import MAX_IN_LIST
from switch.ledger.model import EntryKind
from switch.ledger.sqlite import SqliteBackend
from switch.ledger.writer import LedgerWriter
from tests.ledger.drafts import draft

AWKWARD = ['k"quote', "k\\back", "k\u00e9\u20ac", "k[1,2]", "k'single", "k\nline"]


def test_repeats_of_awkward_and_many_keys_return_the_originals(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    cfg = LedgerConfig(batch_window_ms=0, max_batch_entries=2_000, max_queue_entries=4_000)
    keys = AWKWARD + [f"key-{i}" for i in range(MAX_IN_LIST + 50)]
    drafts = [draft(k, EntryKind.PURCHASE, f"r{i:011d}", 100 + i) for i, k in enumerate(keys)]
    with LedgerWriter(SqliteBackend(path), signing_key=Ed25519PrivateKey.generate(), config=cfg) as w:
        first = w.append(drafts)
    with LedgerWriter(SqliteBackend(path), signing_key=Ed25519PrivateKey.generate(), config=cfg) as w:
        again = w.append(drafts)  # after a restart: found in the database, not in memory
        assert [e.seq for e in again] == [e.seq for e in first]
        assert w.size == len(drafts)
    b = SqliteBackend(path)
    try:
        found = b.find_idempotency(keys)
        assert {k: s for k, (s, _) in found.items()} == {k: e.seq for k, e in zip(keys, first)}
        rows = b.txn_rows([d.rrn for d in drafts] + ["absent"])
        assert [r.seq for r in rows] == list(range(len(drafts)))
        assert b.find_idempotency([]) == {} and b.txn_rows([]) == []
    finally:
        b.close()
