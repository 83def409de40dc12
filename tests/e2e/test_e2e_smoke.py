"""The first path a user takes: sign on, buy something, see it in the ledger."""

from __future__ import annotations

from pathlib import Path

from switch.ledger.model import EntryKind
from switch.server.testbed import ALPHA_BIN, card
from tests.e2e.harness import running_switch, signed_on, trio_test


@trio_test
async def test_purchase_approved_and_posted(tmp_path: Path) -> None:
    async with running_switch(tmp_path) as h, signed_on(h) as term:
        r = await term.purchase(card(ALPHA_BIN, 1), 1234)
        assert r.response_code == "00"
        assert r.rrn
        drafts = [d for d in h.ledger_drafts() if d.rrn == r.rrn]
        assert [d.kind for d in drafts] == [EntryKind.PURCHASE]
        assert drafts[0].amount_minor == 1234
        assert h.sims["alpha"].records.approved[r.rrn].amount_minor == 1234
