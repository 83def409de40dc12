"""The ledger's records: entries of balanced postings, as msgspec Structs.

An entry records one outcome of one transaction (a purchase approved, a refund, a reversal, a fee...).
Its postings balance per currency (sum of debits == sum of credits): asserted before the write and
again after reading back. Amounts are integers in minor units with an ISO 4217 numeric currency code
(field 49). Card data: only a masked PAN and a keyed hash of the PAN are kept; never the PAN itself,
track data, a PIN block or a CVV.

The processing layer builds `EntryDraft`s (no sequence number, no chain data); the ledger assigns the
sequence number when it commits and returns `Entry`s. Account names are plain strings built by the
helpers in `accounts` so every layer spells them the same way.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable

import msgspec


class EntryKind(enum.StrEnum):
    HOLD = "hold"  # pre-authorisation: reserves funds, resolves once (capture / void / expire)
    CAPTURE = "capture"  # completion of a hold, fully or partly
    HOLD_VOID = "hold_void"  # hold released by the terminal
    HOLD_EXPIRY = "hold_expiry"  # hold released by time
    PURCHASE = "purchase"
    VOID = "void"
    REFUND = "refund"
    REVERSAL = "reversal"
    STAND_IN = "stand_in"  # approved by the switch while the acquirer was down
    DECLINE = "decline"  # a declined outcome: recorded for audit, no postings
    FEE = "fee"
    FEE_REFUND = "fee_refund"
    DEPOSIT = "deposit"
    DEPOSIT_REFUND = "deposit_refund"
    SUBSCRIPTION = "subscription"
    SUBSCRIPTION_REFUND = "subscription_refund"
    SETTLEMENT = "settlement"
    ADJUSTMENT = "adjustment"


class Side(enum.StrEnum):
    DEBIT = "D"
    CREDIT = "C"


class Posting(msgspec.Struct, frozen=True, array_like=True):
    account: str
    side: Side
    amount_minor: int
    currency: str


class EntryDraft(msgspec.Struct, frozen=True, kw_only=True):
    """An entry as built by processing, before the ledger numbers it.

    `idempotency_key`: a repeat with the same key and the same payload returns the original entry; the
    same key with a different payload is a conflict. `original_rrn` links captures, voids, refunds and
    reversals to the transaction they act on (refund <= original is enforced against it).
    """

    idempotency_key: str
    kind: EntryKind
    rrn: str
    at_ms: int
    response_code: str = "00"
    merchant_id: str = ""
    terminal_id: str = ""
    pan_masked: str = ""
    pan_hash: str = ""
    amount_minor: int = 0
    currency: str = ""
    original_rrn: str = ""
    postings: tuple[Posting, ...] = ()
    memo: str = ""


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """A committed entry: a draft plus its sequence number (0-based, gap-free, the Merkle leaf index)."""

    seq: int
    draft: EntryDraft


class UnbalancedEntry(ValueError):
    """Postings that do not balance per currency; never written."""


class IdempotencyConflict(ValueError):
    """The same idempotency key was used with a different payload."""


def check_balanced(postings: Iterable[Posting]) -> None:
    """Raise UnbalancedEntry unless debits == credits in every currency and amounts are positive."""
    net: dict[str, int] = defaultdict(int)
    for p in postings:
        if p.amount_minor <= 0:
            raise UnbalancedEntry(f"posting to {p.account} has non-positive amount {p.amount_minor}")
        net[p.currency] += p.amount_minor if p.side is Side.DEBIT else -p.amount_minor
    bad = {cur: n for cur, n in net.items() if n}
    if bad:
        raise UnbalancedEntry(f"postings do not balance: {bad}")


class accounts:
    """Account names. Owner first, so per-owner queries are prefix scans."""

    @staticmethod
    def merchant_payable(merchant_id: str) -> str:
        """What the switch owes the merchant for approved sales (credit-normal)."""
        return f"merchant:{merchant_id}:payable"

    @staticmethod
    def merchant_deposit(merchant_id: str) -> str:
        return f"merchant:{merchant_id}:deposit"

    @staticmethod
    def acquirer_clearing(acquirer: str) -> str:
        """What the acquirer owes the switch for approved sales (debit-normal)."""
        return f"acquirer:{acquirer}:clearing"

    @staticmethod
    def holds(acquirer: str) -> str:
        """Funds reserved by open pre-authorisations."""
        return f"acquirer:{acquirer}:holds"

    @staticmethod
    def holds_contra(merchant_id: str) -> str:
        return f"merchant:{merchant_id}:holds"

    FEE_INCOME = "switch:fee_income"
    SUBSCRIPTION_INCOME = "switch:subscription_income"
    DEPOSITS_HELD = "switch:deposits_held"
    STAND_IN_EXPOSURE = "switch:stand_in_exposure"
    SETTLEMENT_BANK = "switch:settlement_bank"
