"""Merchant discount rate: the fee on each approved sale, and its pro-rata return on refunds.

Rounding (documented contract with merchants; integer minor units, never floats):
- Fee on a sale = round_half_up(amount * bps / 10_000) + fixed_minor.
- Fee returned by refunds is computed CUMULATIVELY: after refunds totalling R of an original amount A,
  the merchant has been returned floor(refundable_fee * R / A) in total; each refund returns the
  difference from what was returned before. Consequences: rounding never accumulates over many partial
  refunds, a full refund (R == A) returns exactly the refundable fee, and the total returned never
  exceeds the fee charged (floor, and R <= A is enforced by the refund rules and the ledger).
- `refundable_fee` is the whole fee, or only its percentage part when the contract says the fixed part
  is not refundable (`Contract.refund_fixed_fee = False`). It is fixed at charge time and kept in the
  FEE entry's memo, so a later contract change never alters what a refund returns.
"""

from __future__ import annotations

import msgspec

from switch.merchant.model import Contract, Rate

#: Brand ranges: (first prefix, last prefix) of equal length, checked longest first.
_BRAND_RANGES: tuple[tuple[str, str, str], ...] = (
    ("2200", "2204", "mir"),
    ("2221", "2720", "mastercard"),
    ("3528", "3589", "jcb"),
    ("6011", "6011", "discover"),
    ("300", "305", "diners"),
    ("644", "649", "discover"),
    ("639", "639", "maestro"),
    ("34", "34", "amex"),
    ("37", "37", "amex"),
    ("36", "36", "diners"),
    ("38", "39", "diners"),
    ("51", "55", "mastercard"),
    ("50", "50", "maestro"),
    ("56", "58", "maestro"),
    ("62", "62", "unionpay"),
    ("65", "65", "discover"),
    ("67", "67", "maestro"),
    ("4", "4", "visa"),
)
_BY_LENGTH = sorted(_BRAND_RANGES, key=lambda r: -len(r[0]))


class FeeTerms(msgspec.Struct, frozen=True):
    """What a FEE entry's memo records: how the fee was computed and how much of it is refundable."""

    card_type: str
    bps: int
    fixed_minor: int
    sale_minor: int
    fee_minor: int
    refundable_minor: int


#: Leading digits that decide the brand (the longest range prefix): brand() is cached on them.
_BRAND_DIGITS = max(len(low) for low, _, _ in _BRAND_RANGES)
_brand_cache: dict[str, str] = {}


def brand(pan_prefix: str) -> str:
    """Card brand from the leading PAN digits (at least 6 recommended); "other" when unknown."""
    head4 = pan_prefix[:_BRAND_DIGITS]
    hit = _brand_cache.get(head4)  # at most ~11,000 keys of <= 4 digits: no card data kept
    if hit is None:
        hit = "other"
        for low, high, name in _BY_LENGTH:
            head = head4[: len(low)]
            if len(head) == len(low) and head.isdigit() and low <= head <= high:
                hit = name
                break
        if head4.isdigit():
            _brand_cache[head4] = hit
    return hit


def card_type(pan_prefix: str, bin_classes: dict[str, str]) -> str:
    """The contract's card type: the longest matching configured BIN class, else the brand."""
    if bin_classes:
        for n in range(min(11, len(pan_prefix)), 5, -1):
            hit = bin_classes.get(pan_prefix[:n])
            if hit is not None:
                return hit
    return brand(pan_prefix)


def rate_for(contract: Contract, type_: str) -> tuple[str, Rate]:
    """(card type priced, rate): the type's own rate or the contract's default."""
    rate = contract.rates.get(type_)
    if rate is not None:
        return type_, rate
    return "default", contract.rates["default"]


def percentage_minor(amount_minor: int, bps: int) -> int:
    """round_half_up(amount * bps / 10_000) in integers."""
    if amount_minor < 0 or bps < 0:
        raise ValueError("amount and rate must not be negative")
    return (amount_minor * bps + 5_000) // 10_000


def fee_terms(contract: Contract, pan_prefix: str, sale_minor: int) -> FeeTerms:
    """The fee of one approved sale under `contract`, with what a refund may return of it."""
    type_, rate = rate_for(contract, card_type(pan_prefix, contract.bin_classes))
    pct = percentage_minor(sale_minor, rate.bps)
    fee = pct + rate.fixed_minor
    refundable = fee if contract.refund_fixed_fee else pct
    return FeeTerms(
        card_type=type_,
        bps=rate.bps,
        fixed_minor=rate.fixed_minor,
        sale_minor=sale_minor,
        fee_minor=fee,
        refundable_minor=refundable,
    )


def fee_refund_minor(
    refundable_fee_minor: int, original_minor: int, refunded_before_minor: int, refund_minor: int
) -> int:
    """Fee returned with a refund of `refund_minor` after `refunded_before_minor` was already refunded
    (cumulative floor; see the module docstring)."""
    if original_minor <= 0:
        raise ValueError("original amount must be positive")
    if refunded_before_minor < 0 or refund_minor < 0:
        raise ValueError("refund amounts must not be negative")
    after = refunded_before_minor + refund_minor
    if after > original_minor:
        raise ValueError(f"refunds {after} would exceed the original {original_minor}")
    return (refundable_fee_minor * after) // original_minor - (
        refundable_fee_minor * refunded_before_minor
    ) // original_minor


def decode_terms(memo: str) -> FeeTerms:
    """FeeTerms from a FEE entry's memo (raises ValueError if the memo is not one)."""
    try:
        return msgspec.json.decode(memo, type=FeeTerms)
    except msgspec.DecodeError as exc:
        raise ValueError(f"FEE entry memo is not fee terms: {exc}") from None
