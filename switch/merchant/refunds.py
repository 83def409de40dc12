"""Refund rules of a merchant's contract, checked in this order (the first failure is the answer):

| check | decline |
|---|---|
| original known | 25 |
| original is this merchant's, same currency, approved, not voided or reversed | 12 |
| refund on day(original) + window at the latest (business days; the day after is refused) | 12 |
| cumulative refunds <= original amount | 13 |
| amount <= single-refund cap (exactly at the cap is allowed) | 61 |
| refunds of the business day + amount <= daily cap (exactly at the cap is allowed) | 61 |
| merchant's unsettled balance (what the switch still owes it) >= amount | 51 |

Pure: the caller supplies the original's facts (from the ledger), the day's refunds and the balance
(from MerchantRules' running totals). The ledger enforces "cumulative <= original" again on write.
"""

from __future__ import annotations

import msgspec

from switch.merchant import codes
from switch.merchant.days import days_between
from switch.merchant.lifecycle import MerchantDecline
from switch.merchant.model import Contract


class OriginalFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger says about the sale a refund names."""

    rrn: str
    merchant_id: str
    currency: str
    amount_minor: int
    at_ms: int
    approved: bool = True
    #: "" while open; "void" or "reversal" once closed.
    closed_by: str = ""
    refunded_minor: int = 0


def check_refund(
    contract: Contract,
    merchant_id: str,
    amount_minor: int,
    currency: str,
    original: OriginalFacts | None,
    now_ms: int,
    refunded_today_minor: int,
    unsettled_minor: int,
    utc_offset_minutes: int = 0,
) -> MerchantDecline | None:
    if original is None:
        return MerchantDecline(codes.UNKNOWN_ORIGINAL, "refund names no known original")
    o = original
    if o.merchant_id != merchant_id:
        return MerchantDecline(codes.INVALID_TRANSACTION, f"original {o.rrn} belongs to another merchant")
    if o.currency != currency:
        return MerchantDecline(
            codes.INVALID_TRANSACTION,
            f"refund currency {currency} differs from original {o.rrn}'s {o.currency}",
        )
    if not o.approved:
        return MerchantDecline(codes.INVALID_TRANSACTION, f"original {o.rrn} was not approved")
    if o.closed_by:
        word = {"void": "voided", "reversal": "reversed"}.get(o.closed_by, f"closed by {o.closed_by}")
        return MerchantDecline(codes.INVALID_TRANSACTION, f"original {o.rrn} was {word}")
    age_days = days_between(o.at_ms, now_ms, utc_offset_minutes)
    if age_days > contract.refund_window_days:
        return MerchantDecline(
            codes.INVALID_TRANSACTION,
            f"original {o.rrn} is {age_days} days old; refund window is {contract.refund_window_days} days",
            flag="refund_window",
        )
    left = o.amount_minor - o.refunded_minor
    if amount_minor > left:
        return MerchantDecline(
            codes.INVALID_AMOUNT,
            f"refund {amount_minor} exceeds what is left of {o.rrn} ({left} of {o.amount_minor})",
        )
    cap = contract.single_refund_cap_minor
    if cap is not None and amount_minor > cap:
        return MerchantDecline(
            codes.EXCEEDS_AMOUNT_LIMIT,
            f"refund {amount_minor} above the single-refund cap {cap}",
            flag="refund_cap",
        )
    daily = contract.daily_refund_cap_minor
    if daily is not None and refunded_today_minor + amount_minor > daily:
        return MerchantDecline(
            codes.EXCEEDS_AMOUNT_LIMIT,
            f"refunds today {refunded_today_minor} + {amount_minor} above the daily cap {daily}",
            flag="refund_daily_cap",
        )
    if unsettled_minor < amount_minor:
        return MerchantDecline(
            codes.INSUFFICIENT_FUNDS,
            f"merchant unsettled balance {unsettled_minor} does not cover refund {amount_minor}",
            flag="refund_balance",
        )
    return None
