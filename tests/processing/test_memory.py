"""What the core keeps of a finished transaction (switch.processing.record.Done): small, invisible to the
cyclic garbage collector (the switch's full collection every `server.gc_full_interval_s` walks every
tracked object, and up to a million finished transactions are kept), and still enough for every later
repeat, void, refund, completion, reversal, fee and settlement total."""

from __future__ import annotations

import gc
import tracemalloc

from switch.ledger.model import Entry, EntryKind
from switch.merchant.directory import RegistryDirectory
from switch.merchant.rules import MerchantRules
from switch.processing import (
    AcquirerAnswered,
    HmacPanHasher,
    LedgerCommitted,
    Post,
    PrefixRouter,
    Processor,
    Recovered,
    RrnsReserved,
    SendToAcquirer,
    TerminalRequest,
)
from switch.processing.harness import NOW_MS, Driver, fee_merchant_rules, fin, make_config
from switch.processing.record import Done, Status, Txn


def _kept(sw: Driver) -> list[object]:
    book = sw.proc.book
    return [*book.by_rrn.values(), *book.by_key.values(), *book.open_holds.values()]


def test_finished_transactions_are_kept_compact_and_untracked_and_live_ones_are_not() -> None:
    sw = Driver()
    for stan in range(1, 21):
        sw.approve(fin(amount=1_000 + stan, stan=stan))
    sw.request(fin(amount=500, stan=30))
    sw.answer(sw.last_sent(), rc="05")  # declined
    sw.approve(fin(mti="0100", amount=700, stan=31))  # pre-authorisation: an open hold
    rrn = sw.replies[0].fields["37"]
    sw.request(fin(pc="200000", amount=300, stan=32, **{"37": rrn}))
    sw.answer(sw.last_sent())  # a refund
    sw.request(fin(amount=900, stan=40))  # still waiting for its acquirer
    live = sw.proc.live[sw.last_sent().txn_id]
    kept = [r for r in _kept(sw) if r is not live]
    assert len(kept) == 2 * 23 + 1 and all(type(r) is Done for r in kept)
    assert not any(gc.is_tracked(r) for r in kept)
    assert type(live) is Txn and gc.is_tracked(live)
    sw.answer(sw.last_sent())
    finished = sw.proc.book.by_rrn[live.rrn]
    assert type(finished) is Done and not gc.is_tracked(finished) and finished.status is Status.APPROVED
    assert sw.proc.book.by_key[live.key] is finished


def test_repeat_of_a_remembered_purchase_replays_its_answer_and_balance_without_the_chip_data() -> None:
    sw = Driver()
    sw.request(fin(amount=1_234))
    first = sw.one(sw.answer(sw.last_sent(), auth="XY12", **{"54": "1001978C000000012345", "55": "9F26"}))
    assert first["55"] == "9F26"
    replay = sw.one(sw.request(fin(mti="0201", amount=1_234), conn=7))
    assert replay["t"] == "0210" and replay["39"] == "00" and replay["38"] == "XY12"
    assert replay["37"] == first["37"] and replay["54"] == "1001978C000000012345" and "55" not in replay
    assert sw.one(sw.request(fin(amount=1_234)))["39"] == "94"  # same key, not a repeat
    assert [e.kind for e in sw.ledger.entries] == [EntryKind.PURCHASE]


def test_void_refund_reversal_and_completion_act_on_remembered_records() -> None:
    sw = Driver()
    voided = sw.approve(fin(amount=1_000, stan=1)).fields["37"]
    refunded = sw.approve(fin(amount=2_000, stan=2)).fields["37"]
    sw.approve(fin(amount=3_000, stan=3))
    hold = sw.approve(fin(mti="0100", amount=4_000, stan=4)).fields["37"]
    assert sw.one(sw.request(fin(pc="020000", amount=1_000, stan=5, **{"37": voided})))["39"] == "00"
    sw.request(fin(pc="200000", amount=1_500, stan=6, **{"37": refunded}))
    assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
    f90 = f"0200000003{'0615120000'}{'0' * 22}"
    assert sw.one(sw.request(fin(mti="0400", amount=3_000, stan=7, **{"90": f90})))["39"] == "00"
    assert sw.one(sw.request(fin(mti="0220", amount=3_500, stan=8, **{"37": hold})))["39"] == "00"
    book = sw.proc.book
    assert book.by_rrn[voided].status is Status.VOIDED
    assert book.by_rrn[refunded].refunded_minor == 1_500
    assert sw.one(sw.request(fin(pc="200000", amount=501, stan=9, **{"37": refunded})))["39"] == "13"
    assert hold not in book.open_holds and str(book.by_rrn[hold].hold) == "captured"
    kinds = [e.kind for e in sw.ledger.entries]
    assert kinds.count(EntryKind.VOID) == 1 and kinds.count(EntryKind.REVERSAL) == 1
    assert kinds.count(EntryKind.REFUND) == 1 and kinds.count(EntryKind.CAPTURE) == 1
    assert all(type(r) is Done and not gc.is_tracked(r) for r in _kept(sw))
    assert sw.ledger.balances() == {  # what stands: 500 of the refunded sale and 3,500 captured
        ("acquirer:A:clearing", "978"): 4_000,
        ("merchant:M1:payable", "978"): -4_000,
    }


def _rules() -> MerchantRules:
    return fee_merchant_rules(1_000_000_000)


def _with_fees(**driver: object) -> Driver:
    rules = _rules()
    return Driver(rules=rules, directory=RegistryDirectory(rules), **driver)  # type: ignore[arg-type]


def _fee_side(sw: Driver) -> list[tuple[EntryKind, int, str]]:
    fee_kinds = (EntryKind.FEE, EntryKind.FEE_REFUND)
    return [
        (e.kind, e.amount_minor, e.memo)
        for e in sw.ledger.entries
        if e.kind in fee_kinds or (e.kind is EntryKind.REVERSAL and e.original_rrn.endswith("/fee"))
    ]


def test_a_sale_rebuilt_after_a_restart_returns_and_undoes_its_fee_as_if_never_restarted() -> None:
    def sales(sw: Driver) -> tuple[str, str]:
        a = sw.approve(fin(amount=10_001, stan=1)).fields["37"]
        b = sw.approve(fin(amount=5_003, stan=2)).fields["37"]
        return a, b

    def act(sw: Driver, a: str, b: str) -> None:
        sw.request(fin(pc="200000", amount=2_501, stan=3, **{"37": a}))
        assert sw.one(sw.answer(sw.last_sent()))["39"] == "00"
        assert sw.one(sw.request(fin(pc="020000", amount=5_003, stan=4, **{"37": b})))["39"] == "00"

    straight = _with_fees()
    act(straight, *sales(straight))
    before = _with_fees()
    a, b = sales(before)
    after = _with_fees(
        ledger=before.ledger,
        rrn_start=3,  # the RRNs the straight run gives the refund and the void
        recover=Recovered(now_ms=NOW_MS, drafts=tuple(before.ledger.entries)),
    )
    rec = after.proc.book.by_rrn[a]
    assert type(rec) is Done and not gc.is_tracked(rec) and rec.auth_code == "A1B2C3"
    assert rec.fee is not None and rec.fee.amount_minor == _fee_side(before)[0][1] > 0
    act(after, a, b)
    kinds = [k for k, _, _ in _fee_side(after)]
    assert kinds == [EntryKind.FEE, EntryKind.FEE, EntryKind.FEE_REFUND, EntryKind.REVERSAL]
    assert _fee_side(after) == _fee_side(straight)


def _processor_with_fees() -> Processor:
    rules = _rules()
    proc = Processor(
        make_config(),
        directory=RegistryDirectory(rules),
        router=PrefixRouter({"4": "A"}),
        pan_hasher=HmacPanHasher(b"k" * 32),
        rules=rules,
    )
    proc.handle(Recovered(now_ms=NOW_MS))
    proc.handle(RrnsReserved(1, 1_000_000))
    return proc


def _card(i: int) -> str:
    """A Luhn-valid 16-digit Visa-range PAN per i."""
    body = f"4{i:014d}"
    total = 0
    for pos, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if pos % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str(-total % 10)


def _purchases(proc: Processor, first: int, n: int) -> None:
    """n approved purchases with their fees, as the server feeds them (no ledger kept here)."""
    seq = first * 10
    for i in range(first, first + n):
        fields = fin(
            amount=100 + i, stan=i % 999_999 + 1, time=f"{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}"
        )
        fields["2"] = _card(i)  # many cards, as in real traffic
        send = next(
            d
            for d in proc.handle(TerminalRequest(1, "terminal_ascii", fields, NOW_MS + i))
            if type(d) is SendToAcquirer
        )
        answer = {
            "t": "0210",
            "11": f"{i % 999_999:06d}",
            "37": send.fields["37"],
            "38": f"A{i % 99_999:05d}",
            "39": "00",
        }
        post = next(
            d for d in proc.handle(AcquirerAnswered(send.txn_id, answer, NOW_MS + i)) if type(d) is Post
        )
        entries = tuple(Entry(seq=seq + k, draft=d) for k, d in enumerate(post.drafts))
        seq += len(entries)
        replies = proc.handle(LedgerCommitted(post.txn_id, entries, NOW_MS + i))
        assert any(type(d).__name__ == "Reply" and d.fields["39"] == "00" for d in replies)


def test_a_remembered_purchase_with_its_fee_costs_well_under_a_kilobyte() -> None:
    """Session 4 kept ~2,400 bytes per purchase (tracemalloc, bench/memory.py): the live `Txn` with its
    reply dict, lists and the fee's EntryDraft. What is left: the record's 37 slots (~310 bytes), the
    strings only this purchase has (RRN, terminal key, masked PAN, PAN hash, approval code, STAN, fee
    terms) and its two map slots. 1,000 bytes leaves room for dict growth inside the window."""
    proc = _processor_with_fees()
    _purchases(proc, 1, 2_000)  # warm-up: caches, counters, the maps' first growth
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _purchases(proc, 10_001, 3_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    rec = proc.book.by_rrn[next(reversed(proc.book.by_rrn))]
    assert type(rec) is Done and rec.fee is not None and rec.fee.kind is EntryKind.FEE
    assert len(proc.book.by_rrn) == len(proc.book.by_key) == 5_000
    assert grown / 3_000 < 1_000, f"{grown / 3_000:.0f} bytes per remembered purchase"
