"""Registry records of merchant services: merchants, contracts, terminals, terminal keys, renewals, audit.

Why msgspec Structs with validation in `validate_*` functions rather than in the types: the same
records are decoded from the database (trusted, already validated), from TOML, from the CLI and from
admin API bodies (untrusted). Boundaries call `validate_*` once; the rules trust the values after.

Units: times are milliseconds since the Unix epoch (UTC) with `_ms` last; money is integer minor units
of the merchant's ISO 4217 numeric currency with `_minor` last; rates are basis points (1/100 of a
percent) with `_bps` last. A cap of `None` means "no cap" (0 is a real cap: nothing allowed).
"""

from __future__ import annotations

import enum
import re

import msgspec

DAY_MS = 86_400_000

#: Merchant id (field 42): 1-15 printable ASCII, no leading/trailing space.
MERCHANT_ID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z _\-./]{0,13}[0-9A-Za-z]$|^[0-9A-Za-z]$")
#: Terminal id (field 41): 1-8 alphanumerics.
TERMINAL_ID_RE = re.compile(r"^[0-9A-Za-z]{1,8}$")
#: Contract id: 1-32 of [A-Za-z0-9_.-].
CONTRACT_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
#: Card types a contract may price: brands from the BIN plus operator-defined classes.
CARD_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,23}$")
#: Highest merchant discount rate accepted (100%); anything near it is a typo, but it is the hard bound.
MAX_RATE_BPS = 10_000
#: Largest amount accepted anywhere (12 digits, field 4's width).
MAX_AMOUNT_MINOR = 999_999_999_999
#: Longest allowed windows (days), so a typo cannot make a rule meaningless.
MAX_WINDOW_DAYS = 3_660
MAX_NAME_CHARS = 80


class RegistryError(ValueError):
    """A record that fails validation, or an operation the registry refuses; the message says which
    field or rule and never contains card data or key material."""


class TerminalState(enum.StrEnum):
    """Lifecycle of a terminal (switch.merchant.lifecycle has the transition table)."""

    REGISTERED = "registered"  # created, deposit charged; sign-on then one test transaction
    ACTIVATED = "activated"  # signed on and a test transaction approved; activation time recorded
    ACTIVE = "active"  # first live transaction approved after activation
    SUSPENDED = "suspended"  # subscription lapsed past its grace period
    DEACTIVATED = "deactivated"  # taken out of service by an operator
    RETURNED = "returned"  # device returned: final


class MerchantStatus(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Rate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A merchant discount rate: percentage in basis points plus a fixed amount per transaction."""

    bps: int = 0
    fixed_minor: int = 0


class Contract(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a merchant agreed to: pricing, refund rules, subscription and deposit terms.

    `rates` maps a card type (`switch.merchant.fees.card_type`: visa, mastercard, amex, unionpay, ...,
    or a class from `bin_classes`) to a Rate; "default" prices every other card and is required.
    `bin_classes` maps a PAN prefix (6-11 digits) to a card type, longest prefix wins, before the brand
    ranges (e.g. {"453201": "visa_debit"}).
    """

    id: str
    merchant_id: str
    currency: str
    rates: dict[str, Rate]
    bin_classes: dict[str, str] = {}
    #: Whether a refund also returns the fixed part of the fee (pro rata, like the percentage part).
    refund_fixed_fee: bool = True
    refund_window_days: int = 180
    single_refund_cap_minor: int | None = None
    daily_refund_cap_minor: int | None = None
    subscription_fee_minor: int = 0
    subscription_period_days: int = 30
    subscription_grace_days: int = 7
    subscription_refund_window_days: int = 14
    deposit_minor: int = 0
    #: Deposit refund rule: activated within `deposit_activation_days` of registration AND at least
    #: `deposit_volume_minor` of net sales within `deposit_volume_days` of registration.
    deposit_activation_days: int = 30
    deposit_volume_minor: int = 0
    deposit_volume_days: int = 90


class Merchant(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    mcc: str
    currency: str
    status: MerchantStatus = MerchantStatus.OPEN
    contract_id: str = ""
    created_at_ms: int = 0


class Terminal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A terminal and its lifecycle facts. `paid_until_ms` is the end of the paid subscription."""

    id: str
    merchant_id: str
    profile: str = "terminal_ascii"
    state: TerminalState = TerminalState.REGISTERED
    registered_at_ms: int = 0
    signed_on_at_ms: int | None = None
    activated_at_ms: int | None = None
    live_at_ms: int | None = None
    suspended_at_ms: int | None = None
    deactivated_at_ms: int | None = None
    paid_until_ms: int = 0
    #: RRN of the DEPOSIT entry charged at registration ("" when the contract has no deposit).
    deposit_rrn: str = ""
    #: "" while undecided, "refunded" or "kept" once the deposit rule has decided.
    deposit_outcome: str = ""
    #: Reason for the last state change, shown to operators ("subscription lapsed ...").
    state_reason: str = ""


class TerminalKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A terminal master key, only ever in its encrypted storage form (under the KEK). `check_value`
    (KCV, 6 hex) lets operators compare keys without seeing them."""

    terminal_id: str
    key_index: int
    encrypted_hex: str
    check_value: str = ""
    created_at_ms: int = 0
    retired_at_ms: int | None = None


class Renewal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One paid subscription period of a terminal; `rrn` names its SUBSCRIPTION ledger entry."""

    rrn: str
    terminal_id: str
    merchant_id: str
    amount_minor: int
    currency: str
    paid_at_ms: int
    period_from_ms: int
    period_to_ms: int
    #: "applied" (paid_until extended), "refunded" (failed or cancelled: SUBSCRIPTION_REFUND posted).
    status: str = "applied"
    reason: str = ""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One registry change: who did what to which object when, with masked before/after JSON."""

    seq: int
    at_ms: int
    actor: str
    action: str
    object_kind: str
    object_id: str
    before: str
    after: str


# --- validation -----------------------------------------------------------------------------------


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise RegistryError(message)


def _shape(value: str) -> str:
    """A refused value described without its characters (it may be a PAN pasted in the wrong place)."""
    digits = sum(ch.isdigit() for ch in value)
    return f"of {len(value)} characters ({digits} digits)"


def _digits(value: str, n: int) -> bool:
    return len(value) == n and value.isascii() and value.isdigit()


def _amount(name: str, value: int | None, *, optional: bool = False) -> None:
    if value is None:
        _need(optional, f"{name} is required")
        return
    _need(0 <= value <= MAX_AMOUNT_MINOR, f"{name} must be 0..{MAX_AMOUNT_MINOR} minor units")


def _days(name: str, value: int, low: int = 0) -> None:
    _need(low <= value <= MAX_WINDOW_DAYS, f"{name} must be {low}..{MAX_WINDOW_DAYS} days")


def validate_merchant(m: Merchant) -> Merchant:
    _need(bool(MERCHANT_ID_RE.match(m.id)), "merchant id must be 1-15 letters, digits or ' _-./'")
    _need(0 < len(m.name) <= MAX_NAME_CHARS and m.name.isprintable(), "merchant name must be 1-80 chars")
    _need(_digits(m.mcc, 4), "mcc must be 4 digits (ISO 18245)")
    _need(_digits(m.currency, 3), "currency must be 3 digits (ISO 4217 numeric)")
    _need(m.contract_id == "" or bool(CONTRACT_ID_RE.match(m.contract_id)), "contract id malformed")
    return m


def validate_contract(c: Contract) -> Contract:
    _need(bool(CONTRACT_ID_RE.match(c.id)), "contract id must be 1-32 of A-Z a-z 0-9 _ . -")
    _need(bool(MERCHANT_ID_RE.match(c.merchant_id)), "contract merchant id malformed")
    _need(_digits(c.currency, 3), "contract currency must be 3 digits")
    _need("default" in c.rates, "contract rates need a 'default' entry")
    for card_type, rate in c.rates.items():
        # a malformed value is not echoed: it may be a card number pasted in the wrong place
        _need(bool(CARD_TYPE_RE.match(card_type)), f"card type {_shape(card_type)} malformed")
        _need(0 <= rate.bps <= MAX_RATE_BPS, f"rate for {card_type} must be 0..{MAX_RATE_BPS} bps")
        _amount(f"fixed fee for {card_type}", rate.fixed_minor)
    for prefix, card_type in c.bin_classes.items():
        _need(
            6 <= len(prefix) <= 11 and prefix.isascii() and prefix.isdigit(),
            f"bin class prefix {_shape(prefix)} must be 6-11 digits",
        )
        _need(bool(CARD_TYPE_RE.match(card_type)), f"bin class card type {_shape(card_type)} malformed")
    _days("refund_window_days", c.refund_window_days)
    _amount("single_refund_cap_minor", c.single_refund_cap_minor, optional=True)
    _amount("daily_refund_cap_minor", c.daily_refund_cap_minor, optional=True)
    _amount("subscription_fee_minor", c.subscription_fee_minor)
    _days("subscription_period_days", c.subscription_period_days, 1)
    _days("subscription_grace_days", c.subscription_grace_days)
    _days("subscription_refund_window_days", c.subscription_refund_window_days)
    _amount("deposit_minor", c.deposit_minor)
    _days("deposit_activation_days", c.deposit_activation_days)
    _amount("deposit_volume_minor", c.deposit_volume_minor)
    _days("deposit_volume_days", c.deposit_volume_days)
    return c


def validate_terminal(t: Terminal) -> Terminal:
    _need(bool(TERMINAL_ID_RE.match(t.id)), "terminal id must be 1-8 letters or digits")
    _need(bool(MERCHANT_ID_RE.match(t.merchant_id)), "terminal merchant id malformed")
    _need(0 < len(t.profile) <= 40 and t.profile.isidentifier(), "terminal profile malformed")
    _need(t.deposit_outcome in ("", "refunded", "kept"), "deposit outcome must be '', refunded or kept")
    return t


#: Encrypted key forms accepted: 16/24/32-byte keys (DES/3DES/AES) wrapped, optionally with padding
#: or an AEAD tag and nonce -- so 32..160 hex digits. The registry never sees a clear key.
_KEY_HEX_RE = re.compile(r"^[0-9A-Fa-f]{32,160}$")


def validate_key(k: TerminalKey) -> TerminalKey:
    _need(bool(TERMINAL_ID_RE.match(k.terminal_id)), "key terminal id malformed")
    _need(0 <= k.key_index <= 99, "key index must be 0..99")
    _need(
        bool(_KEY_HEX_RE.match(k.encrypted_hex)) and len(k.encrypted_hex) % 2 == 0,
        "encrypted key must be 32-160 hex digits (the encrypted storage form, never a clear key)",
    )
    _need(
        k.check_value == "" or bool(re.match(r"^[0-9A-Fa-f]{4,8}$", k.check_value)),
        "check value must be 4-8 hex digits",
    )
    return k
