"""Terminal lifecycle: a state machine in one module, no I/O (h11's habit), the clock passed in.

```
registered --(sign-on, then one approved test transaction)--> activated --(first live approval)--> active
     |                                                            |  ^                                |  ^
     |                                        (lapsed past grace) v  | (renewal)    (lapsed past grace) v  |
     |                                                          suspended <---------------------------'  |
     '--(operator)--> deactivated --(device back)--> returned    (renewal: back to active/activated) ----'
```
- registered: only sign-on (0800) is allowed until the first sign-on; after it, one test transaction
  (a purchase or a balance inquiry); anything else is declined 58 with the reason. The first approved
  test transaction activates the terminal and records `activated_at_ms`.
- Reversals and settlement (0500) are never refused by the lifecycle of a known terminal: refusing a
  reversal would leave money moved that the terminal wants undone, and a suspended terminal must still
  be able to close its batch.
- Every transition goes through `transition`, which refuses anything not in `TRANSITIONS`.
"""

from __future__ import annotations

import msgspec

from switch.merchant import codes
from switch.merchant.model import DAY_MS, Terminal, TerminalState

S = TerminalState

TRANSITIONS: dict[TerminalState, frozenset[TerminalState]] = {
    S.REGISTERED: frozenset({S.ACTIVATED, S.DEACTIVATED}),
    S.ACTIVATED: frozenset({S.ACTIVE, S.SUSPENDED, S.DEACTIVATED}),
    S.ACTIVE: frozenset({S.SUSPENDED, S.DEACTIVATED}),
    S.SUSPENDED: frozenset({S.ACTIVE, S.ACTIVATED, S.DEACTIVATED}),
    S.DEACTIVATED: frozenset({S.RETURNED}),
    S.RETURNED: frozenset(),
}

#: Flows (switch.processing.request.Flow values) a signed-on, not yet activated terminal may send as
#: its test transaction.
TEST_FLOWS = frozenset({"purchase", "inquiry"})
#: Flows the lifecycle never refuses for a known terminal.
ALWAYS_ALLOWED_FLOWS = frozenset({"reversal", "settlement"})
#: Flows that are network management (sign-on, echo, key change).
NETWORK_FLOWS = frozenset({"network"})
#: States a lapsed subscription suspends (`on_clock`).
SUSPENDABLE = frozenset({S.ACTIVATED, S.ACTIVE})
#: Flows whose approval makes an activated terminal "active" (live use).
LIVE_FLOWS = frozenset({"purchase", "preauth", "completion", "refund", "void", "inquiry"})


class LifecycleError(ValueError):
    """A transition not in the table (e.g. returned -> active); the message names both states."""


class MerchantDecline(msgspec.Struct, frozen=True):
    """A merchant rule's refusal: ISO 8583 response code, operator-visible reason (no card data) and a
    flag for alerting (e.g. "mcc_mismatch")."""

    code: str
    reason: str
    flag: str = ""


def transition(t: Terminal, to: TerminalState, now_ms: int, reason: str = "") -> Terminal:
    """`t` moved to state `to` at `now_ms`, with the timestamp of that state recorded."""
    if to not in TRANSITIONS[t.state]:
        raise LifecycleError(f"terminal {t.id}: {t.state} -> {to} is not a valid transition")
    changes: dict[str, object] = {"state": to, "state_reason": reason or f"{t.state} -> {to}"}
    if to is S.ACTIVATED and t.activated_at_ms is None:
        changes["activated_at_ms"] = now_ms
    elif to is S.ACTIVE and t.live_at_ms is None:
        changes["live_at_ms"] = now_ms
    elif to is S.SUSPENDED:
        changes["suspended_at_ms"] = now_ms
    elif to is S.DEACTIVATED:
        changes["deactivated_at_ms"] = now_ms
    return msgspec.structs.replace(t, **changes)


def grace_end_ms(paid_until_ms: int, grace_days: int) -> int:
    """The last millisecond a terminal may still transact: paid-until plus the grace period."""
    return paid_until_ms + grace_days * DAY_MS


def lapsed(t: Terminal, grace_days: int, now_ms: int) -> bool:
    """True once `now_ms` is past paid-until + grace (the last moment of the grace period is still OK)."""
    return now_ms > grace_end_ms(t.paid_until_ms, grace_days)


def admit(t: Terminal, flow: str, now_ms: int, grace_days: int) -> MerchantDecline | None:
    """May terminal `t` send a `flow` request at `now_ms`? None = yes; else the 58 decline and why."""
    if t.state in (S.DEACTIVATED, S.RETURNED):
        return MerchantDecline(codes.NOT_PERMITTED_TERMINAL, f"terminal {t.id} is {t.state}")
    if flow in ALWAYS_ALLOWED_FLOWS or flow in NETWORK_FLOWS:
        return None
    if t.state is S.REGISTERED:
        if t.signed_on_at_ms is None:
            return MerchantDecline(
                codes.NOT_PERMITTED_TERMINAL,
                f"terminal {t.id} is registered but has not signed on: only sign-on "
                "is allowed until activation",
            )
        if flow not in TEST_FLOWS:
            return MerchantDecline(
                codes.NOT_PERMITTED_TERMINAL,
                f"terminal {t.id} is not activated: only sign-on and one test "
                f"transaction (purchase or balance inquiry) are allowed, not {flow}",
            )
    if lapsed(t, grace_days, now_ms):
        end = grace_end_ms(t.paid_until_ms, grace_days)
        return MerchantDecline(
            codes.NOT_PERMITTED_TERMINAL,
            f"terminal {t.id} subscription lapsed: paid until {t.paid_until_ms} ms, "
            f"grace of {grace_days} days ended {end} ms; renew to resume",
            flag="subscription_lapsed",
        )
    return None


def refuse_without_keys(t: Terminal | None) -> MerchantDecline | None:
    """The lifecycle's answer for a request from a terminal that has no working (MAC) key, before the
    MAC check: a registered terminal that never signed on may only sign on, so anything else is 58
    with the reason (not A0: its key is missing because it never signed on, not because the message
    was tampered with). None for everything else (unknown terminals, or ones that signed on before a
    restart and must sign on again: the server's A0 stands)."""
    if t is None or t.state is not S.REGISTERED or t.signed_on_at_ms is not None:
        return None
    return MerchantDecline(
        codes.NOT_PERMITTED_TERMINAL,
        f"terminal {t.id} is registered but has not signed on: only sign-on is allowed until activation",
    )


def on_sign_on(t: Terminal, now_ms: int) -> Terminal | None:
    """Record the first sign-on (None if nothing changes). Deactivated terminals are refused by
    `sign_on_allowed` before this is called."""
    if t.signed_on_at_ms is None:
        return msgspec.structs.replace(t, signed_on_at_ms=now_ms)
    return None


def sign_on_allowed(t: Terminal) -> MerchantDecline | None:
    if t.state in (S.DEACTIVATED, S.RETURNED):
        return MerchantDecline(codes.NOT_PERMITTED_TERMINAL, f"terminal {t.id} is {t.state}: sign-on refused")
    return None


def on_approved(t: Terminal, flow: str, now_ms: int) -> Terminal | None:
    """The state change an approved `flow` causes (None if none): the test transaction activates a
    signed-on registered terminal; the first live approval after that makes it active."""
    if t.state is S.REGISTERED and t.signed_on_at_ms is not None and flow in TEST_FLOWS:
        return transition(t, S.ACTIVATED, now_ms, f"activated by an approved test {flow}")
    if t.state is S.ACTIVATED and flow in LIVE_FLOWS:
        return transition(t, S.ACTIVE, now_ms, f"first live {flow} approved")
    return None


def on_clock(t: Terminal, now_ms: int, grace_days: int) -> Terminal | None:
    """Suspend an activated/active terminal whose subscription lapsed past grace (None if no change)."""
    if t.state in SUSPENDABLE and lapsed(t, grace_days, now_ms):
        return transition(
            t,
            S.SUSPENDED,
            now_ms,
            f"subscription lapsed: paid until {t.paid_until_ms} ms + {grace_days} days grace",
        )
    return None


def on_renewed(t: Terminal, paid_until_ms: int, now_ms: int) -> Terminal:
    """Paid-until moved; a suspended terminal is usable at once (back to active, or activated if it
    never went live)."""
    t = msgspec.structs.replace(t, paid_until_ms=paid_until_ms)
    if t.state is S.SUSPENDED:
        back = S.ACTIVE if t.live_at_ms is not None else S.ACTIVATED
        t = transition(t, back, now_ms, "subscription renewed")
    return t
