"""The running totals MerchantRules needs at start-up, read from the ledger (MerchantRules.recover).

- Unsettled balance per (merchant, currency): the credit balance of `merchant:<m>:payable` after every
  entry (sales and fee returns raise it; refunds, fees, deposits, subscriptions and cutover settlements
  lower it). Read from the ledger's balance history: one query, no entry decoded.
- Refunds per (merchant, currency, business day): folded from the entries the server already loads
  for recovery (the last recovery window, which covers today), the same way `MerchantRules.observe`
  counts them live.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from switch.ledger.model import EntryDraft, EntryKind
from switch.merchant.days import business_day

_PREFIX, _SUFFIX = "merchant:", ":payable"


def unsettled_balances(backend: Any) -> dict[tuple[str, str], int]:
    """(merchant, currency) -> what the switch owes the merchant now. `backend`: a ledger backend
    (switch.ledger.backend, `latest_balances`); balances are debits minus credits, so owed = -balance."""
    out: dict[tuple[str, str], int] = {}
    for row in backend.latest_balances():
        account = row.account
        if account.startswith(_PREFIX) and account.endswith(_SUFFIX):
            out[(account[len(_PREFIX) : -len(_SUFFIX)], row.currency)] = -int(row.balance_minor)
    return out


def refunds_by_day(
    drafts: Iterable[EntryDraft], utc_offset_minutes: int = 0
) -> dict[tuple[str, str, int], int]:
    """(merchant, currency, business day) -> refunds committed that day."""
    out: dict[tuple[str, str, int], int] = {}
    for d in drafts:
        if d.kind is EntryKind.REFUND and d.merchant_id:
            key = (d.merchant_id, d.currency, business_day(d.at_ms, utc_offset_minutes))
            out[key] = out.get(key, 0) + d.amount_minor
    return out
