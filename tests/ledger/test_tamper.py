"""Tamper evidence: change, delete or swap single rows in a COPY (triggers dropped there only) and
`verify` names exactly that index; the CLI prints it and exits 1. Proofs from the CLI check out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switch.cli import main
from switch.config import LedgerConfig
from switch.ledger.model import EntryKind
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter

from .conftest import TEST_SEED, LedgerDb, SqliteDb
from .drafts import draft

SIZE = 700  # > 2 * 2**NODE_MIN_LEVEL, so stored Merkle nodes are exercised too
BIG = 10**12  # a parking seq for swaps (CHECK seq >= 0)


def _fill(db: LedgerDb, signing_key) -> LedgerDb:
    cfg = LedgerConfig(batch_window_ms=0, checkpoint_every_entries=100)
    with LedgerWriter(db.open(), signing_key=signing_key, config=cfg) as w:
        for start in range(0, SIZE, 50):
            w.append([draft(f"k{i}", EntryKind.PURCHASE, f"R{i}", 100 + i) for i in range(start, start + 50)])
    return db


@pytest.fixture
def ledger(ledger_backend: LedgerDb, signing_key) -> LedgerDb:
    return _fill(ledger_backend, signing_key)


@pytest.fixture
def sqlite_ledger(tmp_path: Path, signing_key) -> SqliteDb:
    """The CLI tests drive a SQLite file (what an operator runs); the checks above cover every backend."""
    db = SqliteDb(tmp_path / "cli.db")
    _fill(db, signing_key)
    return db


def _verify(db: LedgerDb, key) -> tuple[bool, int | None, str]:
    backend = db.open(create=False)
    try:
        r = verify_ledger(backend, key.public_key())
    finally:
        backend.close()
    return r.ok, r.first_bad_index, r.problem


def test_untouched_ledger_verifies(ledger: LedgerDb, signing_key) -> None:
    assert _verify(ledger, signing_key) == (True, None, "")


@pytest.mark.parametrize("index", [0, 5, 255, 256, 300, SIZE - 1])
@pytest.mark.parametrize(
    "change",
    [
        "UPDATE entries SET amount_minor = amount_minor + 1 WHERE seq = {i}",
        "UPDATE entries SET rrn = 'R999999' WHERE seq = {i}",
        "UPDATE entries SET body = (SELECT body FROM entries WHERE seq = {j}) WHERE seq = {i}",
        "UPDATE entries SET leaf_hash = (SELECT leaf_hash FROM entries WHERE seq = {j}) WHERE seq = {i}",
    ],
    ids=["amount", "rrn", "body", "leaf"],
)
def test_changed_row_is_named(ledger: LedgerDb, signing_key, index: int, change: str) -> None:
    other = (index + 1) % SIZE
    copy = ledger.tampered_copy([change.format(i=index, j=other)])
    ok, bad, problem = _verify(copy, signing_key)
    assert not ok
    assert bad == index, problem


@pytest.mark.parametrize("index", [0, 17, 256, SIZE - 2, SIZE - 1])
def test_deleted_row_is_named(ledger: LedgerDb, signing_key, index: int) -> None:
    copy = ledger.tampered_copy([f"DELETE FROM entries WHERE seq = {index}"])
    ok, bad, problem = _verify(copy, signing_key)
    assert (ok, bad) == (False, index), problem


@pytest.mark.parametrize(("a", "b"), [(0, 1), (3, 500), (255, 256), (SIZE - 2, SIZE - 1)])
def test_swapped_rows_are_named_at_the_first(ledger: LedgerDb, signing_key, a: int, b: int) -> None:
    copy = ledger.tampered_copy(
        [
            f"UPDATE entries SET seq = {BIG} WHERE seq = {a}",
            f"UPDATE entries SET seq = {a} WHERE seq = {b}",
            f"UPDATE entries SET seq = {b} WHERE seq = {BIG}",
        ]
    )
    ok, bad, problem = _verify(copy, signing_key)
    assert (ok, bad) == (False, a), problem


def test_forged_checkpoint_signature_is_refused(ledger: LedgerDb, signing_key) -> None:
    copy = ledger.tampered_copy(["UPDATE checkpoints SET at_ms = at_ms + 1 WHERE tree_size = 300"])
    ok, _, problem = _verify(copy, signing_key)
    assert not ok and "checkpoint at size 300" in problem


def test_rewritten_balance_history_fails_the_rebuild_check(ledger: LedgerDb, signing_key) -> None:
    copy = ledger.tampered_copy(["UPDATE balance_history SET balance_minor = balance_minor + 1"])
    ok, _, problem = _verify(copy, signing_key)
    assert not ok and "balance" in problem


# --- the CLI (SQLite files only: it is what an operator runs) -----------------------------------------


def test_cli_verify_exit_codes(sqlite_ledger: SqliteDb, capsys, monkeypatch) -> None:
    path = sqlite_ledger.path
    monkeypatch.setenv(LedgerConfig().checkpoint_key_env, TEST_SEED.hex())
    assert main(["ledger", "verify", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"verified {SIZE} entries" in out and "signatures checked" in out
    copy = sqlite_ledger.tampered_copy(["UPDATE entries SET amount_minor = 1 WHERE seq = 123"])
    assert main(["ledger", "verify", "--db", str(copy.path)]) == 1
    assert "first bad entry index 123" in capsys.readouterr().out
    assert main(["ledger", "verify", "--db", str(path.with_name("missing.db"))]) == 2


def test_cli_proofs_check_and_forgeries_fail(sqlite_ledger: SqliteDb, capsys, tmp_path: Path) -> None:
    path = sqlite_ledger.path
    assert main(["ledger", "proof", "inclusion", "--db", str(path), "--index", "300", "--size", "600"]) == 0
    inclusion = json.loads(capsys.readouterr().out)
    assert inclusion["tree_size"] == 600 and len(inclusion["path"]) == 10
    assert main(["ledger", "proof", "consistency", "--db", str(path), "--first", "300"]) == 0
    consistency = json.loads(capsys.readouterr().out)
    assert consistency["second"] == SIZE
    for doc in (inclusion, consistency):
        f = tmp_path / "proof.json"
        f.write_text(json.dumps(doc))
        assert main(["ledger", "proof", "check", str(f)]) == 0
        key = "path" if doc["type"] == "inclusion" else "proof"
        forged = dict(
            doc, **{key: [doc[key][0][:-2] + ("00" if doc[key][0][-2:] != "00" else "11"), *doc[key][1:]]}
        )
        f.write_text(json.dumps(forged))
        assert main(["ledger", "proof", "check", str(f)]) == 1
        f.write_text("{not json")
        assert main(["ledger", "proof", "check", str(f)]) == 2
    assert main(["ledger", "proof", "inclusion", "--db", str(path), "--index", str(SIZE)]) == 2
