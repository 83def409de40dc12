"""The processing core's Directory backed by the registry (issue 6) instead of switch.toml.

The core asks "which terminal is this, which merchant owns it" on every request; it reads the registry
snapshot MerchantRules holds (kept current by MerchantService.on_change), so a terminal registered
through the admin API is known at once and a deactivated one is still known (its requests get 58 and a
reason from the rules step rather than 03 "unknown"). The config shapes the core expects are built
once per registry record and cached by identity: a request costs two dict lookups.
"""

from __future__ import annotations

from switch.config import MerchantConfig, TerminalConfig
from switch.merchant.model import Merchant, Terminal
from switch.merchant.rules import MerchantRules


class RegistryDirectory:
    def __init__(self, rules: MerchantRules) -> None:
        self.rules = rules
        self._terminals: dict[str, tuple[Terminal, TerminalConfig]] = {}
        self._merchants: dict[str, tuple[Merchant, MerchantConfig]] = {}

    def terminal(self, terminal_id: str) -> TerminalConfig | None:
        t = self.rules.terminals.get(terminal_id)
        if t is None:
            return None
        hit = self._terminals.get(terminal_id)
        if hit is not None and hit[0] is t:
            return hit[1]
        cfg = TerminalConfig(id=t.id, merchant_id=t.merchant_id, profile=t.profile)
        self._terminals[terminal_id] = (t, cfg)
        return cfg

    def merchant(self, merchant_id: str) -> MerchantConfig | None:
        m = self.rules.merchants.get(merchant_id)
        if m is None:
            return None
        hit = self._merchants.get(merchant_id)
        if hit is not None and hit[0] is m:
            return hit[1]
        cfg = MerchantConfig(id=m.id, name=m.name, mcc=m.mcc, currency=m.currency)
        self._merchants[merchant_id] = (m, cfg)
        return cfg
