"""Every fault mode over TCP: timeouts and reversals, late answers, acquirer down, stand-in, bad MAC,
duplicates -- checking the terminal's answer, the ledger and what the acquirer saw."""

from __future__ import annotations

from pathlib import Path

import trio

from switch.ledger.model import EntryKind
from switch.server.testbed import ALPHA_BIN, card
from switch.sim.terminal import TerminalSim
from tests.e2e.harness import running_switch, signed_on, trio_test

SILENT = card(ALPHA_BIN, 90)
LATE = card(ALPHA_BIN, 91)


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


@trio_test
async def test_no_answer_gives_68_and_the_reversal_completes(tmp_path: Path) -> None:
    sims = {"alpha": {"card_faults": {SILENT: "no_answer"}}, "beta": {}}
    async with running_switch(tmp_path, sims=sims) as h, signed_on(h) as term:
        r = await term.purchase(SILENT, 9_900)
        assert r.response_code == "68"
        alpha = h.sims["alpha"].records
        await wait_for(lambda: len(alpha.reversals) == 1)  # store-and-forward delivered the 0400
        assert all(a.reversed for a in alpha.approved.values())
        drafts = h.ledger_drafts()
        assert not any(
            d.kind is EntryKind.PURCHASE and d.response_code == "00" and not _reversed(drafts, d.rrn)
            for d in drafts
        )


def _reversed(drafts, rrn: str) -> bool:
    return any(d.kind is EntryKind.REVERSAL and d.original_rrn == rrn for d in drafts)


@trio_test
async def test_late_approval_is_not_delivered_and_is_reversed(tmp_path: Path) -> None:
    sims = {"alpha": {"card_faults": {LATE: "late"}, "late_ms": 700}, "beta": {}}
    async with running_switch(tmp_path, sims=sims) as h, signed_on(h) as term:
        r = await term.purchase(LATE, 1_234)
        assert r.response_code == "68"
        alpha = h.sims["alpha"].records
        await wait_for(lambda: len(alpha.reversals) == 1)
        await trio.sleep(0.5)  # the late 0210 arrives meanwhile; it must change nothing
        ok = await term.purchase(card(ALPHA_BIN, 1), 10)
        assert ok.response_code == "00"
        assert term.unmatched == 0  # the terminal never saw a second answer


@trio_test
async def test_acquirer_down_uses_backup_or_answers_91_at_once(tmp_path: Path) -> None:
    overrides = {"alpha": {"backup": "beta"}}
    async with running_switch(
        tmp_path, sims={"beta": {}}, wait_up=False, acquirer_overrides=overrides, extra_acquirers={"alpha": 0}
    ) as h:
        await wait_for(lambda: h.sims["beta"].records.sign_ons >= 2)
        async with signed_on(h) as term:
            via_backup = await term.purchase(card(ALPHA_BIN, 2), 300)
            assert via_backup.response_code == "00"
            assert via_backup.rrn in h.sims["beta"].records.approved


@trio_test
async def test_acquirer_down_without_backup_answers_91_fast(tmp_path: Path) -> None:
    async with running_switch(tmp_path, sims={"beta": {}}, wait_up=False, extra_acquirers={"alpha": 0}) as h:
        await wait_for(lambda: h.sims["beta"].records.sign_ons >= 2)
        async with signed_on(h) as term:
            r = await term.purchase(card(ALPHA_BIN, 3), 300)
            assert r.response_code == "91"
            assert r.latency_ms < h.config.processing.terminal_deadline_ms
            assert not [d for d in h.ledger_drafts() if d.kind is EntryKind.PURCHASE]


@trio_test
async def test_stand_in_below_the_floor_then_advice(tmp_path: Path) -> None:
    overrides = {"alpha": {"stand_in_floor_minor": 5_000}}
    async with running_switch(
        tmp_path, sims={"beta": {}}, wait_up=False, acquirer_overrides=overrides, extra_acquirers={"alpha": 0}
    ) as h:
        await wait_for(lambda: h.sims["beta"].records.sign_ons >= 2)
        async with signed_on(h) as term:
            small = await term.purchase(card(ALPHA_BIN, 4), 4_000)
            big = await term.purchase(card(ALPHA_BIN, 4), 6_000)
            assert small.response_code == "00"
            assert big.response_code == "91"
            assert [d.kind for d in h.ledger_drafts() if d.rrn == small.rrn] == [EntryKind.STAND_IN]


@trio_test
async def test_bad_mac_answers_a0_and_posts_nothing(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h:
        async with TerminalSim.connect(h.terminal_config(0)) as term:
            r = await term.sign_on()
            assert r.response_code == "00"
            term.wrong_mac = True  # a MAC that cannot verify
            with_bad_mac = await term.exchange(
                {
                    "t": "0200",
                    "2": card(ALPHA_BIN, 5),
                    "3": "000000",
                    "4": "000000000500",
                    "22": "012",
                    "25": "00",
                    "49": "978",
                },
                "purchase",
            )
        assert with_bad_mac.response_code == "A0"
        assert h.ledger_drafts() == []
        assert h.sims["alpha"].records.approved == {}


@trio_test
async def test_duplicates_replay_or_94_never_posted_twice(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        fields = {
            "t": "0200",
            "2": card(ALPHA_BIN, 6),
            "3": "000000",
            "4": "000000000777",
            "22": "012",
            "25": "00",
            "49": "978",
            "12": "101010",
            "13": "0102",
        }
        first = await term.exchange(fields, "purchase", stan="004242")
        repeat = await term.exchange({**fields, "t": "0201"}, "purchase", stan="004242")
        fresh = await term.exchange(fields, "purchase", stan="004242")
        assert first.response_code == "00"
        assert repeat.response_code == "00" and repeat.rrn == first.rrn
        assert fresh.response_code == "94"
        assert [d.kind for d in h.ledger_drafts() if d.kind is EntryKind.PURCHASE] == [EntryKind.PURCHASE]
        assert len(h.sims["alpha"].records.approved) == 1
