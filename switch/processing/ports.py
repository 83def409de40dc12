"""What the core needs from outside, as small Protocols, with config-backed defaults.

- `Router`: which acquirer takes a card (switch.routing.bins.BinTable satisfies it as is).
- `Directory`: which terminals and merchants exist (config today; issue 6 backs it with the registry).
- `Rules`: a step between validation and routing that may decline with a code and a reason (refund
  windows and caps, terminal lifecycle, MCC checks of issue 6 plug in here). Sign-ons pass through it
  too (flow "network").
- `MerchantHooks`: the rest of merchant services (fees posted with their sale, lifecycle events,
  running balances); switch.merchant.rules.MerchantRules is both.
- `PanHasher`: the keyed hash (HMAC-SHA-256) of a PAN for ledger entries; the key never enters the core.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from switch.config import MerchantConfig, TerminalConfig
from switch.ledger.model import EntryDraft, EntryKind


class Router(Protocol):
    def acquirer_for(
        self, pan: str, currency: str | None = None, processing_code: str | None = None
    ) -> str | None: ...


class Directory(Protocol):
    def terminal(self, terminal_id: str) -> TerminalConfig | None: ...

    def merchant(self, merchant_id: str) -> MerchantConfig | None: ...


class RuleContext(msgspec.Struct, frozen=True):
    """What a rule may look at. `original` is set for voids, refunds, completions and reversals."""

    flow: str
    terminal: TerminalConfig
    merchant: MerchantConfig
    amount_minor: int
    currency: str
    processing_code: str
    now_ms: int
    original_rrn: str = ""
    original_amount_minor: int = 0
    original_at_ms: int = 0
    refunded_minor: int = 0
    mcc: str = ""  # field 18 as the terminal sent it (issue 6: must match the merchant's registered MCC)
    pan_hash: str = ""  # keyed hash of the PAN (card-level rules); never the PAN
    #: Leading PAN digits (at most 11, never more than len(PAN) - 4): the card type for pricing.
    pan_prefix: str = ""
    #: Idempotency key of the outcome entry this request will post (refund reservations key on it).
    reserve_key: str = ""
    #: "" while the original is open; "void" / "reversal" once it was closed by one.
    original_closed_by: str = ""


class RuleDecline(msgspec.Struct, frozen=True):
    """A rule's refusal: the response code and a reason for the operator log (no card data)."""

    code: str
    reason: str


class Rules(Protocol):
    def check(self, ctx: RuleContext) -> RuleDecline | None: ...


class MerchantHooks(Protocol):
    """What merchant services (issue 6, switch.merchant.rules.MerchantRules) add to the rules step: fee
    entries posted WITH the outcome they price, lifecycle events, and running totals. A rules object
    that has all of these methods gets them called; otherwise `NoMerchantHooks` stands in."""

    def fee_drafts(
        self,
        *,
        sale_rrn: str,
        merchant_id: str,
        terminal_id: str,
        pan_prefix: str,
        amount_minor: int,
        currency: str,
        at_ms: int,
    ) -> tuple[EntryDraft, ...]: ...

    def fee_refund_drafts(
        self,
        *,
        refund_rrn: str,
        fee_entry: EntryDraft | None,
        original_amount_minor: int,
        refunded_before_minor: int,
        refund_minor: int,
        at_ms: int,
        returned_before_minor: int | None = None,
    ) -> tuple[EntryDraft, ...]: ...

    def fee_reversal_drafts(
        self,
        *,
        reversed_kind: EntryKind,
        fee_rrn: str,
        merchant_id: str,
        terminal_id: str,
        amount_minor: int,
        currency: str,
        at_ms: int,
        reason: str,
    ) -> tuple[EntryDraft, ...]: ...

    def sign_on(self, terminal_id: str, now_ms: int) -> object | None: ...

    def approved(self, terminal_id: str, flow: str, now_ms: int) -> object | None: ...

    def tick(self, now_ms: int) -> Sequence[object]: ...

    def observe(self, committed: Iterable[EntryDraft]) -> None: ...

    def release(self, reserve_key: str) -> None: ...


#: The methods that make a rules object a MerchantHooks.
MERCHANT_HOOKS = (
    "fee_drafts",
    "fee_refund_drafts",
    "fee_reversal_drafts",
    "sign_on",
    "approved",
    "tick",
    "observe",
    "release",
)


class NoMerchantHooks:
    """No merchant services: no fees, no lifecycle, nothing to observe."""

    def fee_drafts(self, **kw: object) -> tuple[EntryDraft, ...]:
        return ()

    def fee_refund_drafts(self, **kw: object) -> tuple[EntryDraft, ...]:
        return ()

    def fee_reversal_drafts(self, **kw: object) -> tuple[EntryDraft, ...]:
        return ()

    def sign_on(self, terminal_id: str, now_ms: int) -> object | None:
        return None

    def approved(self, terminal_id: str, flow: str, now_ms: int) -> object | None:
        return None

    def tick(self, now_ms: int) -> Sequence[object]:
        return ()

    def observe(self, committed: Iterable[EntryDraft]) -> None:
        return None

    def release(self, reserve_key: str) -> None:
        return None


def merchant_hooks(rules: object) -> MerchantHooks:
    """`rules` itself when it has every hook, else the no-op stand-in."""
    if all(callable(getattr(rules, name, None)) for name in MERCHANT_HOOKS):
        return rules  # type: ignore[return-value]
    return NoMerchantHooks()  # type: ignore[return-value]


class PanHasher(Protocol):
    def __call__(self, pan: str) -> str: ...


class NoRules:
    """The default rules step: accepts everything validation accepted."""

    def check(self, ctx: RuleContext) -> RuleDecline | None:
        return None


class ConfigDirectory:
    """Terminals and merchants from switch.toml (SwitchConfig.terminals / .merchants)."""

    def __init__(self, terminals: Iterable[TerminalConfig], merchants: Iterable[MerchantConfig]) -> None:
        self._terminals = {t.id: t for t in terminals}
        self._merchants = {m.id: m for m in merchants}

    def terminal(self, terminal_id: str) -> TerminalConfig | None:
        return self._terminals.get(terminal_id)

    def merchant(self, merchant_id: str) -> MerchantConfig | None:
        return self._merchants.get(merchant_id)


class HmacPanHasher:
    """HMAC-SHA-256 of the PAN under a key from LedgerConfig.pan_hash_key_*; repr never shows the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("PAN hash key must be at least 16 bytes")
        self._key = key

    def __call__(self, pan: str) -> str:
        return hmac.digest(self._key, pan.encode("ascii"), "sha256").hex()  # by name: OpenSSL's fast path

    def __repr__(self) -> str:
        return "HmacPanHasher(<key hidden>)"


class PrefixRouter:
    """A tiny longest-prefix table for tests and examples; production uses switch.routing.bins.BinTable."""

    def __init__(self, routes: dict[str, str], default: str | None = None) -> None:
        self._routes = routes
        self._lengths = sorted({len(p) for p in routes}, reverse=True)
        self._default = default

    def acquirer_for(
        self, pan: str, currency: str | None = None, processing_code: str | None = None
    ) -> str | None:
        for n in self._lengths:
            hit = self._routes.get(pan[:n])
            if hit is not None:
                return hit
        return self._default
