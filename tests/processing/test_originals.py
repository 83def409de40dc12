"""Flows that act on an original: refund, void, pre-authorisation completion, terminal reversal."""

from __future__ import annotations

from switch.ledger.model import EntryKind
from switch.processing import Cutover, DeadlinePassed, FindOriginal, Tick
from switch.processing.harness import NOW_MS, Driver, fin, make_config

DAY_MS = 86_400_000


def _f90(mti: str, stan: int, mmddhhmmss: str = "0615120000") -> str:
    return f"{mti}{stan:06d}{mmddhhmmss}{'0' * 22}"


# --- refunds -------------------------------------------------------------------------------------
def test_partial_refunds_up_to_the_original_and_not_one_unit_more() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=1_000)).fields["37"]
    sw.request(fin(pc="200000", amount=400, stan=2, **{"37": rrn}))
    refund = sw.last_sent()
    assert refund.acquirer == "A" and refund.fields["3"] == "200000"
    assert sw.one(sw.answer(refund))["39"] == "00"
    sw.request(fin(pc="200000", amount=600, stan=3, **{"37": rrn}))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    assert sw.one(sw.request(fin(pc="200000", amount=1, stan=4, **{"37": rrn})))["39"] == "13"
    refunds = [e for e in sw.ledger.entries if e.kind is EntryKind.REFUND]
    assert [e.amount_minor for e in refunds] == [400, 600] and {e.original_rrn for e in refunds} == {rrn}
    assert sw.ledger.balances() == {}


def test_refunds_in_flight_count_against_the_remainder() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=1_000)).fields["37"]
    sw.request(fin(pc="200000", amount=700, stan=2, **{"37": rrn}))
    first = sw.last_sent()
    assert sw.one(sw.request(fin(pc="200000", amount=301, stan=3, **{"37": rrn})))["39"] == "13"
    sw.answer(first, rc="05")  # declined: its reservation is released
    sw.request(fin(pc="200000", amount=1_000, stan=4, **{"37": rrn}))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"


def test_refund_that_times_out_releases_its_reservation_and_is_reversed() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=1_000)).fields["37"]
    sw.request(fin(pc="200000", amount=1_000, stan=2, **{"37": rrn}))
    refund = sw.last_sent()
    sw.run(DeadlinePassed(refund.txn_id, refund.deadline_ms))
    assert sw.replies[-1].fields["39"] == "68"
    assert sw.saf[("A", refund.fields["37"])] == "queued"
    sw.answer(refund)  # late approval: posted with its reversal, remainder untouched
    assert sw.ledger.kinds(refund.fields["37"])[-2:] == [EntryKind.REFUND, EntryKind.REVERSAL]
    sw.request(fin(pc="200000", amount=1_000, stan=3, **{"37": rrn}))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    assert sw.ledger.balances() == {}


def test_refund_unknown_original_other_merchant_declined_original_and_field_90() -> None:
    sw = Driver()
    assert sw.one(sw.request(fin(pc="200000", amount=1, **{"37": "999999999999"})))["39"] == "25"
    rrn = sw.approve(fin(stan=2)).fields["37"]
    assert (
        sw.one(sw.request(fin(pc="200000", amount=1, stan=3, tid="T3", mid="M2", **{"37": rrn})))["39"]
        == "25"
    )
    sw.request(fin(stan=4))
    declined = sw.one(sw.answer(sw.last_sent(), rc="05"))["37"]
    assert sw.one(sw.request(fin(pc="200000", amount=1, stan=5, **{"37": declined})))["39"] == "12"
    # by field 90: original MTI, STAN and date/time as the terminal sent them
    sw.request(fin(pc="200000", amount=5, stan=6, **{"90": _f90("0200", 2)}))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    assert sw.ledger.entries[-1].original_rrn == rrn
    assert sw.one(sw.request(fin(pc="200000", amount=1, stan=7)))["39"] == "30"  # names no original


def test_refund_of_a_forgotten_original_is_found_in_the_ledger() -> None:
    sw = Driver(make_config(max_cached_originals=1, max_remembered_keys=1))
    rrn = sw.approve(fin(amount=900)).fields["37"]
    sw.approve(fin(stan=2))
    sw.approve(fin(stan=3))
    assert sw.proc.find(rrn) is None
    sw.request(fin(pc="200000", amount=900, stan=4, **{"37": rrn, "52": "FFFF"}))
    assert any(isinstance(d, FindOriginal) and d.rrn == rrn for d in sw.all)
    send = sw.last_sent()
    assert "52" not in send.fields  # a request that waited for the ledger is rebuilt without PIN data
    assert sw.one(sw.answer(send))["39"] == "00"
    assert sw.one(sw.request(fin(pc="200000", amount=1, stan=5, **{"37": rrn})))["39"] == "13"


# --- voids ---------------------------------------------------------------------------------------
def test_same_day_void_posts_the_mirror_and_reverses_at_the_acquirer() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=2_500)).fields["37"]
    answer = sw.one(sw.request(fin(pc="020000", amount=2_500, stan=2, **{"37": rrn})))
    assert answer["39"] == "00" and answer["37"] != rrn
    assert sw.ledger.entries[-1].kind is EntryKind.VOID and sw.ledger.balances() == {}
    (rev,) = sw.reversals
    assert rev.rrn == rrn and rev.acquirer == "A" and rev.fields["90"].startswith("0200000777")
    assert sw.one(sw.request(fin(pc="020000", amount=2_500, stan=3, **{"37": rrn})))["39"] == "12"
    assert sw.one(sw.request(fin(pc="200000", amount=1, stan=4, **{"37": rrn})))["39"] == "12"


def test_void_edges() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=2_500)).fields["37"]
    assert sw.one(sw.request(fin(pc="020000", amount=2_499, stan=2, **{"37": rrn})))["39"] == "64"
    assert sw.one(sw.request(fin(pc="020000", amount=2_500, stan=3, tid="T2", **{"37": rrn})))["39"] == "12"
    sw.request(fin(pc="200000", amount=1, stan=4, **{"37": rrn}))
    sw.answer(sw.last_sent())
    assert sw.one(sw.request(fin(pc="020000", amount=2_500, stan=5, **{"37": rrn})))["39"] == "12"
    other = sw.approve(fin(amount=10, stan=6)).fields["37"]
    sw.now_ms += 1
    sw.run(Cutover(sw.now_ms))
    assert sw.one(sw.request(fin(pc="020000", amount=10, stan=7, **{"37": other})))["39"] == "12"


def test_void_ledger_failure_answers_96_and_leaves_the_original_voidable() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=50)).fields["37"]
    sw.ledger.fail = lambda drafts: True
    assert sw.one(sw.request(fin(pc="020000", amount=50, stan=2, **{"37": rrn})))["39"] == "96"
    assert sw.reversals == []
    sw.ledger.fail = lambda drafts: False
    assert sw.one(sw.request(fin(pc="020000", amount=50, stan=3, **{"37": rrn})))["39"] == "00"


# --- pre-authorisation and completion -------------------------------------------------------------
def test_preauth_hold_then_partial_completion_releases_the_hold_and_charges() -> None:
    sw = Driver()
    auth = sw.approve(fin(mti="0100", amount=10_000))
    assert auth.fields["t"] == "0110"
    rrn = auth.fields["37"]
    assert sw.ledger.entries[-1].kind is EntryKind.HOLD
    assert sw.one(sw.request(fin(mti="0220", amount=10_001, stan=2, **{"37": rrn})))["39"] == "13"
    done = sw.one(sw.request(fin(mti="0220", amount=8_000, stan=3, **{"37": rrn})))
    assert done["t"] == "0230" and done["39"] == "00" and done["38"] == "A1B2C3"
    assert sw.ledger.entries[-1].kind is EntryKind.CAPTURE
    assert sw.ledger.balances() == {
        ("acquirer:A:clearing", "978"): 8_000,
        ("merchant:M1:payable", "978"): -8_000,
    }
    (advice,) = sw.advices
    assert advice.fields["t"] == "0220" and advice.fields["90"].startswith("0100")
    assert sw.one(sw.request(fin(mti="0220", amount=1, stan=4, **{"37": rrn})))["39"] == "12"


def test_completion_by_0200_naming_the_preauth() -> None:
    sw = Driver()
    rrn = sw.approve(fin(mti="0100", amount=300)).fields["37"]
    assert sw.one(sw.request(fin(amount=300, stan=2, **{"37": rrn})))["39"] == "00"
    assert sw.ledger.entries[-1].kind is EntryKind.CAPTURE


def test_hold_expires_on_tick_and_cannot_be_completed_after() -> None:
    sw = Driver(make_config(hold_expiry_ms=DAY_MS))
    rrn = sw.approve(fin(mti="0100", amount=300)).fields["37"]
    sw.run(Tick(NOW_MS + DAY_MS - 1))
    assert sw.ledger.entries[-1].kind is EntryKind.HOLD
    sw.now_ms = NOW_MS + DAY_MS
    sw.run(Tick(sw.now_ms))
    assert sw.ledger.entries[-1].kind is EntryKind.HOLD_EXPIRY and sw.ledger.balances() == {}
    sw.run(Tick(sw.now_ms + 1))
    assert len(sw.ledger.entries) == 2
    assert sw.one(sw.request(fin(mti="0220", amount=300, stan=2, **{"37": rrn})))["39"] == "12"


def test_completion_at_the_last_moment_of_the_hold() -> None:
    sw = Driver(make_config(hold_expiry_ms=DAY_MS))
    rrn = sw.approve(fin(mti="0100", amount=300)).fields["37"]
    sw.now_ms = NOW_MS + DAY_MS - 1
    assert sw.one(sw.request(fin(mti="0220", amount=300, stan=2, **{"37": rrn})))["39"] == "00"


# --- reversals from the terminal -----------------------------------------------------------------
def test_reversal_of_an_approved_purchase_is_idempotent() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=777)).fields["37"]
    rev = sw.one(sw.request(fin(mti="0400", amount=777, stan=2, **{"90": _f90("0200", 1)})))
    assert rev["t"] == "0410" and rev["39"] == "00" and rev["37"] == rrn
    assert sw.ledger.kinds(rrn) == [EntryKind.PURCHASE, EntryKind.REVERSAL] and sw.ledger.balances() == {}
    assert sw.saf[("A", rrn)] == "queued"
    assert sw.one(sw.request(fin(mti="0401", amount=777, stan=2, **{"90": _f90("0200", 1)})))["39"] == "00"
    assert sw.one(sw.request(fin(mti="0400", amount=777, stan=3, **{"37": rrn})))["39"] == "00"
    assert len(sw.ledger.entries) == 2 and len(sw.reversals) == 1


def test_reversal_naming_the_original_by_its_own_stan_and_time() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=5, stan=42)).fields["37"]
    assert sw.one(sw.request(fin(mti="0400", amount=5, stan=42)))["39"] == "00"
    assert sw.ledger.kinds(rrn)[-1] is EntryKind.REVERSAL


def test_reversal_edges() -> None:
    sw = Driver()
    assert sw.one(sw.request(fin(mti="0400", stan=9, **{"37": "123"})))["39"] == "25"
    rrn = sw.approve(fin(amount=5)).fields["37"]
    assert sw.one(sw.request(fin(mti="0400", amount=6, stan=2, **{"37": rrn})))["39"] == "64"
    assert sw.one(sw.request(fin(mti="0400", amount=5, stan=3, tid="T2", **{"37": rrn})))["39"] == "25"
    sw.request(fin(pc="200000", amount=1, stan=4, **{"37": rrn}))
    sw.answer(sw.last_sent())
    assert sw.one(sw.request(fin(mti="0400", amount=5, stan=5, **{"37": rrn})))["39"] == "12"


def test_reversal_while_the_acquirer_has_not_answered_gives_up_on_the_original() -> None:
    sw = Driver()
    sw.request(fin(amount=5), conn=1)
    send = sw.last_sent()
    sw.request(fin(mti="0400", amount=5, stan=2, **{"90": _f90("0200", 1)}), conn=1)
    assert {r.fields["t"]: r.fields["39"] for r in sw.replies} == {"0210": "68", "0410": "00"}
    assert sw.saf[("A", send.fields["37"])] == "queued"
    sw.answer(send)  # the approval arrives: posted with its reversal, never delivered
    assert sw.ledger.balances() == {}


def test_reversal_of_a_declined_original_is_a_no_op_and_of_a_preauth_voids_the_hold() -> None:
    sw = Driver()
    sw.request(fin())
    declined = sw.one(sw.answer(sw.last_sent(), rc="05"))["37"]
    assert sw.one(sw.request(fin(mti="0400", stan=2, **{"37": declined})))["39"] == "00"
    assert sw.reversals == []
    hold = sw.approve(fin(mti="0100", amount=100, stan=3)).fields["37"]
    assert sw.one(sw.request(fin(mti="0400", amount=100, stan=4, **{"90": _f90("0100", 3)})))["39"] == "00"
    assert sw.ledger.kinds(hold) == [EntryKind.HOLD, EntryKind.HOLD_VOID] and sw.ledger.balances() == {}
    assert sw.one(sw.request(fin(mti="0220", amount=100, stan=5, **{"37": hold})))["39"] == "12"


def test_reversal_of_a_refund_gives_the_remainder_back() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=100)).fields["37"]
    sw.request(fin(pc="200000", amount=100, stan=2, **{"37": rrn}))
    refund_rrn = sw.one(sw.answer(sw.last_sent()))["37"]
    assert (
        sw.one(sw.request(fin(mti="0400", pc="200000", amount=100, stan=3, **{"37": refund_rrn})))["39"]
        == "00"
    )
    sw.request(fin(pc="200000", amount=100, stan=4, **{"37": rrn}))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    assert sw.ledger.balances() == {}
