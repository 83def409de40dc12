"""Two exchanges of one STAN that both waited for an in-flight slot: the second is refused ("already in
flight"), the first gets its own answer (regression: the second used to overwrite the first's waiter,
steal its answer and crash the terminal with a KeyError when both finished)."""

from __future__ import annotations

import pytest
import trio

from switch.sim.terminal import TerminalError, TerminalSim
from tests.sim.simclient import trio_test
from tests.sim.test_terminal_sim import PAN, FakeSwitch, with_terminal


@trio_test
async def test_same_stan_queued_behind_full_window_is_refused_not_overwritten() -> None:
    fake = FakeSwitch(silent_mti="0100")  # pre-authorisations are never answered: they hold the slots
    outcome: dict[str, object] = {}

    async def body(term: TerminalSim) -> None:
        await term.sign_on()

        async def hold() -> None:
            with pytest.raises(TerminalError, match="no answer"):
                await term.pre_auth(PAN, 1)

        async def same_stan(name: str) -> None:
            try:
                outcome[name] = await term.exchange(
                    {"t": "0200", "2": PAN, "3": "000000", "4": "000000000100", "49": "978"},
                    "purchase",
                    stan="000777",
                )
            except TerminalError as exc:
                outcome[name] = exc

        async with trio.open_nursery() as n:
            n.start_soon(hold)
            n.start_soon(hold)
            await trio.sleep(0.05)  # both slots taken
            n.start_soon(same_stan, "a")
            n.start_soon(same_stan, "b")

    await with_terminal(fake, body, max_inflight=2, request_timeout_ms=300)
    results = sorted(outcome.values(), key=lambda r: isinstance(r, TerminalError))
    answered, refused = results
    assert not isinstance(answered, TerminalError) and answered.response_code == "00"
    assert isinstance(refused, TerminalError) and "already in flight" in str(refused)
