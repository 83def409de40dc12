"""The listener's in-flight window per connection (ListenerConfig.max_inflight_per_connection), over TCP
against the real switch: a terminal that pipelines more requests than the window gets them all answered,
but the switch takes (and forwards to the acquirer) no more than the window at a time; the rest wait
unread (in the connection's backlog, then in the socket) so TCP pushes back on the terminal."""

from __future__ import annotations

from pathlib import Path

import trio

from switch.server.testbed import ALPHA_BIN, card
from switch.sim.terminal import TerminalSim
from tests.e2e.harness import running_switch, trio_test

WINDOW = 2
REQUESTS = 6
#: The acquirer holds every answer this long, so the window stays full while we look.
ACQUIRER_DELAY_MS = 1_000


def authorisations_seen(h) -> int:
    return sum(n for (mti, _), n in h.sims["alpha"].records.answers.items() if mti == "0200")


@trio_test
async def test_requests_beyond_the_window_wait_and_are_all_answered(tmp_path: Path) -> None:
    sims = {"alpha": {"latency_ms": ACQUIRER_DELAY_MS}, "beta": {}}
    async with running_switch(
        tmp_path,
        sims=sims,
        packed_listener=False,
        listener={"max_inflight_per_connection": WINDOW},
        acquirer={"request_timeout_ms": 20_000},
        processing={"terminal_deadline_ms": 20_000},
    ) as h:
        async with TerminalSim.connect(h.terminal_config(0)) as term:
            assert (await term.sign_on()).response_code == "00"
            # The simulator delays its sign-on answers too: wait until alpha's links are up.
            with trio.fail_after(10):
                while (await term.purchase(card(ALPHA_BIN, 99), 1)).response_code != "00":
                    await trio.sleep(0.05)
            before = authorisations_seen(h)
            results = []

            async def buy(n: int) -> None:
                results.append(await term.purchase(card(ALPHA_BIN, n), 100 + n))

            async with trio.open_nursery() as nursery:
                for n in range(REQUESTS):
                    nursery.start_soon(buy, n)
                with trio.fail_after(10):  # a hang guard
                    while authorisations_seen(h) < before + WINDOW:
                        await trio.sleep(0.01)
                # The first WINDOW are at the acquirer for ACQUIRER_DELAY_MS; nothing else was taken.
                await trio.sleep(ACQUIRER_DELAY_MS / 1000 / 3)
                assert authorisations_seen(h) == before + WINDOW
                assert len(results) == 0
            assert sorted(r.response_code for r in results) == ["00"] * REQUESTS
            assert authorisations_seen(h) == before + REQUESTS
            assert term.unmatched == 0
        drafts = [d for d in h.ledger_drafts() if d.kind == "purchase"]
        assert len(drafts) == REQUESTS + 1
