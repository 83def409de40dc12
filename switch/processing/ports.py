"""What the core needs from outside, as small Protocols, with config-backed defaults.

- `Router`: which acquirer takes a card (switch.routing.bins.BinTable satisfies it as is).
- `Directory`: which terminals and merchants exist (config today; issue 6 backs it with the registry).
- `Rules`: a step between validation and routing that may decline with a code and a reason (refund
  windows and caps, terminal lifecycle, MCC checks of issue 6 plug in here).
- `PanHasher`: the keyed hash (HMAC-SHA-256) of a PAN for ledger entries; the key never enters the core.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Protocol

import msgspec

from switch.config import MerchantConfig, TerminalConfig


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


class RuleDecline(msgspec.Struct, frozen=True):
    """A rule's refusal: the response code and a reason for the operator log (no card data)."""

    code: str
    reason: str


class Rules(Protocol):
    def check(self, ctx: RuleContext) -> RuleDecline | None: ...


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
        return hmac.digest(self._key, pan.encode("ascii"), hashlib.sha256).hex()

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
