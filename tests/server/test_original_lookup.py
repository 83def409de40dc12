"""Originals the processor no longer holds are read from the ledger on the lookup thread
(switch.server.lookups): a refund of an evicted purchase is approved against it, an unknown one is 25."""

from __future__ import annotations

from pathlib import Path

from switch.ledger.model import EntryKind
from switch.server.testbed import ALPHA_BIN, card
from switch.sim.terminal import TxnResult
from tests.e2e.harness import running_switch, signed_on, trio_test


@trio_test
async def test_refund_of_an_evicted_original_is_found_in_the_ledger(tmp_path: Path) -> None:
    async with running_switch(
        tmp_path, packed_listener=False, processing={"max_cached_originals": 1, "max_remembered_keys": 1}
    ) as h, signed_on(h) as term:
        first = await term.purchase(card(ALPHA_BIN, 1), 1_000)
        for n in range(2, 5):  # push the first out of the processor's memory
            assert (await term.purchase(card(ALPHA_BIN, n), 100 + n)).response_code == "00"
        refund = await term.refund(first, 400)
        assert refund.response_code == "00"
        unknown = TxnResult("purchase", "0210", "000999", "0101000000", "00", 50, card(ALPHA_BIN, 9),
                            "000000", "999999999999")  # fmt: skip
        assert (await term.refund(unknown, 10)).response_code == "25"
    refunds = [d for d in h.ledger_drafts() if d.kind is EntryKind.REFUND]
    assert [(d.original_rrn, d.amount_minor) for d in refunds] == [(first.rrn, 400)]
