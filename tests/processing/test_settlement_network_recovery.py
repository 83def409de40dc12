"""Settlement totals (0500), network management (0800), restart recovery, RRN blocks, masking."""

from __future__ import annotations

import pytest

from switch.ledger.model import EntryKind
from switch.processing import (
    ArmedReversal,
    Cutover,
    DeadlinePassed,
    Recovered,
    SettlementReport,
    SignOn,
)
from switch.processing.harness import NOW_MS, PAN, Driver, FakeLedger, fin
from switch.processing.rrn import RrnAllocator, RrnError


def _totals(
    debits: tuple[int, int],
    debit_rev: tuple[int, int] = (0, 0),
    credits: tuple[int, int] = (0, 0),
    credit_rev: tuple[int, int] = (0, 0),
    stan: int = 90,
) -> dict[str, str]:
    f = {"t": "0500", "11": f"{stan:06d}", "41": "T1", "42": "M1", "49": "978"}
    for (cf, af), (c, a) in zip(
        (("76", "88"), ("77", "89"), ("74", "86"), ("75", "87")), (debits, debit_rev, credits, credit_rev)
    ):
        f[cf] = f"{c:010d}"
        f[af] = f"{a:016d}"
    return f


def _day(sw: Driver) -> None:
    """Two sales, one voided, one refunded in part, one reversed refund, one timeout, one other terminal."""
    a = sw.approve(fin(amount=1_000, stan=1)).fields["37"]
    b = sw.approve(fin(amount=2_000, stan=2)).fields["37"]
    sw.request(fin(pc="020000", amount=2_000, stan=3, **{"37": b}))
    sw.request(fin(pc="200000", amount=300, stan=4, **{"37": a}))
    sw.answer(sw.last_sent())
    sw.request(fin(pc="200000", amount=200, stan=5, **{"37": a}))
    r2 = sw.one(sw.answer(sw.last_sent()))["37"]
    sw.request(fin(mti="0400", pc="200000", amount=200, stan=6, **{"37": r2}))
    sw.request(fin(amount=50, stan=7))
    sw.run(DeadlinePassed(sw.last_sent().txn_id, sw.last_sent().deadline_ms))
    sw.answer(sw.last_sent())  # late approval: not the terminal's business
    sw.approve(fin(amount=5, stan=8, tid="T2"))


def test_balanced_settlement_closes_the_batch() -> None:
    sw = Driver()
    _day(sw)
    answer = sw.one(sw.request(_totals((2, 3_000), (1, 2_000), (2, 500), (1, 200))))
    assert answer["t"] == "0510" and answer["39"] == "00"
    report = next(d for d in sw.all if isinstance(d, SettlementReport))
    assert report.balanced and len(report.lines) == 4
    assert sw.ledger.entries[-1].kind is EntryKind.SETTLEMENT
    assert sw.one(sw.request(_totals((0, 0), stan=91)))["39"] == "00"  # a new, empty batch


def test_out_of_balance_lists_every_differing_line() -> None:
    sw = Driver()
    _day(sw)
    answer = sw.one(sw.request(_totals((2, 3_001), (1, 2_000), (3, 500), (1, 200))))
    assert answer["39"] == "95"
    report = next(d for d in sw.all if isinstance(d, SettlementReport))
    bad = {
        ln.name: (ln.terminal_count, ln.terminal_amount_minor, ln.ledger_count, ln.ledger_amount_minor)
        for ln in report.lines
        if not ln.balanced
    }
    assert bad == {"debits": (2, 3_001, 2, 3_000), "credits": (3, 500, 2, 500)}
    assert sw.ledger.entries[-1].kind is not EntryKind.SETTLEMENT


def test_cutover_starts_a_new_batch_and_totals_survive_a_restart() -> None:
    sw = Driver()
    _day(sw)
    again = Driver(
        ledger=sw.ledger, rrn_start=10_000, recover=Recovered(now_ms=NOW_MS, drafts=tuple(sw.ledger.entries))
    )
    assert again.one(again.request(_totals((2, 3_000), (1, 2_000), (2, 500), (1, 200))))["39"] == "00"
    sw.run(Cutover(NOW_MS + 1))
    assert sw.one(sw.request(_totals((0, 0), stan=92)))["39"] == "00"


def test_malformed_totals_are_a_format_error() -> None:
    sw = Driver()
    f = _totals((1, 1))
    f["88"] = "12x"
    assert sw.one(sw.request(f))["39"] == "30"


@pytest.mark.parametrize(("code", "rc"), [("301", "00"), ("002", "00"), ("999", "12")])
def test_network_management(code: str, rc: str) -> None:
    sw = Driver()
    answer = sw.one(sw.request({"t": "0800", "11": "000001", "41": "T1", "70": code}))
    assert answer["t"] == "0810" and answer["39"] == rc and answer["70"] == code


def test_sign_on_asks_the_server_for_keys_and_unknown_terminals_get_03() -> None:
    sw = Driver()
    assert sw.request({"t": "0800", "11": "000001", "41": "T1", "42": "M1", "70": "001"}) == []
    (sign_on,) = [d for d in sw.all if isinstance(d, SignOn)]
    assert sign_on.terminal_id == "T1" and sign_on.reply["t"] == "0810" and sign_on.reply["39"] == "00"
    assert sw.one(sw.request({"t": "0800", "11": "000002", "41": "T9", "70": "001"}))["39"] == "03"
    assert sw.one(sw.request({"t": "0800", "11": "000003", "41": "T1"}))["39"] == "30"


# --- restarts --------------------------------------------------------------------------------------
def test_after_restart_repeats_replay_refund_remainders_hold_and_voids_still_work() -> None:
    sw = Driver()
    first = sw.approve(fin(amount=1_000)).fields
    sw.request(fin(pc="200000", amount=400, stan=2, **{"37": first["37"]}))
    sw.answer(sw.last_sent())
    ledger = sw.ledger
    again = Driver(
        ledger=ledger, rrn_start=10_000, recover=Recovered(now_ms=NOW_MS, drafts=tuple(ledger.entries))
    )
    replay = again.one(again.request(fin(mti="0201", amount=1_000)))
    assert {k: replay[k] for k in ("37", "38", "39")} == {k: first[k] for k in ("37", "38", "39")}
    assert again.one(again.request(fin(amount=1_000)))["39"] == "94"
    assert again.one(again.request(fin(pc="200000", amount=601, stan=3, **{"37": first["37"]})))["39"] == "13"
    assert again.sent == {}
    assert (
        again.one(again.request(fin(pc="020000", amount=1_000, stan=4, **{"37": first["37"]})))["39"] == "12"
    )


def test_armed_reversals_fire_unless_the_outcome_is_durable() -> None:
    sw = Driver()
    approved = sw.approve(fin(amount=10)).fields["37"]
    sw.request(fin(amount=20, stan=2))  # in flight when the process dies
    lost = sw.last_sent()
    armed = (
        ArmedReversal("A", approved, {"t": "0400", "37": approved}),
        ArmedReversal("A", lost.fields["37"], lost.reversal),
    )
    again = Driver(
        ledger=sw.ledger,
        rrn_start=10_000,
        recover=Recovered(now_ms=NOW_MS, drafts=tuple(sw.ledger.entries), armed=armed),
    )
    # the harness's SAF table starts empty, so look at the decisions themselves
    fired = {r.rrn for r in again.reversals}
    assert fired == {lost.fields["37"]}
    from switch.processing import ReleaseReversal

    assert [d.rrn for d in again.all if isinstance(d, ReleaseReversal)] == [approved]


def test_recovery_requeues_a_void_reversal_that_store_and_forward_lost() -> None:
    sw = Driver()
    rrn = sw.approve(fin(amount=10)).fields["37"]
    sw.request(fin(pc="020000", amount=10, stan=2, **{"37": rrn}))
    again = Driver(
        ledger=sw.ledger, rrn_start=10_000, recover=Recovered(now_ms=NOW_MS, drafts=tuple(sw.ledger.entries))
    )
    assert [r.rrn for r in again.reversals] == [rrn]
    known = Driver(
        ledger=sw.ledger,
        rrn_start=20_000,
        recover=Recovered(now_ms=NOW_MS, drafts=tuple(sw.ledger.entries), queued_rrns=frozenset({rrn})),
    )
    assert known.reversals == []


def test_rrn_blocks_never_overlap() -> None:
    alloc = RrnAllocator(block_size=3, low_water=1)
    alloc.grant(1, 3)
    assert [alloc.allocate() for _ in range(3)] == ["000000000001", "000000000002", "000000000003"]
    assert alloc.allocate() is None
    with pytest.raises(RrnError):
        alloc.grant(2, 3)
    with pytest.raises(RrnError):
        alloc.grant(10**12 - 1, 2)


def test_no_card_data_in_logs_reprs_or_entries() -> None:
    sw = Driver()
    _day(sw)
    sw.request(fin(pan="4111111111111112", stan=50))  # Luhn failure logs a reason
    text = repr(sw.logs) + repr(sw.proc.book.by_rrn) + repr(sw.ledger.entries)
    assert PAN not in text and "4111111111111112" not in text
    assert all(not t.pan for t in sw.proc.book.by_rrn.values())


def test_ledger_contract_of_the_harness() -> None:
    led = FakeLedger()
    sw = Driver(ledger=led)
    sw.approve(fin())
    (d,) = led.entries
    assert led.commit((d,)) == (True, False, "")  # same payload: idempotent
    changed = d.__class__(**{**{f: getattr(d, f) for f in d.__struct_fields__}, "amount_minor": 1})
    assert led.commit((changed,))[1] is True  # same key, other payload: conflict
