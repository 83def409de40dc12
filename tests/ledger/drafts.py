"""Draft builders shared by the ledger tests (postings that balance, as processing would build them)."""

from __future__ import annotations

from switch.ledger.model import EntryDraft, EntryKind, Posting, Side, accounts

CUR = "978"
MERCHANT = "M1"
ACQ = "acq1"

#: (debit account, credit account) per kind: the economic direction of each outcome.
_ACCOUNTS: dict[EntryKind, tuple[str, str]] = {
    EntryKind.HOLD: (accounts.holds(ACQ), accounts.holds_contra(MERCHANT)),
    EntryKind.HOLD_VOID: (accounts.holds_contra(MERCHANT), accounts.holds(ACQ)),
    EntryKind.HOLD_EXPIRY: (accounts.holds_contra(MERCHANT), accounts.holds(ACQ)),
    EntryKind.CAPTURE: (accounts.acquirer_clearing(ACQ), accounts.merchant_payable(MERCHANT)),
    EntryKind.PURCHASE: (accounts.acquirer_clearing(ACQ), accounts.merchant_payable(MERCHANT)),
    EntryKind.STAND_IN: (accounts.STAND_IN_EXPOSURE, accounts.merchant_payable(MERCHANT)),
    EntryKind.VOID: (accounts.merchant_payable(MERCHANT), accounts.acquirer_clearing(ACQ)),
    EntryKind.REFUND: (accounts.merchant_payable(MERCHANT), accounts.acquirer_clearing(ACQ)),
    EntryKind.REVERSAL: (accounts.merchant_payable(MERCHANT), accounts.acquirer_clearing(ACQ)),
    EntryKind.FEE: (accounts.merchant_payable(MERCHANT), accounts.FEE_INCOME),
    EntryKind.FEE_REFUND: (accounts.FEE_INCOME, accounts.merchant_payable(MERCHANT)),
}


def draft(
    key: str,
    kind: EntryKind,
    rrn: str,
    amount: int,
    original_rrn: str = "",
    *,
    at_ms: int = 1_700_000_000_000,
    merchant_id: str = MERCHANT,
    currency: str = CUR,
    memo: str = "",
) -> EntryDraft:
    postings: tuple[Posting, ...] = ()
    if kind is not EntryKind.DECLINE and amount > 0:
        debit, credit = _ACCOUNTS.get(
            kind, (accounts.SETTLEMENT_BANK, accounts.merchant_payable(merchant_id))
        )
        postings = (
            Posting(debit, Side.DEBIT, amount, currency),
            Posting(credit, Side.CREDIT, amount, currency),
        )
    return EntryDraft(
        idempotency_key=key,
        kind=kind,
        rrn=rrn,
        at_ms=at_ms,
        merchant_id=merchant_id,
        terminal_id="T0000001",
        pan_masked="411111******1111",
        pan_hash="ab" * 32,
        amount_minor=amount,
        currency=currency,
        original_rrn=original_rrn,
        postings=postings,
        memo=memo,
    )
