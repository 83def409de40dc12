"""Ledger entries of merchant services, built in one place so every caller posts the same shapes.

Postings (debit first; every entry balances in its currency, amounts > 0):

| entry | kind | debit | credit |
|---|---|---|---|
| fee on a sale | FEE | merchant:M:payable | switch:fee_income |
| fee returned with a refund | FEE_REFUND | switch:fee_income | merchant:M:payable |
| fee undone (sale voided/reversed) | REVERSAL of `<sale>/fee` | switch:fee_income | merchant:M:payable |
| fee return undone (refund reversed) | REVERSAL of `<refund>/fee` | merchant:M:payable | switch:fee_income |
| deposit charged at registration | DEPOSIT | merchant:M:payable | merchant:M:deposit |
| deposit refunded by rule | DEPOSIT_REFUND | merchant:M:deposit | merchant:M:payable |
| deposit kept by rule | ADJUSTMENT | merchant:M:deposit | switch:deposits_held |
| subscription period paid | SUBSCRIPTION | merchant:M:payable | switch:subscription_income |
| subscription refunded | SUBSCRIPTION_REFUND | switch:subscription_income | merchant:M:payable |
| cutover, net > 0 | SETTLEMENT | merchant:M:payable | switch:settlement_bank |
| cutover, net < 0 | SETTLEMENT | switch:settlement_bank | merchant:M:payable |

RRNs: an entry's `rrn` must be unique per kind in the ledger. A fee shares nothing with its sale's RRN:
it is `<sale rrn>/fee` with `original_rrn` = the sale's RRN, so a reversal of the sale (which undoes
the latest open transaction of that RRN) always hits the sale, and the fee is found with the sale's
family. A fee refund is `<refund rrn>/fee` naming `<sale rrn>/fee`, so the ledger itself enforces that
fee refunds never exceed the fee. Idempotency keys are derived from the RRNs: re-posting after a crash
returns the original entry instead of charging twice.
"""

from __future__ import annotations

import msgspec

from switch.ledger.model import EntryDraft, EntryKind, Posting, Side, accounts

D, C = Side.DEBIT, Side.CREDIT
_json = msgspec.json.Encoder()


def memo_json(obj: object) -> str:
    """Canonical JSON for a memo (a Struct or plain data): what the rule saw and decided."""
    return _json.encode(obj).decode()


def fee_rrn(sale_rrn: str) -> str:
    return f"{sale_rrn}/fee"


def _draft(
    kind: EntryKind,
    key: str,
    rrn: str,
    at_ms: int,
    merchant_id: str,
    amount_minor: int,
    currency: str,
    debit: str,
    credit: str,
    *,
    terminal_id: str = "",
    original_rrn: str = "",
    memo: str = "",
) -> EntryDraft:
    if amount_minor <= 0:
        raise ValueError(f"{kind} entry needs a positive amount, got {amount_minor}")
    return EntryDraft(
        idempotency_key=key,
        kind=kind,
        rrn=rrn,
        at_ms=at_ms,
        merchant_id=merchant_id,
        terminal_id=terminal_id,
        amount_minor=amount_minor,
        currency=currency,
        original_rrn=original_rrn,
        postings=(Posting(debit, D, amount_minor, currency), Posting(credit, C, amount_minor, currency)),
        memo=memo,
    )


def fee(
    sale_rrn: str, merchant_id: str, terminal_id: str, fee_minor: int, currency: str, at_ms: int, memo: str
) -> EntryDraft:
    return _draft(
        EntryKind.FEE,
        f"fee:{sale_rrn}",
        fee_rrn(sale_rrn),
        at_ms,
        merchant_id,
        fee_minor,
        currency,
        accounts.merchant_payable(merchant_id),
        accounts.FEE_INCOME,
        terminal_id=terminal_id,
        original_rrn=sale_rrn,
        memo=memo,
    )


def fee_refund(
    refund_rrn: str,
    sale_rrn: str,
    merchant_id: str,
    terminal_id: str,
    amount_minor: int,
    currency: str,
    at_ms: int,
    memo: str,
) -> EntryDraft:
    return _draft(
        EntryKind.FEE_REFUND,
        f"fee_refund:{refund_rrn}",
        fee_rrn(refund_rrn),
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        accounts.FEE_INCOME,
        accounts.merchant_payable(merchant_id),
        terminal_id=terminal_id,
        original_rrn=fee_rrn(sale_rrn),
        memo=memo,
    )


def fee_reversal(
    reversed_kind: EntryKind,
    fee_rrn: str,
    merchant_id: str,
    terminal_id: str,
    amount_minor: int,
    currency: str,
    at_ms: int,
    memo: str,
) -> EntryDraft:
    """Undo a FEE (its sale was voided or reversed: the merchant gets back what refunds had not) or a
    FEE_REFUND (its refund was reversed: the fee is owed again). The ledger's REVERSAL rule checks the
    amount is exactly what is left of that entry, so a fee is never undone twice or beyond itself."""
    pay, income = accounts.merchant_payable(merchant_id), accounts.FEE_INCOME
    if reversed_kind is EntryKind.FEE:
        debit, credit = income, pay
    elif reversed_kind is EntryKind.FEE_REFUND:
        debit, credit = pay, income
    else:
        raise ValueError(f"only fee entries are reversed here, not {reversed_kind}")
    return _draft(
        EntryKind.REVERSAL,
        f"fee_reversal:{fee_rrn}",
        fee_rrn,
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        debit,
        credit,
        terminal_id=terminal_id,
        original_rrn=fee_rrn,
        memo=memo,
    )


def deposit(
    rrn: str, merchant_id: str, terminal_id: str, amount_minor: int, currency: str, at_ms: int
) -> EntryDraft:
    return _draft(
        EntryKind.DEPOSIT,
        f"deposit:{rrn}",
        rrn,
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        accounts.merchant_payable(merchant_id),
        accounts.merchant_deposit(merchant_id),
        terminal_id=terminal_id,
        memo=memo_json({"terminal_id": terminal_id}),
    )


def deposit_outcome_key(deposit_rrn: str) -> str:
    """ONE idempotency key for both outcomes of a deposit (refund or keep): whichever evaluation
    (API, CLI, the switch's schedule) posts first wins, and a concurrent one deciding the other way
    (its clock crossed a deadline meanwhile) is refused by the ledger instead of posting both."""
    return f"deposit_outcome:{deposit_rrn}"


def deposit_refund(
    deposit_rrn: str,
    merchant_id: str,
    terminal_id: str,
    amount_minor: int,
    currency: str,
    at_ms: int,
    memo: str,
) -> EntryDraft:
    return _draft(
        EntryKind.DEPOSIT_REFUND,
        deposit_outcome_key(deposit_rrn),
        f"{deposit_rrn}/refund",
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        accounts.merchant_deposit(merchant_id),
        accounts.merchant_payable(merchant_id),
        terminal_id=terminal_id,
        original_rrn=deposit_rrn,
        memo=memo,
    )


def deposit_kept(
    deposit_rrn: str,
    merchant_id: str,
    terminal_id: str,
    amount_minor: int,
    currency: str,
    at_ms: int,
    memo: str,
) -> EntryDraft:
    return _draft(
        EntryKind.ADJUSTMENT,
        deposit_outcome_key(deposit_rrn),
        f"{deposit_rrn}/kept",
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        accounts.merchant_deposit(merchant_id),
        accounts.DEPOSITS_HELD,
        terminal_id=terminal_id,
        original_rrn=deposit_rrn,
        memo=memo,
    )


def subscription(
    rrn: str, merchant_id: str, terminal_id: str, amount_minor: int, currency: str, at_ms: int, memo: str
) -> EntryDraft:
    return _draft(
        EntryKind.SUBSCRIPTION,
        f"subscription:{rrn}",
        rrn,
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        accounts.merchant_payable(merchant_id),
        accounts.SUBSCRIPTION_INCOME,
        terminal_id=terminal_id,
        memo=memo,
    )


def subscription_refund(
    rrn: str, merchant_id: str, terminal_id: str, amount_minor: int, currency: str, at_ms: int, memo: str
) -> EntryDraft:
    return _draft(
        EntryKind.SUBSCRIPTION_REFUND,
        f"subscription_refund:{rrn}",
        f"{rrn}/refund",
        at_ms,
        merchant_id,
        amount_minor,
        currency,
        accounts.SUBSCRIPTION_INCOME,
        accounts.merchant_payable(merchant_id),
        terminal_id=terminal_id,
        original_rrn=rrn,
        memo=memo,
    )


def settlement(
    merchant_id: str, currency: str, net_minor: int, to_seq: int, at_ms: int, memo: str
) -> EntryDraft:
    """The cutover entry closing a merchant's batch: entries of the merchant with seq < `to_seq` (and
    after the previous settlement's `to_seq`) are settled. Net 0 posts no money but still closes."""
    rrn = f"settle/{merchant_id}/{currency}/{to_seq}"
    key = f"settlement:{merchant_id}:{currency}:{to_seq}"
    payable = accounts.merchant_payable(merchant_id)
    if net_minor > 0:
        postings: tuple[Posting, ...] = (
            Posting(payable, D, net_minor, currency),
            Posting(accounts.SETTLEMENT_BANK, C, net_minor, currency),
        )
    elif net_minor < 0:
        postings = (
            Posting(accounts.SETTLEMENT_BANK, D, -net_minor, currency),
            Posting(payable, C, -net_minor, currency),
        )
    else:
        postings = ()
    return EntryDraft(
        idempotency_key=key,
        kind=EntryKind.SETTLEMENT,
        rrn=rrn,
        at_ms=at_ms,
        merchant_id=merchant_id,
        amount_minor=abs(net_minor),
        currency=currency,
        postings=postings,
        memo=memo,
    )
