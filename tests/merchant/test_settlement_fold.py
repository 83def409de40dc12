"""Settlement fold and 0500 reconciliation classify every entry from the entry itself: fee reversals,
reversals of refunds whose refund was in an earlier batch, and late-approval pairs."""

from __future__ import annotations

from switch.ledger.model import Entry, EntryDraft, EntryKind, Posting, Side, accounts
from switch.merchant import drafts, settlement

PAY, ACQ = accounts.merchant_payable("M1"), accounts.acquirer_clearing("A")


def money(
    kind: EntryKind, key: str, rrn: str, amount: int, *, to_merchant: bool, original: str = ""
) -> EntryDraft:
    debit, credit = (ACQ, PAY) if to_merchant else (PAY, ACQ)
    return EntryDraft(
        idempotency_key=key,
        kind=kind,
        rrn=rrn,
        at_ms=1,
        merchant_id="M1",
        terminal_id="T1",
        amount_minor=amount,
        currency="978",
        original_rrn=original,
        postings=(Posting(debit, Side.DEBIT, amount, "978"), Posting(credit, Side.CREDIT, amount, "978")),
    )


def numbered(*ds: EntryDraft) -> list[Entry]:
    return [Entry(seq=i, draft=d) for i, d in enumerate(ds)]


def test_fold_and_reconciliation_classify_reversals_from_the_entry() -> None:
    sale = money(EntryKind.PURCHASE, "tk:a:out", "R1", 10_000, to_merchant=True)
    fee = drafts.fee("R1", "M1", "T1", 160, "978", 1, "{}")
    refund = money(EntryKind.REFUND, "tk:b:out", "R2", 4_000, to_merchant=False, original="R1")
    fee_back = drafts.fee_refund("R2", "R1", "M1", "T1", 64, "978", 1, "{}")
    # --- batch 2 starts here (seq 4): the refund is reversed, with its fee return ---
    refund_rev = money(EntryKind.REVERSAL, "rrn:R2:rev", "R2", 4_000, to_merchant=True, original="R2")
    fee_back_rev = drafts.fee_reversal(EntryKind.FEE_REFUND, "R2/fee", "M1", "T1", 64, "978", 1, "{}")
    voided = money(EntryKind.PURCHASE, "tk:c:out", "R3", 2_000, to_merchant=True)
    voided_fee = drafts.fee("R3", "M1", "T1", 40, "978", 1, "{}")
    void = money(EntryKind.VOID, "tk:d:out", "R4", 2_000, to_merchant=False, original="R3")
    voided_fee_rev = drafts.fee_reversal(EntryKind.FEE, "R3/fee", "M1", "T1", 40, "978", 1, "{}")
    late = money(EntryKind.PURCHASE, "rrn:R5:late", "R5", 700, to_merchant=True)
    late_rev = money(EntryKind.REVERSAL, "rrn:R5:rev", "R5", 700, to_merchant=False, original="R5")
    entries = numbered(
        sale,
        fee,
        refund,
        fee_back,
        refund_rev,
        fee_back_rev,
        voided,
        voided_fee,
        void,
        voided_fee_rev,
        late,
        late_rev,
    )
    (row,) = settlement.settle(entries, 4, len(entries))
    assert (row.gross_minor, row.refunds_minor, row.fees_minor) == (
        2_000 - 2_000 + 700 - 700,
        -4_000,
        64 + 40 - 40,
    )
    assert row.balanced and row.net_payable_minor == row.payable_check_minor == 4_000 - 64
    declared = settlement.TerminalTotals(
        terminal_id="T1",
        currency="978",
        debits=settlement.TotalsLine(1, 2_000),  # the late pair was never heard: on no line
        debit_reversals=settlement.TotalsLine(1, 2_000),
        credit_reversals=settlement.TotalsLine(1, 4_000),
    )
    rec = settlement.reconcile(declared, entries, 4)
    assert rec.balanced, rec.out_of_balance
    off = settlement.reconcile(
        settlement.TerminalTotals(terminal_id="T1", currency="978", debits=settlement.TotalsLine(2, 2_700)),
        entries,
        4,
    )
    assert [(x.name, x.ledger_count, x.ledger_amount_minor) for x in off.out_of_balance] == [
        ("credit_reversals", 1, 4_000),
        ("debits", 1, 2_000),
        ("debit_reversals", 1, 2_000),
    ]
