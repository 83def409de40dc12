"""The deposit rule: a deposit charged at registration is refunded when the activation condition
holds, and kept once it no longer can.

Condition (all from the contract): the terminal was activated no later than `deposit_activation_days`
after registration, AND its net sales (approved sales minus voids, reversals and refunds; the caller
folds them from the ledger) dated no later than `deposit_volume_days` after registration reach
`deposit_volume_minor`. Both deadlines include their last millisecond. Evaluation outcomes:
- "refund": the condition holds (as soon as it does: no need to wait for the deadlines);
- "keep": it can no longer hold (not activated by the activation deadline, or the volume deadline
  passed short of the volume);
- "pending": neither yet.
The evaluation (inputs, result, reason) is returned as a Struct, shown by the CLI and API and stored as
the memo of the ledger entry that carries the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import msgspec

from switch.merchant.model import DAY_MS, Contract, Terminal


class DepositEvaluation(msgspec.Struct, frozen=True, kw_only=True):
    terminal_id: str
    deposit_minor: int
    currency: str
    registered_at_ms: int
    activated_at_ms: int | None
    activation_deadline_ms: int
    volume_deadline_ms: int
    processed_minor: int
    required_minor: int
    evaluated_at_ms: int
    result: Literal["refund", "keep", "pending"]
    reason: str


def deadlines(t: Terminal, contract: Contract) -> tuple[int, int]:
    """(activation deadline, volume deadline): the last millisecond each part may be met."""
    return (
        t.registered_at_ms + contract.deposit_activation_days * DAY_MS,
        t.registered_at_ms + contract.deposit_volume_days * DAY_MS,
    )


def evaluate(t: Terminal, contract: Contract, processed_minor: int, now_ms: int) -> DepositEvaluation:
    """Evaluate the rule. `processed_minor`: the terminal's net sales dated within
    [registered_at_ms, volume deadline] (the caller bounds the query by `deadlines`)."""
    act_deadline, vol_deadline = deadlines(t, contract)
    need = contract.deposit_volume_minor
    activated_in_time = t.activated_at_ms is not None and t.activated_at_ms <= act_deadline
    volume_met = processed_minor >= need
    if activated_in_time and volume_met:
        result, reason = (
            "refund",
            (
                f"activated at {t.activated_at_ms} ms (deadline {act_deadline} ms) and "
                f"processed {processed_minor} >= {need} by {vol_deadline} ms"
            ),
        )
    elif not activated_in_time and (t.activated_at_ms is not None or now_ms > act_deadline):
        when = "never" if t.activated_at_ms is None else f"at {t.activated_at_ms} ms"
        result, reason = "keep", f"not activated by the deadline {act_deadline} ms (activated {when})"
    elif not volume_met and now_ms > vol_deadline:
        result, reason = "keep", f"processed {processed_minor} < {need} by the deadline {vol_deadline} ms"
    else:
        missing = []
        if not activated_in_time:
            missing.append(f"activation by {act_deadline} ms")
        if not volume_met:
            missing.append(f"{need - processed_minor} more processed by {vol_deadline} ms")
        result, reason = "pending", "waiting for " + " and ".join(missing)
    return DepositEvaluation(
        terminal_id=t.id,
        deposit_minor=contract.deposit_minor,
        currency=contract.currency,
        registered_at_ms=t.registered_at_ms,
        activated_at_ms=t.activated_at_ms,
        activation_deadline_ms=act_deadline,
        volume_deadline_ms=vol_deadline,
        processed_minor=processed_minor,
        required_minor=need,
        evaluated_at_ms=now_ms,
        result=result,
        reason=reason,
    )


def may_decide(t: Terminal, contract: Contract | None, now_ms: int) -> bool:
    """Whether evaluating `t`'s deposit at `now_ms` can decide it, so a scheduled pass should fold the
    ledger for it. False for decided or absent deposits, and for a terminal not activated yet whose
    activation deadline has not passed: it is pending whatever the ledger says (no read needed)."""
    if not t.deposit_rrn or t.deposit_outcome or contract is None:
        return False
    act_deadline, _ = deadlines(t, contract)
    return not (t.activated_at_ms is None and now_ms <= act_deadline)


#: Position of a scheduled pass in the undecided deposits: (registered_at_ms, terminal id).
Cursor = tuple[int, str]


def due(
    terminals: Iterable[Terminal],
    contract_of: Callable[[str], Contract | None],
    now_ms: int,
    limit: int,
    after: Cursor | None = None,
) -> tuple[list[Terminal], Cursor | None]:
    """The next at most `limit` terminals a scheduled pass evaluates, oldest registration first,
    continuing after `after` and wrapping around, so terminals that stay undecided for weeks (activated,
    volume not reached yet) cannot starve newer ones. Returns them and the cursor for the next pass."""
    if limit <= 0:
        raise ValueError("limit must be > 0")
    ready = sorted(
        (t for t in terminals if may_decide(t, contract_of(t.merchant_id), now_ms)),
        key=lambda t: (t.registered_at_ms, t.id),
    )
    if after is not None:
        split = next((i for i, t in enumerate(ready) if (t.registered_at_ms, t.id) > after), len(ready))
        ready = ready[split:] + ready[:split]
    batch = ready[:limit]
    return batch, ((batch[-1].registered_at_ms, batch[-1].id) if batch else None)
