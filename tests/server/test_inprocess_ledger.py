"""`server.ledger_writer_process = false`: the ledger writer as a thread of the switch and the armed
reversals in the durable-writer thread -- the same behaviour over TCP as the default (ledger process):
approvals posted once, a timeout reversed through store-and-forward."""

from __future__ import annotations

from pathlib import Path

import trio

from switch.ledger.model import EntryKind
from switch.server.testbed import ALPHA_BIN, card
from tests.e2e.harness import running_switch, signed_on, trio_test

SILENT = card(ALPHA_BIN, 90)


@trio_test
async def test_in_process_ledger_and_arms(tmp_path: Path) -> None:
    sims = {"alpha": {"card_faults": {SILENT: "no_answer"}}, "beta": {}}
    async with running_switch(
        tmp_path, sims=sims, packed_listener=False, server={"ledger_writer_process": False}
    ) as h, signed_on(h) as term:
        ok = await term.purchase(card(ALPHA_BIN, 1), 1_000)
        assert ok.response_code == "00"
        timed_out = await term.purchase(SILENT, 2_000)
        assert timed_out.response_code == "68"
        alpha = h.sims["alpha"].records
        with trio.fail_after(10):  # a hang guard
            while len(alpha.reversals) < 1:
                await trio.sleep(0.02)
        drafts = h.ledger_drafts()
        assert [d.rrn for d in drafts if d.kind is EntryKind.PURCHASE] == [ok.rrn]
        assert timed_out.rrn in {d.rrn for d in drafts if d.kind is EntryKind.DECLINE}
