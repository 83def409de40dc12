"""Every terminal flow over TCP against the real switch, checking the answer AND the ledger."""

from __future__ import annotations

from pathlib import Path

from switch.ledger.model import EntryKind
from switch.server.testbed import ALPHA_BIN, BETA_BIN, card
from tests.e2e.harness import running_switch, signed_on, trio_test


def kinds(h, rrn: str) -> list[EntryKind]:
    return [d.kind for d in h.ledger_drafts() if rrn in (d.rrn, d.original_rrn)]


@trio_test
async def test_purchase_on_both_profiles_and_both_acquirers(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h:
        packed = next(i for i, t in enumerate(h.terminals) if t.listener == "packed")
        for index in (0, packed):
            async with signed_on(h, index) as term:
                a = await term.purchase(card(ALPHA_BIN, 2), 500)
                b = await term.purchase(card(BETA_BIN, 2), 700)
                assert (a.response_code, b.response_code) == ("00", "00")
                assert a.rrn in h.sims["alpha"].records.approved
                assert b.rrn in h.sims["beta"].records.approved
                assert kinds(h, a.rrn) == [EntryKind.PURCHASE]
                assert kinds(h, b.rrn) == [EntryKind.PURCHASE]


@trio_test
async def test_preauth_then_completion(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        hold = await term.pre_auth(card(ALPHA_BIN, 3), 10_000)
        assert hold.response_code == "00"
        assert kinds(h, hold.rrn) == [EntryKind.HOLD]
        done = await term.completion(hold, 8_000)
        assert done.response_code == "00"
        assert EntryKind.CAPTURE in kinds(h, hold.rrn)


@trio_test
async def test_void_of_a_purchase(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        sale = await term.purchase(card(ALPHA_BIN, 4), 2_500)
        void = await term.void(sale)
        assert void.response_code == "00"
        assert kinds(h, sale.rrn) == [EntryKind.PURCHASE, EntryKind.VOID]


@trio_test
async def test_partial_refunds_never_above_the_original(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        sale = await term.purchase(card(ALPHA_BIN, 5), 3_000)
        r1 = await term.refund(sale, 1_000)
        r2 = await term.refund(sale, 1_500)
        over = await term.refund(sale, 600)  # 2,500 refunded; 600 > remaining 500
        assert (r1.response_code, r2.response_code) == ("00", "00")
        assert over.response_code not in ("00", "")
        refunds = [d for d in h.ledger_drafts() if d.kind is EntryKind.REFUND and d.original_rrn == sale.rrn]
        assert sum(d.amount_minor for d in refunds) == 2_500


@trio_test
async def test_terminal_reversal_and_its_repeat(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        sale = await term.purchase(card(ALPHA_BIN, 6), 4_200)
        rev = await term.reversal(sale)
        assert rev.response_code == "00"
        again = await term.reversal(sale, repeat_of=rev)
        assert again.response_code == "00"
        assert kinds(h, sale.rrn).count(EntryKind.REVERSAL) == 1


@trio_test
async def test_inquiry_echo_and_signon(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        inquiry = await term.balance_inquiry(card(ALPHA_BIN, 7))
        assert inquiry.response_code == "00"
        echo = await term.echo()
        assert echo.response_code == "00"
        again = await term.sign_on()  # new working keys; MACs keep working with them
        assert again.response_code == "00"
        sale = await term.purchase(card(ALPHA_BIN, 7), 100)
        assert sale.response_code == "00"
        money = [d for d in h.ledger_drafts() if d.kind is EntryKind.PURCHASE]
        assert [d.rrn for d in money] == [sale.rrn]  # the inquiry moved no money


@trio_test
async def test_settlement_balanced_then_out_of_balance(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        sales = [await term.purchase(card(ALPHA_BIN, 8), 1_000 + n) for n in range(3)]
        assert [s.response_code for s in sales] == ["00"] * 3
        assert (await term.void(sales[0])).response_code == "00"
        assert (await term.refund(sales[1], 300)).response_code == "00"
        balanced = await term.settlement()  # gross lines plus reversal lines agree with the ledger
        assert balanced.response_code == "00"
        await term.purchase(card(ALPHA_BIN, 8), 50)
        term.totals.lines["debits"][1] += 1  # the terminal's batch disagrees with the ledger by 1 cent
        out = await term.settlement()
        assert out.response_code == "95"
