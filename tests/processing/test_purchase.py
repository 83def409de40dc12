"""Purchase end to end through the core: validation codes, routing, timeouts, outages, stand-in,
ledger failures and duplicates, each checked by what the terminal hears and what the ledger holds."""

from __future__ import annotations

import pytest

from switch.ledger.model import EntryKind
from switch.processing import (
    AcquirerHealth,
    AcquirerUnavailable,
    DeadlinePassed,
    Post,
    Reply,
    ReserveRrns,
    RrnsReserved,
    RuleContext,
    RuleDecline,
    StoreForwardCompleted,
    TerminalRequest,
)
from switch.processing.harness import NOW_MS, PAN, PAN_C, PAN_NOROUTE, PIN_BLOCK, Driver, fin, make_config
from switch.routing.bins import BinTable


def test_approved_purchase_is_answered_only_after_its_entry_is_durable() -> None:
    sw = Driver(auto_ledger=False)
    assert sw.request(fin(amount=1234, **{"52": PIN_BLOCK})) == []
    send = sw.last_sent()
    assert send.acquirer == "A"
    assert send.fields["52"] == PIN_BLOCK  # passed through to the acquirer
    assert send.fields["37"] == send.reversal["37"] and len(send.fields["37"]) == 12
    assert "11" not in send.fields  # the link allocates its own STAN
    assert send.reversal["t"] == "0400" and send.reversal["90"].startswith("0200")
    assert sw.answer(send) == []  # approved, but nothing durable yet
    assert [type(d) for d in sw.all[-1:]] == [Post]
    replies = sw.commit_pending()
    answer = next(d for d in replies if isinstance(d, Reply)).fields
    assert answer["t"] == "0210" and answer["39"] == "00" and answer["38"] == "A1B2C3"
    assert answer["37"] == send.fields["37"]
    (entry,) = sw.ledger.entries
    assert entry.kind is EntryKind.PURCHASE and entry.amount_minor == 1234
    assert sw.ledger.balances() == {
        ("acquirer:A:clearing", "978"): 1234,
        ("merchant:M1:payable", "978"): -1234,
    }
    assert sw.saf[("A", send.fields["37"])] == "released"
    assert PIN_BLOCK not in repr(sw.ledger.entries) and PAN not in repr(sw.ledger.entries)


def test_acquirer_decline_is_recorded_and_passed_on() -> None:
    sw = Driver()
    sw.request(fin())
    send = sw.last_sent()
    assert sw.one(sw.answer(send, rc="51", auth=""))["39"] == "51"
    (entry,) = sw.ledger.entries
    assert entry.kind is EntryKind.DECLINE and entry.response_code == "51" and entry.postings == ()
    assert sw.saf[("A", send.fields["37"])] == "released"


def _card_expired() -> dict[str, str]:
    return fin(**{"14": "2505"})


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (fin(tid=""), "30"),
        (fin(stan=0, **{"11": "12a456"}), "30"),
        (fin(time="250000"), "30"),
        (fin(date="1301"), "30"),
        (fin(**{"4": "12.50"}), "30"),
        (fin(**{"49": "EUR"}), "30"),
        (fin(**{"14": "2513"}), "30"),
        (fin(pan=""), "30"),
        (fin(tid="T9"), "03"),
        (fin(mid="M9"), "03"),
        (fin(tid="T3", mid="M1"), "03"),
        (fin(pc="400000"), "12"),
        (fin(mti="0300"), "12"),
        (fin(amount=0), "13"),
        (fin(amount=1_000_001), "13"),
        (fin(pan="4111111111111112"), "14"),
        (fin(pan="41111111119"), "14"),
        (_card_expired(), "54"),
        (fin(pan=PAN_NOROUTE), "15"),
    ],
)
def test_validation_codes(fields: dict[str, str], code: str) -> None:
    sw = Driver(make_config(max_amount_minor=1_000_000))
    answer = sw.one(sw.request(fields))
    assert answer["39"] == code
    assert sw.sent == {}
    assert not any(e.postings for e in sw.ledger.entries)


def test_limits_just_inside_are_accepted() -> None:
    sw = Driver(make_config(max_amount_minor=1_000_000))
    assert sw.request(fin(amount=1_000_000, **{"14": "2506"})) == []  # expires this month: still valid
    assert sw.last_sent().fields["4"] == "000001000000"


def test_track2_supplies_pan_and_expiry_and_is_only_forwarded() -> None:
    sw = Driver()
    track2 = f"{PAN}=25051011000012345678"
    sw.request(fin(pan="", **{"14": "", "35": track2}))
    # expired per track 2
    assert sw.replies[-1].fields["39"] == "54"
    sw.request(fin(pan="", stan=2, **{"14": "", "35": f"{PAN}D27121011000012345678"}))
    send = sw.last_sent()
    assert send.fields["2"] == PAN and send.fields["35"].startswith(PAN)
    assert track2 not in repr(sw.proc.book.by_rrn) and "1011000012345678" not in repr(sw.ledger.entries)


def test_timeout_answers_68_queues_reversal_and_a_late_approval_is_posted_with_its_reversal() -> None:
    sw = Driver()
    sw.request(fin(amount=700))
    send = sw.last_sent()
    assert send.deadline_ms == NOW_MS + 5_000
    sw.now_ms = send.deadline_ms
    sw.run(DeadlinePassed(send.txn_id, sw.now_ms))
    assert sw.one(sw.replies)["39"] == "68"
    rrn = send.fields["37"]
    assert sw.saf[("A", rrn)] == "queued"
    (rev,) = sw.reversals
    assert rev.fields["t"] == "0400" and rev.fields["37"] == rrn and rev.fields["90"].startswith("0200")
    assert [e.kind for e in sw.ledger.entries] == [EntryKind.DECLINE]
    # the approval arrives late: never delivered, counted, and the ledger shows the charge and its reversal
    assert sw.answer(send) == []
    assert sw.proc.counters["late_approvals"] == 1
    assert sw.ledger.kinds(rrn) == [EntryKind.DECLINE, EntryKind.PURCHASE, EntryKind.REVERSAL]
    assert sw.ledger.balances() == {}
    sw.answer(send)  # a duplicate late answer posts nothing more
    assert len(sw.ledger.entries) == 3
    sw.run(StoreForwardCompleted("A", rrn, "reversal", "00", sw.now_ms))
    assert sw.proc.counters["reversals_completed"] == 1


def test_late_decline_posts_nothing() -> None:
    sw = Driver()
    sw.request(fin())
    send = sw.last_sent()
    sw.run(DeadlinePassed(send.txn_id, send.deadline_ms))
    sw.answer(send, rc="05")
    assert [e.kind for e in sw.ledger.entries] == [EntryKind.DECLINE]


def test_deadline_after_the_answer_changes_nothing() -> None:
    sw = Driver()
    sw.approve(fin())
    send = sw.last_sent()
    sw.run(DeadlinePassed(send.txn_id, send.deadline_ms))
    assert len(sw.replies) == 1 and sw.reversals == []


def test_acquirer_down_routes_to_backup_then_91_at_once() -> None:
    sw = Driver()
    sw.run(AcquirerHealth("A", False))
    sw.request(fin())
    assert sw.last_sent().acquirer == "B"
    sw.run(AcquirerHealth("B", False))
    assert sw.one(sw.request(fin(stan=2)))["39"] == "91"
    assert len(sw.sent) == 1


def test_undelivered_request_goes_to_backup_with_the_pin_block_and_releases_the_armed_reversal() -> None:
    sw = Driver()
    sw.request(fin(**{"52": PIN_BLOCK}))
    first = sw.last_sent()
    sw.run(AcquirerUnavailable(first.txn_id, first.fields, NOW_MS, "no link up"))
    second = sw.last_sent()
    assert second.acquirer == "B" and second.fields["52"] == PIN_BLOCK
    assert sw.saf[("A", first.fields["37"])] == "released"
    assert sw.saf[("B", first.fields["37"])] == "armed"
    sw.run(AcquirerUnavailable(second.txn_id, second.fields, NOW_MS, "no link up"))
    assert sw.one(sw.replies)["39"] == "91"
    assert PIN_BLOCK not in repr(sw.proc.book.by_rrn)


def test_stand_in_below_floor_approves_posts_and_queues_an_advice() -> None:
    sw = Driver()
    sw.run(AcquirerHealth("C", False))
    answer = sw.one(sw.request(fin(pan=PAN_C, amount=4_999)))
    assert answer["39"] == "00" and answer["38"].startswith("SI")
    (entry,) = sw.ledger.entries
    assert entry.kind is EntryKind.STAND_IN
    (advice,) = sw.advices
    assert advice.acquirer == "C" and advice.fields["t"] == "0220" and advice.fields["4"] == "000000004999"
    assert sw.one(sw.request(fin(pan=PAN_C, amount=5_000, stan=2)))["39"] == "91"
    # the acquirer refuses the advice: the exposure moves to the switch's own account
    sw.run(StoreForwardCompleted("C", answer["37"], "advice", "05", NOW_MS))
    assert sw.ledger.entries[-1].kind is EntryKind.ADJUSTMENT
    assert sw.ledger.balances()[("switch:stand_in_exposure", "978")] == 4_999


def test_ledger_failure_after_approval_answers_96_and_reverses() -> None:
    sw = Driver()
    sw.ledger.fail = lambda drafts: True
    sw.request(fin())
    send = sw.last_sent()
    assert sw.one(sw.answer(send))["39"] == "96"
    assert sw.saf[("A", send.fields["37"])] == "queued"
    assert sw.ledger.entries == []


def test_duplicates_replay_or_94_and_never_post_twice() -> None:
    sw = Driver()
    first = sw.approve(fin())
    assert sw.one(sw.request(fin()))["39"] == "94"
    replay = sw.one(sw.request(fin(mti="0201"), conn=2))
    assert {k: replay[k] for k in ("37", "38", "39")} == {k: first.fields[k] for k in ("37", "38", "39")}
    assert replay["t"] == "0210" and len(sw.sent) == 1
    assert len(sw.ledger.entries) == 1


def test_repeat_while_in_flight_gets_the_answer_on_its_own_connection() -> None:
    sw = Driver()
    sw.request(fin(), conn=1)
    assert sw.request(fin(mti="0201"), conn=2) == []
    replies = sw.answer(sw.last_sent())
    assert sorted(r.conn_id for r in replies) == [1, 2]
    assert len(sw.sent) == 1 and len(sw.ledger.entries) == 1


def test_first_seen_repeat_is_processed_and_forgotten_keys_hit_the_ledger_idempotency() -> None:
    sw = Driver(make_config(max_remembered_keys=1, max_cached_originals=1))
    sw.approve(fin(mti="0201"))
    sw.approve(fin(stan=2))  # pushes the first key out of memory
    sw.request(fin())  # the forgotten key again, fresh
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "94"  # the ledger caught it
    assert sw.saf[("A", sw.last_sent().fields["37"])] == "queued"  # and its approval is reversed
    assert [e.kind for e in sw.ledger.entries] == [EntryKind.PURCHASE, EntryKind.PURCHASE]


def test_rules_step_declines_before_routing() -> None:
    class NoBigTickets:
        def check(self, ctx: RuleContext) -> RuleDecline | None:
            return RuleDecline("58", "terminal not activated") if ctx.terminal.id == "T2" else None

    sw = Driver(rules=NoBigTickets())
    assert sw.one(sw.request(fin(tid="T2")))["39"] == "58"
    assert sw.sent == {} and sw.ledger.entries[0].response_code == "58"
    assert any("terminal not activated" in log.text for log in sw.logs)


def test_a_bug_costs_one_96_not_the_switch() -> None:
    class Broken:
        def check(self, ctx: RuleContext) -> RuleDecline | None:
            raise RuntimeError(f"boom {PAN}")

    sw = Driver(rules=Broken())
    assert sw.one(sw.request(fin()))["39"] == "96"
    assert sw.proc.counters["internal_errors"] == 1
    assert all(PAN not in log.text for log in sw.logs)
    assert sw.proc.in_flight == 0


def test_inquiry_returns_balances_and_posts_nothing() -> None:
    sw = Driver()
    sw.request(fin(mti="0100", pc="310000", **{"4": ""}))
    send = sw.last_sent()
    assert send.reversal is None
    answer = sw.one(sw.answer(send, **{"54": "1001978C000000012345"}))
    assert answer["t"] == "0110" and answer["54"] == "1001978C000000012345"
    assert sw.ledger.entries == []


def test_partial_approval_is_not_delivered_and_is_reversed() -> None:
    sw = Driver()
    sw.request(fin())
    send = sw.last_sent()
    assert sw.one(sw.answer(send, rc="10"))["39"] == "05"
    assert sw.saf[("A", send.fields["37"])] == "queued"


def test_answer_without_field_39_is_treated_as_unknown_outcome() -> None:
    sw = Driver()
    sw.request(fin())
    send = sw.last_sent()
    sw.run(
        __import__("switch.processing", fromlist=["AcquirerAnswered"]).AcquirerAnswered(
            send.txn_id, {"t": "0210", "37": send.fields["37"]}, NOW_MS
        )
    )
    assert sw.one(sw.replies)["39"] == "96"
    assert sw.saf[("A", send.fields["37"])] == "queued"


def test_bin_table_from_routing_is_a_router() -> None:
    from switch.config import RouteConfig, RoutingConfig

    table = BinTable.from_config(RoutingConfig(routes=[RouteConfig(prefix="411111", acquirer="B")]))
    sw = Driver(router=table)
    sw.request(fin())
    assert sw.last_sent().acquirer == "B"


def test_malformed_mti_and_responses_from_terminals_are_dropped_with_a_log() -> None:
    sw = Driver()
    before = len(sw.logs)
    sw.run(TerminalRequest(1, "p", {"t": "02X0"}, NOW_MS))
    sw.run(TerminalRequest(1, "p", {"t": "0210"}, NOW_MS))
    sw.run(TerminalRequest(1, "p", {}, NOW_MS))
    assert sw.replies == [] and len(sw.logs) == before + 3


def test_open_transaction_limit_answers_96() -> None:
    sw = Driver(make_config(max_open_transactions=1))
    sw.request(fin())
    assert sw.one(sw.request(fin(stan=2)))["39"] == "96"


def test_without_reserved_rrns_the_core_answers_96_and_asks_for_a_block() -> None:
    sw = Driver(make_config(rrn_block_size=10, rrn_low_water=2), grant_rrns=False)
    assert any(isinstance(d, ReserveRrns) and d.count == 10 for d in sw.all)
    assert sw.one(sw.request(fin()))["39"] == "96"
    sw.run(RrnsReserved(500, 10))
    sw.request(fin(stan=2))
    assert sw.last_sent().fields["37"] == "000000000500"
    for stan in range(3, 11):  # uses 501..508: at 2 left the core asks for the next block, once
        sw.request(fin(stan=stan))
    assert sum(isinstance(d, ReserveRrns) for d in sw.all) == 2
