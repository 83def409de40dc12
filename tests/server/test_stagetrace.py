"""`server.stage_trace_path`: the switch writes each purchase's stage timestamps at shutdown, in the
order a purchase passes them, with no card data (bench/e2e.py --trace reads this file)."""

from __future__ import annotations

import json
from pathlib import Path

from switch.server.stagetrace import STAGES
from switch.server.testbed import ALPHA_BIN, BETA_BIN, card
from tests.e2e.harness import running_switch, signed_on, trio_test


@trio_test
async def test_stage_trace_of_purchases(tmp_path: Path) -> None:
    path = tmp_path / "stages.json"
    cards = [card(ALPHA_BIN, 1), card(BETA_BIN, 2), card(ALPHA_BIN, 3)]
    answers = []
    async with (
        running_switch(tmp_path, packed_listener=False, server={"stage_trace_path": str(path)}) as h,
        signed_on(h) as term,
    ):
        for pan in cards:
            answers.append(await term.purchase(pan, 1_000))
    assert [a.response_code for a in answers] == ["00", "00", "00"]
    data = json.loads(path.read_text())
    assert data["stages"] == list(STAGES)
    by_rrn = {t[2]: t for t in data["txns"]}
    assert set(by_rrn) == {a.rrn for a in answers}
    for txn in by_rrn.values():
        stamps = txn[3:]
        assert all(stamps), dict(zip(STAGES, stamps))
        assert stamps == sorted(stamps), dict(zip(STAGES, stamps))  # the path's order
    text = path.read_text()
    assert not any(pan in text for pan in cards)
