"""The processing core with merchant services (issue 6) plugged in: the real MerchantRules and the
registry directory behind the Driver. Fees ride in the same Post as the outcome they price, refunds
return them pro rata (exactly, even when refunds of one sale commit together), voids and reversals undo
them; MCC, lifecycle and refund rules act on live requests; lifecycle events come out as decisions."""

from __future__ import annotations

import msgspec

from switch.config import MerchantServicesConfig
from switch.ledger.model import EntryKind, accounts
from switch.merchant.directory import RegistryDirectory
from switch.merchant.model import DAY_MS, Contract, Merchant, Rate, Terminal, TerminalState
from switch.merchant.rules import MerchantRules
from switch.processing import Post, TerminalRequest, Tick
from switch.processing.harness import NOW_MS, Driver, fin

FAR_MS = NOW_MS + 365 * DAY_MS


def world(
    *, unsettled: int = 1_000_000, require_mcc: bool = False, t3_paid_until: int = FAR_MS, **driver: object
) -> tuple[Driver, MerchantRules]:
    cfg = MerchantServicesConfig(require_mcc=require_mcc)
    active = {"state": TerminalState.ACTIVE, "signed_on_at_ms": 1, "activated_at_ms": 1, "live_at_ms": 1}
    rules = MerchantRules(
        cfg,
        merchants=[
            Merchant(id="M1", name="Shop", mcc="5411", currency="978", contract_id="c1"),
            Merchant(id="M2", name="Bar", mcc="5813", currency="978", contract_id="c2"),
        ],
        contracts=[
            Contract(
                id="c1",
                merchant_id="M1",
                currency="978",
                rates={"default": Rate(bps=100), "visa": Rate(bps=150, fixed_minor=10)},
            ),
            Contract(id="c2", merchant_id="M2", currency="978", rates={"default": Rate(bps=100)}),
        ],
        terminals=[
            Terminal(id="T1", merchant_id="M1", paid_until_ms=FAR_MS, **active),  # type: ignore[arg-type]
            Terminal(id="T2", merchant_id="M1", paid_until_ms=FAR_MS),  # registered, never signed on
            Terminal(id="T3", merchant_id="M2", paid_until_ms=t3_paid_until, **active),  # type: ignore[arg-type]
        ],
    )
    rules.recover({("M1", "978"): unsettled, ("M2", "978"): unsettled}, {})
    return Driver(rules=rules, directory=RegistryDirectory(rules), **driver), rules  # type: ignore[arg-type]


def refund(rrn: str, amount: int, stan: int, **kw: str) -> dict[str, str]:
    return fin(pc="200000", amount=amount, stan=stan, **{"37": rrn}, **kw)


def of_kind(sw: Driver, kind: EntryKind) -> list:
    return [e for e in sw.ledger.entries if e.kind is kind]


def test_fee_is_in_the_same_post_as_the_sale_and_the_terminal_hears_after_both() -> None:
    sw, _ = world(auto_ledger=False)
    sw.request(fin(amount=10_000))
    assert sw.answer(sw.last_sent()) == []  # nothing until the post is durable
    (post,) = sw.pending_posts
    sale, fee = post.drafts
    assert (sale.kind, fee.kind) == (EntryKind.PURCHASE, EntryKind.FEE)
    assert fee.original_rrn == sale.rrn and fee.rrn == f"{sale.rrn}/fee"
    assert fee.amount_minor == 150 + 10  # visa: 1.50 % + 0.10
    sw.commit_pending()
    assert sw.replies[-1].fields["39"] == "00"
    assert sw.ledger.balances()[(accounts.FEE_INCOME, "978")] == -160


def test_refunds_return_the_fee_pro_rata_exactly_even_when_committed_together() -> None:
    sw, _ = world()
    rrn = sw.approve(fin(amount=10_000)).fields["37"]
    sw.auto_ledger = False
    for stan, amount in ((2, 3_333), (3, 3_333)):
        sw.request(refund(rrn, amount, stan))
        sw.answer(sw.last_sent())
    assert len(sw.pending_posts) == 2  # both approved, neither durable yet
    sw.commit_pending()
    sw.auto_ledger = True
    sw.request(refund(rrn, 3_334, 4))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    backs = [e.amount_minor for e in of_kind(sw, EntryKind.FEE_REFUND)]
    assert backs == [53, 53, 54] and sum(backs) == 160  # floor(160 * R / 10,000) cumulatively
    assert all(e.original_rrn == f"{rrn}/fee" for e in of_kind(sw, EntryKind.FEE_REFUND))
    assert (accounts.FEE_INCOME, "978") not in sw.ledger.balances()  # the whole fee went back


def test_void_and_reversal_undo_the_fee_and_a_refund_reversal_undoes_its_fee_return() -> None:
    sw, _ = world()
    voided = sw.approve(fin(amount=2_000)).fields["37"]
    assert sw.one(sw.request(fin(pc="020000", amount=2_000, stan=2, **{"37": voided})))["39"] == "00"
    reversed_ = sw.approve(fin(amount=3_000, stan=3)).fields["37"]
    assert sw.one(sw.request(fin(mti="0400", amount=3_000, stan=3, **{"37": reversed_})))["39"] == "00"
    undone = [e for e in of_kind(sw, EntryKind.REVERSAL) if e.original_rrn.endswith("/fee")]
    assert [(e.original_rrn, e.amount_minor) for e in undone] == [
        (f"{voided}/fee", 40),
        (f"{reversed_}/fee", 55),
    ]
    kept = sw.approve(fin(amount=4_000, stan=4)).fields["37"]
    sw.request(refund(kept, 1_000, 5))
    back = sw.one(sw.answer(sw.last_sent()))
    assert (
        sw.one(sw.request(fin(mti="0400", pc="200000", amount=1_000, stan=5, **{"37": back["37"]})))["39"]
        == "00"
    )
    fee_back = next(e for e in of_kind(sw, EntryKind.FEE_REFUND) if e.rrn == f"{back['37']}/fee")
    again = next(e for e in of_kind(sw, EntryKind.REVERSAL) if e.original_rrn == fee_back.rrn)
    assert again.amount_minor == fee_back.amount_minor == 70 * 1_000 // 4_000
    assert sw.ledger.balances()[(accounts.FEE_INCOME, "978")] == -70  # only the kept sale's fee


def test_mcc_mismatch_is_declined_flagged_and_priced_never() -> None:
    sw, _ = world()
    answer = sw.one(sw.request(fin(**{"18": "7995"})))
    assert answer["39"] == "58" and sw.sent == {}
    (decline,) = sw.ledger.entries
    assert decline.kind is EntryKind.DECLINE and "mcc_mismatch" in decline.memo and "7995" in decline.memo
    assert sw.proc.counters["rule_flag_mcc_mismatch"] == 1
    assert any(log.event == "flag_mcc_mismatch" for log in sw.logs)
    assert sw.approve(fin(stan=2, **{"18": "5411"})).fields["39"] == "00"  # the registered MCC
    assert sw.approve(fin(stan=3)).fields["39"] == "00"  # absent: priced under the registered MCC
    strict, _ = world(require_mcc=True)
    assert strict.one(strict.request(fin()))["39"] == "58"


def test_registered_terminal_signs_on_then_one_test_transaction_activates_it() -> None:
    sw, rules = world()
    sign_on = {"t": "0800", "11": "000001", "41": "T2", "42": "M1", "70": "001"}
    sw.run(TerminalRequest(1, "a", sign_on, NOW_MS))
    assert [(e.terminal_id, e.event) for e in sw.lifecycle] == [("T2", "sign_on")]
    assert sw.one(sw.request(fin(mti="0100", tid="T2", stan=2)))["39"] == "58"  # pre-auth: not a test
    assert "not activated" in sw.ledger.entries[-1].memo
    assert sw.approve(fin(tid="T2", stan=3)).fields["39"] == "00"  # the test purchase
    assert [(e.event, e.flow) for e in sw.lifecycle[1:]] == [("approved", "purchase")]
    assert rules.terminals["T2"].state is TerminalState.ACTIVATED
    assert rules.terminals["T2"].activated_at_ms == NOW_MS
    assert sw.approve(fin(tid="T2", stan=4)).fields["39"] == "00"
    assert rules.terminals["T2"].state is TerminalState.ACTIVE


def test_deactivated_terminal_cannot_even_sign_on() -> None:
    sw, rules = world()
    rules.put_terminal(msgspec.structs.replace(rules.terminals["T1"], state=TerminalState.DEACTIVATED))
    sw.run(
        TerminalRequest(1, "a", {"t": "0800", "11": "000001", "41": "T1", "42": "M1", "70": "001"}, NOW_MS)
    )
    assert sw.replies[-1].fields["39"] == "58" and sw.lifecycle == []


def test_lapsed_subscription_suspends_on_tick_and_declines_with_the_reason() -> None:
    sw, rules = world(t3_paid_until=NOW_MS)
    sw.run(Tick(NOW_MS + 7 * DAY_MS))  # the last moment of grace: nothing yet
    assert sw.lifecycle == []
    sw.now_ms = NOW_MS + 7 * DAY_MS + 1
    sw.run(Tick(sw.now_ms))
    assert [(e.terminal_id, e.event) for e in sw.lifecycle] == [("T3", "clock")]
    assert rules.terminals["T3"].state is TerminalState.SUSPENDED
    assert sw.one(sw.request(fin(tid="T3", mid="M2")))["39"] == "58"
    assert "subscription_lapsed" in sw.ledger.entries[-1].memo


def test_refunds_racing_for_the_unsettled_balance_and_a_declined_one_gives_it_back() -> None:
    sw, rules = world(unsettled=0)
    rrn = sw.approve(fin(amount=10_000)).fields["37"]
    assert rules.unsettled[("M1", "978")] == 10_000 - 160  # observed on commit
    sw.request(refund(rrn, 6_000, 2))
    first = sw.last_sent()
    assert sw.one(sw.request(refund(rrn, 4_000, 3)))["39"] == "51"  # 9,840 - 6,000 reserved < 4,000
    sw.answer(first, rc="05")  # the acquirer declines the first: its reservation is released
    sw.request(refund(rrn, 4_000, 4))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    assert not rules._reserved
    assert [p for p in sw.all if isinstance(p, Post)][-1].drafts[1].kind is EntryKind.FEE_REFUND
