"""Queries: balance as of any seq (across and inside batches), merchant totals, open holds, entries by
RRN re-checked on read, refundable remainders through captures and reversed refunds."""

from __future__ import annotations

import pytest

from switch.config import LedgerConfig
from switch.ledger.model import EntryKind, Side
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import LedgerCorrupt, OriginalNotFound
from switch.ledger.writer import LedgerWriter

from .conftest import LedgerDb
from .drafts import CUR, draft

K = EntryKind


def test_balance_as_of_every_seq_equals_the_fold(ledger_backend: LedgerDb, signing_key) -> None:
    drafts = []
    for i in range(60):
        merchant = f"M{i % 3}"
        kind = K.PURCHASE if i % 5 else K.FEE
        drafts.append(draft(f"k{i}", kind, f"R{i}", 10 + i, merchant_id=merchant))
    with LedgerWriter(
        ledger_backend.open(), signing_key=signing_key, config=LedgerConfig(batch_window_ms=0)
    ) as w:
        for start in range(0, 60, 7):  # batches of 7: as-of seqs land inside batches too
            w.append(drafts[start : start + 7])
    reader = LedgerReader(ledger_backend.open())
    try:
        accounts = {p.account for d in drafts for p in d.postings}
        running = dict.fromkeys(accounts, 0)
        for seq, d in enumerate(drafts):
            for p in d.postings:
                running[p.account] += p.amount_minor if p.side is Side.DEBIT else -p.amount_minor
            if seq % 4 == 0 or seq == 59:
                for account in accounts:
                    assert reader.balance(account, CUR, through_seq=seq) == running[account], (account, seq)
        for account in accounts:
            assert reader.balance(account, CUR) == running[account]
        assert reader.balance("nobody", CUR) == 0 and reader.balance(next(iter(accounts)), CUR, -1) == 0
        assert reader.rebuild_check().ok
    finally:
        reader.close()


def test_merchant_totals_open_holds_and_remainders(ledger_backend: LedgerDb, signing_key) -> None:
    with LedgerWriter(
        ledger_backend.open(), signing_key=signing_key, config=LedgerConfig(batch_window_ms=0)
    ) as w:
        w.append([draft("p1", K.PURCHASE, "P1", 100, at_ms=1_000)])
        w.append([draft("p2", K.PURCHASE, "P2", 50, at_ms=2_000)])
        w.append([draft("p3", K.PURCHASE, "P3", 7, at_ms=3_000, merchant_id="OTHER")])
        w.append([draft("d1", K.DECLINE, "D1", 0, at_ms=1_500)])
        w.append([draft("h1", K.HOLD, "H1", 80, at_ms=1_000), draft("h2", K.HOLD, "H2", 30, at_ms=5_000)])
        w.append([draft("c1", K.CAPTURE, "C1", 60, "H1", at_ms=6_000)])
        w.append([draft("f1", K.REFUND, "F1", 40, "H1", at_ms=7_000)])  # names the hold: acts on its capture
        w.append([draft("x1", K.REVERSAL, "X1", 40, "F1", at_ms=8_000)])  # reversed refund gives 40 back
        w.append([draft("f2", K.REFUND, "F2", 30, "P1", at_ms=9_000)])
    reader = LedgerReader(ledger_backend.open())
    try:
        totals = {
            (t.kind, t.currency): (t.count, t.amount_minor)
            for t in reader.merchant_totals("M1", 1_000, 2_001)
        }
        assert totals == {("purchase", CUR): (2, 150), ("hold", CUR): (1, 80)}
        assert reader.merchant_totals("M1", 0, 1_000) == []
        assert [h.rrn for h in reader.open_holds()] == ["H2"]
        assert reader.open_holds(placed_before_ms=5_000) == []
        assert reader.refundable_remainder("C1") == 60 == reader.refundable_remainder("H1")
        assert reader.refundable_remainder("P1") == 70
        with pytest.raises(OriginalNotFound):
            reader.refundable_remainder("H2")
        assert [e.draft.kind for e in reader.entries_by_rrn("H1")] == [K.HOLD]
    finally:
        reader.close()


def test_rows_that_disagree_with_their_body_are_refused_on_read(
    ledger_backend: LedgerDb, signing_key
) -> None:
    with LedgerWriter(
        ledger_backend.open(), signing_key=signing_key, config=LedgerConfig(batch_window_ms=0)
    ) as w:
        w.append([draft("p1", K.PURCHASE, "P1", 100)])
    copy = ledger_backend.tampered_copy(["UPDATE entries SET amount_minor = 1"])
    reader = LedgerReader(copy.open())
    try:
        with pytest.raises(LedgerCorrupt, match="amount_minor"):
            reader.entries_by_rrn("P1")
    finally:
        reader.close()
