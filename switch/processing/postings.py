"""The double-entry scheme: which accounts each outcome debits and credits (docs/flows.md, "Postings").

Sales make the acquirer owe the switch (debit acquirer clearing) and the switch owe the merchant
(credit merchant payable); anything that undoes a sale posts the mirror image. Holds live on their own
pair of accounts so they never mix with money owed. Every builder's postings balance by construction;
`check_balanced` asserts it anyway before a draft leaves the core (TigerBeetle: assert on both sides).
"""

from __future__ import annotations

from switch.ledger.model import EntryDraft, EntryKind, Posting, Side, accounts, check_balanced
from switch.processing.record import Record

D, C = Side.DEBIT, Side.CREDIT


def _pair(debit: str, credit: str, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    return (Posting(debit, D, amount_minor, currency), Posting(credit, C, amount_minor, currency))


def sale(acquirer: str, merchant_id: str, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """Purchase, capture, stand-in: Dr acquirer clearing / Cr merchant payable."""
    return _pair(
        accounts.acquirer_clearing(acquirer), accounts.merchant_payable(merchant_id), amount_minor, currency
    )


def unsale(acquirer: str, merchant_id: str, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """Void, refund, reversal of a sale: Dr merchant payable / Cr acquirer clearing."""
    return _pair(
        accounts.merchant_payable(merchant_id), accounts.acquirer_clearing(acquirer), amount_minor, currency
    )


def hold(acquirer: str, merchant_id: str, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """Pre-authorisation: Dr acquirer holds / Cr merchant holds."""
    return _pair(accounts.holds(acquirer), accounts.holds_contra(merchant_id), amount_minor, currency)


def release(acquirer: str, merchant_id: str, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """Hold captured, voided or expired: Dr merchant holds / Cr acquirer holds (the full hold)."""
    return _pair(accounts.holds_contra(merchant_id), accounts.holds(acquirer), amount_minor, currency)


def draft(
    txn: Record,
    *,
    key: str,
    kind: EntryKind,
    postings: tuple[Posting, ...] = (),
    rrn: str | None = None,
    amount_minor: int | None = None,
    response_code: str | None = None,
    at_ms: int | None = None,
    original_rrn: str | None = None,
    memo: str | None = None,
) -> EntryDraft:
    """An EntryDraft describing `txn` (fields overridable for entries acting on an original)."""
    if postings:
        check_balanced(postings)
    return EntryDraft(
        idempotency_key=key,
        kind=kind,
        rrn=txn.rrn if rrn is None else rrn,
        at_ms=txn.at_ms if at_ms is None else at_ms,
        response_code=txn.response_code if response_code is None else response_code,
        merchant_id=txn.merchant_id,
        terminal_id=txn.terminal_id,
        pan_masked=txn.pan_masked,
        pan_hash=txn.pan_hash,
        amount_minor=txn.amount_minor if amount_minor is None else amount_minor,
        currency=txn.currency,
        original_rrn=txn.original_rrn if original_rrn is None else original_rrn,
        postings=postings,
        memo=txn.memo() if memo is None else memo,
    )
