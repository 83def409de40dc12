"""The acquirer-side fault modes over TCP that test_e2e_faults.py does not cover: the acquirer drops the
connection mid-request, answers with a garbage frame, or answers with a wrong MAC on a MACed link.
Each time the terminal must hear 68 at its deadline, nothing may stay charged in the ledger, the
reversal must reach the acquirer, and the link must serve the next purchase."""

from __future__ import annotations

from pathlib import Path

import trio

from switch.ledger.model import EntryKind
from switch.server.testbed import ALPHA_BIN, card
from tests.e2e.harness import running_switch, signed_on, trio_test

FAULTY = card(ALPHA_BIN, 77)
GOOD = card(ALPHA_BIN, 3)
#: TEST-ONLY double-length MAC key shared by the switch and the simulated acquirers.
LINK_MAC_KEY_HEX = "0123456789ABCDEFFEDCBA9876543210"


async def wait_for(predicate, timeout_s: float = 8.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


def charged_and_not_reversed(drafts) -> list[str]:
    reversed_rrns = {d.original_rrn for d in drafts if d.kind is EntryKind.REVERSAL}
    return [
        d.rrn
        for d in drafts
        if d.kind is EntryKind.PURCHASE and d.response_code == "00" and d.rrn not in reversed_rrns
    ]


async def _fault_then_recover(tmp_path: Path, fault: str, *, mac: bool = False) -> None:
    link_mac = {"mac_key_hex": LINK_MAC_KEY_HEX} if mac else {}
    sims = {"alpha": {"card_faults": {FAULTY: fault}, **link_mac}, "beta": {**link_mac}}
    async with running_switch(tmp_path, sims=sims, acquirer=link_mac) as h, signed_on(h) as term:
        alpha = h.sims["alpha"].records
        approved_rrns: list[str] = []
        if mac:  # the MACed link carries ordinary traffic both ways
            first = await term.purchase(GOOD, 500)
            assert first.response_code == "00"
            approved_rrns.append(first.rrn)
        reversals_before = len(alpha.reversals)

        r = await term.purchase(FAULTY, 4_321)

        assert r.response_code == "68"
        await wait_for(lambda: len(alpha.reversals) > reversals_before)  # delivered via SAF
        assert charged_and_not_reversed(h.ledger_drafts()) == approved_rrns  # the 68 left no charge
        after = await term.purchase(GOOD, 1_000)  # the link (re)connected and serves again
        assert after.response_code == "00"
        assert term.unmatched == 0  # the terminal never saw a second answer


@trio_test
async def test_acquirer_disconnect_mid_request(tmp_path: Path) -> None:
    await _fault_then_recover(tmp_path, "disconnect")


@trio_test
async def test_acquirer_garbage_frame(tmp_path: Path) -> None:
    await _fault_then_recover(tmp_path, "garbage")


@trio_test
async def test_macd_acquirer_link_drops_an_answer_with_a_wrong_mac(tmp_path: Path) -> None:
    await _fault_then_recover(tmp_path, "wrong_mac", mac=True)
