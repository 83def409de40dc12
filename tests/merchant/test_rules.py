"""Merchant rules at their edges: lifecycle, grace, MCC, refund window and caps, balance, fees, deposit."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.config import MerchantServicesConfig
from switch.ledger.model import EntryKind, check_balanced
from switch.merchant import codes, deposit, fees, lifecycle, subscription
from switch.merchant.lifecycle import LifecycleError
from switch.merchant.model import DAY_MS, Contract, Merchant, Rate, Renewal, Terminal, TerminalState
from switch.merchant.refunds import OriginalFacts
from switch.merchant.rules import MerchantRequest, MerchantRules

T0 = 1_700_000_000_000 - (1_700_000_000_000 % DAY_MS)  # midnight UTC
VISA = "411111"


def contract(**kw: object) -> Contract:
    base = dict(
        id="c1",
        merchant_id="M1",
        currency="978",
        rates={"default": Rate(bps=150, fixed_minor=10), "amex": Rate(bps=300)},
        subscription_fee_minor=1_500,
        subscription_grace_days=7,
        refund_window_days=180,
    )
    base.update(kw)
    return Contract(**base)  # type: ignore[arg-type]


def rules(terminal: Terminal | None = None, **kw: object) -> MerchantRules:
    t = terminal or Terminal(
        id="T1",
        merchant_id="M1",
        state=TerminalState.ACTIVE,
        registered_at_ms=T0,
        signed_on_at_ms=T0,
        activated_at_ms=T0,
        live_at_ms=T0,
        paid_until_ms=T0 + 30 * DAY_MS,
    )
    r = MerchantRules(
        MerchantServicesConfig(),
        [Merchant(id="M1", name="Shop", mcc="5411", currency="978", contract_id="c1")],
        [contract(**kw)],
        [t],
    )
    r.recover({("M1", "978"): 1_000_000}, {})
    return r


def req(flow: str = "purchase", now_ms: int = T0 + DAY_MS, **kw: object) -> MerchantRequest:
    return MerchantRequest(
        flow=flow, terminal_id="T1", merchant_id="M1", now_ms=now_ms, amount_minor=1000, currency="978", **kw
    )  # type: ignore[arg-type]


def original(at_ms: int = T0, amount: int = 10_000, **kw: object) -> OriginalFacts:
    base: dict[str, object] = dict(
        rrn="000000000001", merchant_id="M1", currency="978", amount_minor=amount, at_ms=at_ms
    )
    base.update(kw)
    return OriginalFacts(**base)  # type: ignore[arg-type]


def test_response_codes_match_processing_table() -> None:
    from switch.processing import codes as pcodes

    assert codes.NOT_PERMITTED_TERMINAL == pcodes.NOT_PERMITTED_TERMINAL
    assert codes.INVALID_TRANSACTION == pcodes.INVALID_TRANSACTION
    assert codes.INVALID_AMOUNT == pcodes.INVALID_AMOUNT
    assert codes.UNKNOWN_ORIGINAL == pcodes.UNKNOWN_ORIGINAL
    assert codes.INVALID_MERCHANT == pcodes.INVALID_MERCHANT


# --- lifecycle -------------------------------------------------------------------------------------
def test_registered_terminal_may_only_sign_on_then_one_test_transaction_activates_it() -> None:
    t = Terminal(id="T1", merchant_id="M1", registered_at_ms=T0, paid_until_ms=T0 + 30 * DAY_MS)
    r = rules(t)
    d = r.check_request(req("purchase"))
    assert d is not None and d.code == "58" and "not signed on" in d.reason
    assert r.check_request(req("network")) is None
    assert r.sign_on("T1", T0 + 5) is not None
    refund = r.check_request(req("refund", original=original()))
    assert refund is not None and refund.code == "58" and "not activated" in refund.reason
    assert r.check_request(req("purchase")) is None
    activated = r.approved("T1", "purchase", T0 + 10)
    assert activated is not None and activated.state is TerminalState.ACTIVATED
    assert activated.activated_at_ms == T0 + 10
    live = r.approved("T1", "purchase", T0 + 20)
    assert live is not None and live.state is TerminalState.ACTIVE and live.live_at_ms == T0 + 20


def test_reversal_and_settlement_never_refused_by_lifecycle_but_deactivated_refuses_all_else() -> None:
    t = Terminal(id="T1", merchant_id="M1", registered_at_ms=T0, paid_until_ms=0)
    r = rules(t)
    assert r.check_request(req("reversal")) is None
    assert r.check_request(req("settlement")) is None
    gone = lifecycle.transition(t, TerminalState.DEACTIVATED, T0)
    r.put_terminal(gone)
    assert r.check_request(req("network")).code == "58"  # type: ignore[union-attr]
    assert r.check_request(req("purchase")).code == "58"  # type: ignore[union-attr]


def test_invalid_transitions_are_refused() -> None:
    t = Terminal(id="T1", merchant_id="M1")
    with pytest.raises(LifecycleError, match="registered -> active"):
        lifecycle.transition(t, TerminalState.ACTIVE, T0)
    returned = lifecycle.transition(
        lifecycle.transition(t, TerminalState.DEACTIVATED, T0), TerminalState.RETURNED, T0
    )
    for state in TerminalState:
        with pytest.raises(LifecycleError):
            lifecycle.transition(returned, state, T0)


def test_grace_period_last_moment_allowed_next_millisecond_declined_and_renewal_restores() -> None:
    r = rules()
    paid_until = T0 + 30 * DAY_MS
    last = paid_until + 7 * DAY_MS
    assert r.check_request(req(now_ms=last)) is None
    d = r.check_request(req(now_ms=last + 1))
    assert d is not None and d.code == "58" and "subscription lapsed" in d.reason
    assert d.flag == "subscription_lapsed"
    suspended = r.tick(last + 1)
    assert [t.state for t in suspended] == [TerminalState.SUSPENDED]
    assert r.tick(last + 2) == []
    plan = subscription.plan_renewal(r.terminals["T1"], r.contracts["c1"], last + 1)
    assert plan.period_from_ms == last + 1  # lapsed past grace: the new period starts now
    renewed = lifecycle.on_renewed(r.terminals["T1"], plan.period_to_ms, last + 1)
    r.put_terminal(renewed)
    assert renewed.state is TerminalState.ACTIVE
    assert r.check_request(req(now_ms=last + 2)) is None


def test_renewal_within_grace_continues_from_paid_until() -> None:
    t = Terminal(id="T1", merchant_id="M1", paid_until_ms=T0)
    plan = subscription.plan_renewal(t, contract(), T0 + 3 * DAY_MS)
    assert (plan.period_from_ms, plan.period_to_ms) == (T0, T0 + 30 * DAY_MS)


def test_cancel_renewal_last_moment_of_refund_window_and_after() -> None:
    c = contract(subscription_refund_window_days=14)
    ren = Renewal(
        rrn="R1",
        terminal_id="T1",
        merchant_id="M1",
        amount_minor=1500,
        currency="978",
        paid_at_ms=T0,
        period_from_ms=T0,
        period_to_ms=T0 + 30 * DAY_MS,
    )
    subscription.check_cancel(ren, ren, c, T0 + 14 * DAY_MS)
    with pytest.raises(subscription.RenewalRefused, match="past its refund window"):
        subscription.check_cancel(ren, ren, c, T0 + 14 * DAY_MS + 1)
    later = msgspec.structs.replace(ren, rrn="R2")
    with pytest.raises(subscription.RenewalRefused, match="latest"):
        subscription.check_cancel(ren, later, c, T0)


# --- MCC -------------------------------------------------------------------------------------------
def test_mcc_mismatch_is_declined_and_flagged_matching_or_absent_passes() -> None:
    r = rules()
    d = r.check_request(req(mcc="7995"))
    assert d is not None and d.code == "58" and d.flag == "mcc_mismatch" and "5411" in d.reason
    assert r.check_request(req(mcc="5411")) is None
    assert r.check_request(req()) is None
    strict = MerchantRules(
        MerchantServicesConfig(require_mcc=True),
        r.merchants.values(),
        r.contracts.values(),
        r.terminals.values(),
    )
    assert strict.check_request(req()).flag == "mcc_missing"  # type: ignore[union-attr]


# --- refunds ---------------------------------------------------------------------------------------
def test_refund_window_last_day_allowed_day_after_declined() -> None:
    r = rules()
    r.put_terminal(msgspec.structs.replace(r.terminals["T1"], paid_until_ms=T0 + 400 * DAY_MS))
    late_in_day = T0 + 23 * 3_600_000  # original at 23:00; the window counts calendar days
    last_day = T0 + 180 * DAY_MS + 1  # 00:00:00.001 on day +180
    end_of_last_day = T0 + 181 * DAY_MS - 1
    assert r.check_request(req("refund", now_ms=end_of_last_day, original=original(late_in_day))) is None
    assert r.check_request(req("refund", now_ms=last_day, original=original(late_in_day))) is None
    d = r.check_request(req("refund", now_ms=T0 + 181 * DAY_MS, original=original(late_in_day)))
    assert d is not None and d.code == "12" and "refund window" in d.reason


def test_single_refund_cap_exact_ok_one_over_declined() -> None:
    r = rules(single_refund_cap_minor=1000)
    assert r.check_request(req("refund", original=original())) is None
    over = msgspec.structs.replace(req("refund", original=original()), amount_minor=1001)
    d = r.check_request(over)
    assert d is not None and d.code == "61" and d.flag == "refund_cap"


def test_daily_refund_cap_counts_committed_and_in_flight_refunds() -> None:
    r = rules(daily_refund_cap_minor=2500)
    ok = r.check_request(req("refund", original=original(), reserve_key="k1"))
    assert ok is None
    # 1000 in flight + 1000 more + 500 = exactly the cap.
    assert r.check_request(req("refund", original=original(), reserve_key="k2")) is None
    exact = msgspec.structs.replace(req("refund", original=original()), amount_minor=500)
    assert r.check_request(exact) is None
    over = msgspec.structs.replace(exact, amount_minor=501)
    assert r.check_request(over).code == "61"  # type: ignore[union-attr]
    r.release("k2")
    assert r.check_request(over) is None
    # The next business day starts from zero.
    assert (
        r.check_request(req("refund", now_ms=T0 + 2 * DAY_MS, original=original(), reserve_key="k3")) is None
    )


def test_refund_must_be_covered_by_unsettled_balance_else_51() -> None:
    r = rules()
    r.recover({("M1", "978"): 1000}, {})
    assert r.check_request(req("refund", original=original())) is None
    r.recover({("M1", "978"): 999}, {})
    d = r.check_request(req("refund", original=original()))
    assert d is not None and d.code == "51"


@pytest.mark.parametrize(
    ("facts", "code"),
    [
        (dict(approved=False), "12"),
        (dict(closed_by="void"), "12"),
        (dict(closed_by="reversal"), "12"),
        (dict(refunded_minor=9001), "13"),
        (dict(currency="840"), "12"),
        (dict(merchant_id="M2"), "12"),
    ],
)
def test_refund_original_state_and_cumulative(facts: dict[str, object], code: str) -> None:
    d = rules().check_request(req("refund", original=original(**facts)))
    assert d is not None and d.code == code
    assert rules().check_request(req("refund", original=original(refunded_minor=9000))) is None


def test_unknown_original_is_25() -> None:
    assert rules().check_request(req("refund")).code == "25"  # type: ignore[union-attr]


# --- fees ------------------------------------------------------------------------------------------
def test_fee_per_card_type_half_up_and_bin_class_override() -> None:
    c = contract(
        bin_classes={"37828200": "corporate"},
        rates={"default": Rate(bps=150, fixed_minor=10), "amex": Rate(bps=300), "corporate": Rate(bps=50)},
    )
    assert fees.fee_terms(c, VISA, 1000).fee_minor == 15 + 10
    assert fees.fee_terms(c, VISA, 1033).fee_minor == 15 + 10  # 15.495 -> 15
    assert fees.fee_terms(c, VISA, 1034).fee_minor == 16 + 10  # 15.51 -> 16
    assert fees.fee_terms(c, "371449", 1000).card_type == "amex"
    assert fees.fee_terms(c, "37828200", 1000).card_type == "corporate"
    assert fees.brand("5555555") == "mastercard" and fees.brand("2223000") == "mastercard"
    assert fees.brand("6200000") == "unionpay" and fees.brand("9999999") == "other"


def test_fee_refund_pro_rata_cumulative_floor() -> None:
    # fee 25 on 1000: refunds of 333, 333, 334 return 8, 8, 9 = 25 exactly.
    backs = []
    before = 0
    for part in (333, 333, 334):
        backs.append(fees.fee_refund_minor(25, 1000, before, part))
        before += part
    assert backs == [8, 8, 9] and sum(backs) == 25
    with pytest.raises(ValueError, match="exceed"):
        fees.fee_refund_minor(25, 1000, 999, 2)


@given(st.integers(1, 10**9), st.integers(0, 10**6), st.lists(st.integers(1, 10**9), min_size=1, max_size=12))
def test_fee_refunds_never_exceed_fee_and_full_refund_returns_all(
    amount: int, fee: int, parts: list[int]
) -> None:
    before, total = 0, 0
    for p in parts:
        p = min(p, amount - before)
        if p <= 0:
            break
        total += fees.fee_refund_minor(fee, amount, before, p)
        before += p
        assert 0 <= total <= fee
    if before == amount:
        assert total == fee


def test_fee_drafts_and_fee_refund_drafts_balance_and_link() -> None:
    r = rules()
    (fee_d,) = r.fee_drafts(
        sale_rrn="000000000001",
        merchant_id="M1",
        terminal_id="T1",
        pan_prefix=VISA,
        amount_minor=1000,
        currency="978",
        at_ms=T0,
    )
    check_balanced(fee_d.postings)
    assert fee_d.kind is EntryKind.FEE and fee_d.amount_minor == 25 and fee_d.rrn == "000000000001/fee"
    (back,) = r.fee_refund_drafts(
        refund_rrn="000000000002",
        fee_entry=fee_d,
        original_amount_minor=1000,
        refunded_before_minor=0,
        refund_minor=500,
        at_ms=T0,
    )
    check_balanced(back.postings)
    assert back.kind is EntryKind.FEE_REFUND and back.amount_minor == 12
    assert back.original_rrn == "000000000001/fee"
    no_fixed = rules(refund_fixed_fee=False)
    (fee2,) = no_fixed.fee_drafts(
        sale_rrn="1",
        merchant_id="M1",
        terminal_id="T1",
        pan_prefix=VISA,
        amount_minor=1000,
        currency="978",
        at_ms=T0,
    )
    (back2,) = no_fixed.fee_refund_drafts(
        refund_rrn="2",
        fee_entry=fee2,
        original_amount_minor=1000,
        refunded_before_minor=0,
        refund_minor=1000,
        at_ms=T0,
    )
    assert back2.amount_minor == 15  # the fixed 10 stays with the switch


def test_observe_moves_unsettled_balance_and_daily_refunds() -> None:
    r = rules()
    r.recover({}, {})
    (fee_d,) = r.fee_drafts(
        sale_rrn="1",
        merchant_id="M1",
        terminal_id="T1",
        pan_prefix=VISA,
        amount_minor=1000,
        currency="978",
        at_ms=T0,
    )
    r.observe([fee_d])
    assert r.unsettled[("M1", "978")] == -25


# --- deposit ---------------------------------------------------------------------------------------
DEP = dict(
    deposit_minor=5000, deposit_activation_days=10, deposit_volume_minor=100_000, deposit_volume_days=30
)


def test_deposit_condition_just_met_and_just_missed() -> None:
    c = contract(**DEP)
    t = Terminal(id="T1", merchant_id="M1", registered_at_ms=T0, activated_at_ms=T0 + 10 * DAY_MS)
    met = deposit.evaluate(t, c, 100_000, T0 + 11 * DAY_MS)
    assert met.result == "refund"
    assert deposit.evaluate(t, c, 99_999, T0 + 30 * DAY_MS).result == "pending"
    missed_volume = deposit.evaluate(t, c, 99_999, T0 + 30 * DAY_MS + 1)
    assert missed_volume.result == "keep" and "99999 < 100000" in missed_volume.reason
    late = msgspec.structs.replace(t, activated_at_ms=T0 + 10 * DAY_MS + 1)
    assert deposit.evaluate(late, c, 100_000, T0 + 11 * DAY_MS).result == "keep"
    never = msgspec.structs.replace(t, activated_at_ms=None)
    assert deposit.evaluate(never, c, 0, T0 + 10 * DAY_MS).result == "pending"
    assert deposit.evaluate(never, c, 0, T0 + 10 * DAY_MS + 1).result == "keep"


def test_deposit_due_rotates_so_long_pending_terminals_cannot_starve_newer_ones() -> None:
    from switch.merchant import deposit
    from switch.merchant.model import Contract, Rate, Terminal

    c = Contract(id="c", merchant_id="M", currency="978", rates={"default": Rate()}, deposit_minor=100)
    ts = [
        Terminal(id=f"T{i}", merchant_id="M", registered_at_ms=i, paid_until_ms=0, deposit_rrn=f"d{i}",
                 activated_at_ms=i)  # activated: may be decided any time, so always due
        for i in range(3)
    ]  # fmt: skip
    undecided_not_activated = Terminal(id="T9", merchant_id="M", registered_at_ms=0, paid_until_ms=0,
                                       deposit_rrn="d9")  # fmt: skip
    seen = []
    cursor = None
    for _ in range(4):
        batch, cursor = deposit.due([*ts, undecided_not_activated], lambda m: c, 5, 2, cursor)
        seen.append([t.id for t in batch])
    assert seen == [["T0", "T1"], ["T2", "T0"], ["T1", "T2"], ["T0", "T1"]]
