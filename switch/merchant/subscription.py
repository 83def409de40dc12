"""Terminal subscriptions: paid-until, grace, renewal periods and the refund rule for renewals.

- A renewal pays one period (Contract.subscription_period_days). If the terminal is still within its
  paid period or grace, the new period continues from paid-until (no gap, no double charge for days
  already paid); once past grace it starts at the renewal moment (lapsed days are not billed).
- A renewal is refunded in full (SUBSCRIPTION_REFUND) when it FAILED (the fee was posted but the
  registry could not record the new period) or when the merchant cancels it within
  Contract.subscription_refund_window_days of paying (the last millisecond of the window included).
  Only the latest applied renewal of a terminal can be cancelled (periods never overlap), and
  cancelling moves paid-until back to the start of that period.
"""

from __future__ import annotations

import msgspec

from switch.merchant.lifecycle import grace_end_ms
from switch.merchant.model import DAY_MS, Contract, Renewal, Terminal


class RenewalRefused(ValueError):
    """A renewal or cancellation the rules refuse; the message says why (shown to operators)."""


class RenewalPlan(msgspec.Struct, frozen=True):
    terminal_id: str
    amount_minor: int
    currency: str
    period_from_ms: int
    period_to_ms: int


def plan_renewal(t: Terminal, contract: Contract, now_ms: int) -> RenewalPlan:
    if t.state in ("deactivated", "returned"):
        raise RenewalRefused(f"terminal {t.id} is {t.state}: renewal refused")
    if contract.subscription_fee_minor <= 0:
        raise RenewalRefused(f"contract {contract.id} has no subscription fee: nothing to renew")
    within = now_ms <= grace_end_ms(t.paid_until_ms, contract.subscription_grace_days)
    start = max(t.paid_until_ms, 0) if within and t.paid_until_ms > 0 else now_ms
    return RenewalPlan(
        terminal_id=t.id,
        amount_minor=contract.subscription_fee_minor,
        currency=contract.currency,
        period_from_ms=start,
        period_to_ms=start + contract.subscription_period_days * DAY_MS,
    )


def refund_window_end_ms(renewal: Renewal, contract: Contract) -> int:
    return renewal.paid_at_ms + contract.subscription_refund_window_days * DAY_MS


def check_cancel(renewal: Renewal, latest: Renewal | None, contract: Contract, now_ms: int) -> None:
    """Raise RenewalRefused unless `renewal` may be cancelled (and refunded) at `now_ms`."""
    if renewal.status != "applied":
        raise RenewalRefused(f"renewal {renewal.rrn} is {renewal.status}: nothing to cancel")
    if latest is None or latest.rrn != renewal.rrn:
        raise RenewalRefused(
            f"renewal {renewal.rrn} is not the terminal's latest: cancel the later one first"
        )
    end = refund_window_end_ms(renewal, contract)
    if now_ms > end:
        raise RenewalRefused(
            f"renewal {renewal.rrn} paid at {renewal.paid_at_ms} ms is past its refund window "
            f"({contract.subscription_refund_window_days} days, ended {end} ms): not refundable"
        )
