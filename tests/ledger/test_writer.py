"""The group-commit writer: durability contract, idempotency, rules per submission, limits, restart."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from switch.config import LedgerConfig
from switch.ledger.backend import BatchRows, LedgerStorageError
from switch.ledger.codec import InvalidDraft
from switch.ledger.model import (
    Entry,
    EntryDraft,
    EntryKind,
    IdempotencyConflict,
    Posting,
    Side,
    UnbalancedEntry,
)
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import (
    DuplicateTransaction,
    HoldAlreadyResolved,
    OriginalNotFound,
    RefundExceedsOriginal,
)
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerBusy, LedgerUnavailable, LedgerWriter

from .conftest import LedgerDb
from .drafts import CUR, draft

K = EntryKind


def _writer(db: LedgerDb, key: Any, **cfg: Any) -> LedgerWriter:
    return LedgerWriter(db.open(), signing_key=key, config=LedgerConfig(**{"batch_window_ms": 0, **cfg}))


def test_append_assigns_gap_free_seqs_and_repeats_return_the_original(
    ledger_backend: LedgerDb, signing_key
) -> None:
    with _writer(ledger_backend, signing_key) as w:
        first = w.append([draft("k1", K.PURCHASE, "R1", 500), draft("k2", K.FEE, "R1", 10)])
        assert [e.seq for e in first] == [0, 1]
        again = w.append([draft("k1", K.PURCHASE, "R1", 500)])
        assert again[0].seq == 0 and again[0].draft == first[0].draft
        assert w.append([draft("k3", K.PURCHASE, "R2", 1)])[0].seq == 2
        with pytest.raises(IdempotencyConflict, match="k1"):
            w.append([draft("k1", K.PURCHASE, "R1", 501)])
        assert w.size == 3


def test_rule_violation_fails_only_its_own_submission_in_a_shared_batch(
    ledger_backend: LedgerDb, signing_key
) -> None:
    with _writer(ledger_backend, signing_key, batch_window_ms=200, max_batch_entries=10) as w:
        w.append([draft("h", K.HOLD, "H1", 100)])
        results: dict[str, tuple[Any, Any]] = {}
        done = threading.Semaphore(0)

        def cb(name: str):
            def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
                results[name] = (entries, error)
                done.release()

            return on_done

        # one batch: a good capture, a second capture of the same hold, a refund above the original,
        # and an unrelated purchase whose submission carries two entries
        w.submit([draft("c1", K.CAPTURE, "C1", 60, "H1")], cb("capture"))
        w.submit([draft("c2", K.CAPTURE, "C2", 10, "H1")], cb("capture again"))
        w.submit([draft("r1", K.REFUND, "F1", 61, "C1")], cb("refund too much"))
        w.submit([draft("p", K.PURCHASE, "P1", 7), draft("pf", K.FEE, "P1", 1)], cb("purchase"))
        for _ in range(4):
            assert done.acquire(timeout=10)
        assert results["capture"][1] is None
        assert isinstance(results["capture again"][1], HoldAlreadyResolved)
        assert isinstance(results["refund too much"][1], RefundExceedsOriginal)
        assert results["purchase"][1] is None
        assert [e.seq for e in results["purchase"][0]] == [2, 3]  # no gap left by the rejected drafts
        reader = LedgerReader(ledger_backend.open())
        try:
            assert reader.refundable_remainder("C1") == 60
            assert [e.draft.kind for e in reader.entries_by_rrn("P1")] == [K.PURCHASE, K.FEE]
        finally:
            reader.close()


def test_a_submission_is_all_or_nothing(ledger_backend: LedgerDb, signing_key) -> None:
    with _writer(ledger_backend, signing_key) as w:
        w.append([draft("p", K.PURCHASE, "P1", 100)])
        with pytest.raises(RefundExceedsOriginal):
            w.append([draft("r1", K.REFUND, "F1", 60, "P1"), draft("r2", K.REFUND, "F2", 60, "P1")])
        assert w.size == 1
        assert w.append([draft("r1", K.REFUND, "F1", 60, "P1")])[0].seq == 1


@pytest.mark.parametrize(
    ("drafts", "error"),
    [
        ([draft("x", K.CAPTURE, "C", 5, "NOPE")], OriginalNotFound),
        ([draft("x", K.PURCHASE, "P1", 5)], DuplicateTransaction),
        ([draft("x", K.VOID, "V", 99, "P1")], Exception),
        ([draft("x", K.REFUND, "F", 5, "")], Exception),
    ],
)
def test_rule_errors_are_clear(ledger_backend: LedgerDb, signing_key, drafts, error) -> None:
    with _writer(ledger_backend, signing_key) as w:
        w.append([draft("p", K.PURCHASE, "P1", 100)])
        with pytest.raises(error) as info:
            w.append(drafts)
        assert str(info.value)
        assert w.size == 1


def test_malformed_drafts_are_refused_at_submit(ledger_backend: LedgerDb, signing_key) -> None:
    with _writer(ledger_backend, signing_key) as w:
        good = draft("k", K.PURCHASE, "R", 5)
        unbalanced = EntryDraft(
            idempotency_key="u",
            kind=K.PURCHASE,
            rrn="R",
            at_ms=1,
            amount_minor=5,
            currency=CUR,
            postings=(Posting("a", Side.DEBIT, 5, CUR), Posting("b", Side.CREDIT, 4, CUR)),
        )
        with pytest.raises(UnbalancedEntry):
            w.submit([unbalanced], lambda *_: None)
        full_pan = EntryDraft(
            idempotency_key="f", kind=K.DECLINE, rrn="R", at_ms=1, pan_masked="4111111111111111"
        )
        with pytest.raises(InvalidDraft) as info:
            w.submit([full_pan], lambda *_: None)
        assert "4111111111111111" not in str(info.value)
        wrong_type = EntryDraft(idempotency_key="t", kind=K.PURCHASE, rrn="R", at_ms="yesterday")  # type: ignore[arg-type]
        with pytest.raises(InvalidDraft):
            w.submit([wrong_type], lambda *_: None)
        with pytest.raises(InvalidDraft):
            w.submit(
                [EntryDraft(idempotency_key="d", kind=K.DECLINE, rrn="R", at_ms=1, postings=good.postings)],
                lambda *_: None,
            )
        assert w.size == 0


def test_full_queue_raises_busy_instead_of_waiting(ledger_backend: LedgerDb, signing_key) -> None:
    gate = threading.Event()
    backend = ledger_backend.open()
    real = backend.write_batch

    def slow_write(batch: BatchRows) -> None:
        gate.wait(10)
        real(batch)

    backend.write_batch = slow_write  # type: ignore[method-assign]
    w = LedgerWriter(
        backend,
        signing_key=signing_key,
        config=LedgerConfig(batch_window_ms=0, max_batch_entries=2, max_queue_entries=4),
    )
    try:
        w.submit([draft("a", K.PURCHASE, "A", 1)], lambda *_: None)  # taken by the writer, blocked in write
        for _ in range(50):
            if w._queued_entries == 0:
                break
            threading.Event().wait(0.01)
        w.submit([draft(f"q{i}", K.PURCHASE, f"Q{i}", 1) for i in range(2)], lambda *_: None)
        w.submit([draft(f"r{i}", K.PURCHASE, f"S{i}", 1) for i in range(2)], lambda *_: None)
        with pytest.raises(LedgerBusy, match="max_queue_entries=4"):
            w.submit([draft("z", K.PURCHASE, "Z", 1)], lambda *_: None)
        with pytest.raises(ValueError, match="max_batch_entries"):
            w.submit([draft(f"b{i}", K.PURCHASE, f"B{i}", 1) for i in range(3)], lambda *_: None)
    finally:
        gate.set()
        w.close()
    assert LedgerReader(ledger_backend.open()).backend.entry_count() == 5


def test_failed_commit_fails_every_caller_and_the_writer_recovers(
    ledger_backend: LedgerDb, signing_key
) -> None:
    backend = ledger_backend.open()
    real = backend.write_batch
    fail_next = threading.Event()

    def flaky_write(batch: BatchRows) -> None:
        if fail_next.is_set():
            fail_next.clear()
            raise LedgerStorageError("disk on fire")
        real(batch)

    backend.write_batch = flaky_write  # type: ignore[method-assign]
    w = LedgerWriter(backend, signing_key=signing_key, config=LedgerConfig(batch_window_ms=300))
    try:
        w.append([draft("h", K.HOLD, "H", 10)])
        fail_next.set()
        errors: list[BaseException | None] = []
        done = threading.Semaphore(0)

        def on_done(entries: Any, error: BaseException | None) -> None:
            errors.append(error)
            done.release()

        w.submit([draft("a", K.PURCHASE, "A", 1)], on_done)
        w.submit([draft("b", K.PURCHASE, "B", 1)], on_done)
        w.submit([draft("dup", K.HOLD, "H", 10)], on_done)  # duplicate rrn: its own rule error
        w.submit([draft("h", K.HOLD, "H", 10)], on_done)  # idempotent repeat: still fails with the batch
        for _ in range(4):
            assert done.acquire(timeout=10)
        assert sum(isinstance(e, LedgerStorageError) for e in errors) == 3
        assert sum(isinstance(e, DuplicateTransaction) for e in errors) == 1
        # nothing of the failed batch is visible; the writer carries on from the durable state
        assert [e.seq for e in w.append([draft("a", K.PURCHASE, "A", 1)])] == [1]
    finally:
        w.close()
    assert verify_ledger(ledger_backend.open(), signing_key.public_key()).ok


def test_writer_that_cannot_recover_stops_and_says_so(ledger_backend: LedgerDb, signing_key) -> None:
    backend = ledger_backend.open()

    def broken(*_: Any) -> Any:
        raise LedgerStorageError("gone")

    w = LedgerWriter(backend, signing_key=signing_key, config=LedgerConfig(batch_window_ms=0))
    backend.write_batch = broken  # type: ignore[method-assign]
    backend.entry_count = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(LedgerStorageError):
            w.append([draft("a", K.PURCHASE, "A", 1)], timeout_s=10)
        with pytest.raises(LedgerUnavailable, match="stopped"):
            w.append([draft("b", K.PURCHASE, "B", 1)], timeout_s=10)
    finally:
        w.close()


def test_restart_keeps_idempotency_merkle_state_balances_and_checkpoints(
    ledger_backend: LedgerDb, signing_key
) -> None:
    cfg = {"checkpoint_every_entries": 5}
    with _writer(ledger_backend, signing_key, **cfg) as w:
        for i in range(12):
            w.append([draft(f"k{i}", K.PURCHASE, f"R{i}", 10 + i)])
        root_before, size_before = w.root(), w.size
    with _writer(ledger_backend, signing_key, **cfg) as w:
        assert (w.size, w.root()) == (size_before, root_before)
        assert w.append([draft("k3", K.PURCHASE, "R3", 13)])[0].seq == 3
        with pytest.raises(IdempotencyConflict):
            w.append([draft("k3", K.PURCHASE, "R3", 14)])
        with pytest.raises(DuplicateTransaction):
            w.append([draft("other", K.PURCHASE, "R3", 13)])
        assert w.append([draft("k12", K.REFUND, "F", 5, "R0")])[0].seq == 12
    backend = ledger_backend.open()
    try:
        sizes = [c[0] for c in backend.checkpoints()]
        assert sizes[-1] == 13  # final checkpoint at shutdown
        assert 5 in sizes and 10 in sizes
        reader = LedgerReader(backend)
        total = sum(10 + i for i in range(12)) - 5
        assert reader.balance("merchant:M1:payable", CUR) == -total
        report = verify_ledger(backend, signing_key.public_key())
        assert report.ok and report.tree_size == 13 and report.signatures_checked == len(sizes)
    finally:
        backend.close()


def test_append_only_triggers_reject_update_and_delete(ledger_backend: LedgerDb, signing_key) -> None:
    with _writer(ledger_backend, signing_key) as w:
        w.append([draft("k", K.PURCHASE, "R", 5)])
    backend = ledger_backend.open()
    try:
        for stmt in (
            "UPDATE entries SET amount_minor = 6",
            "DELETE FROM entries",
            "UPDATE tree_heads SET tree_size = 9",
            "DELETE FROM balance_history",
            "DELETE FROM checkpoints",
        ):
            cur = backend.conn.cursor()
            with pytest.raises(Exception, match="append-only"):
                cur.execute(stmt)
            cur.close()
            try:
                backend.conn.rollback()
            except Exception:
                pass
        assert backend.entry_count() == 1
    finally:
        backend.close()


def test_closed_writer_refuses_and_reopening_a_changed_ledger_is_refused(
    ledger_backend: LedgerDb, signing_key
) -> None:
    w = _writer(ledger_backend, signing_key)
    w.append([draft("k", K.PURCHASE, "R", 5)])
    w.close()
    with pytest.raises(LedgerUnavailable):
        w.submit([draft("k2", K.PURCHASE, "R2", 5)], lambda *_: None)
    copy = ledger_backend.tampered_copy(["DELETE FROM entries WHERE seq = 0"])
    from switch.ledger.rules import LedgerCorrupt

    with pytest.raises(LedgerCorrupt, match="verify"):
        LedgerWriter(copy.open(), signing_key=signing_key)


def test_drafts_with_plain_string_enums_are_stored_in_validated_form(
    ledger_backend: LedgerDb, signing_key
) -> None:
    loose = EntryDraft(
        idempotency_key="s",
        kind="purchase",  # type: ignore[arg-type]
        rrn="R",
        at_ms=1,
        amount_minor=5,
        currency=CUR,
        postings=[Posting("a", "D", 5, CUR), Posting("b", "C", 5, CUR)],  # type: ignore[arg-type]
    )
    with _writer(ledger_backend, signing_key) as w:
        (entry,) = w.append([loose])
        assert entry.draft.kind is K.PURCHASE and entry.draft.postings[0].side is Side.DEBIT
        assert w.append([draft("r", K.REFUND, "F", 5, "R")])[0].seq == 1
