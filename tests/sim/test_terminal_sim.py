"""Terminal simulator against a tiny fake switch on 127.0.0.1: sign-on keys, MAC, STANs, date/time,
many in flight answered out of order, original references, settlement totals, TPDU, timeouts."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from switch.codec import keys
from switch.codec.wire import MacFn, Wire, make_mac_fn, swap_tpdu
from switch.sim.terminal import TerminalError, TerminalSim, TerminalSimConfig, parse_amount, run_mix
from tests.sim.simclient import trio_test

PAN = "4111111111111111"
TMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
PIN_KEY = keys.set_odd_parity(bytes.fromhex("1111111111111111222222222222222F"))
MAC_KEY = keys.set_odd_parity(bytes.fromhex("3333333333333333444444444444444F"))
CLOCK = dt.datetime(2026, 3, 14, 15, 9, 26)


class FakeSwitch:
    """Answers every request 00 with an RRN; answers each read's batch in reverse order; the sign-on
    answer carries fresh working keys in field 62 encrypted under the terminal's TMK."""

    def __init__(self, profile: str = "terminal_ascii", tpdu: bool = False, silent_mti: str = "") -> None:
        self.wire = Wire(profile, "binary2", tpdu=tpdu)
        self.mac_fn: MacFn | None = None
        self.received: list[dict[str, Any]] = []
        self.mac_results: list[bool] = []
        self.tpdus: list[bytes | None] = []
        self.silent_mti = silent_mti
        self.rrn = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        reader = self.wire.reader(4096)
        while data := await stream.receive_some(65536):
            out = []
            for fr in reader.feed(data):
                payload, tpdu = fr.payload, fr.tpdu
                self.tpdus.append(tpdu)
                fields, mac_ok = self.wire.decode_verified(payload, self.mac_fn)
                self.received.append(fields)
                self.mac_results.append(mac_ok)
                if fields["t"] == self.silent_mti:
                    continue
                answer = {
                    k: v for k, v in fields.items() if k in ("3", "4", "11", "12", "13", "41", "42", "70")
                }
                answer["t"] = fields["t"][:2] + str(int(fields["t"][2]) + 1) + "0"
                answer["39"] = "00"
                if fields["t"] != "0800":
                    self.rrn += 1
                    answer["37"] = f"{self.rrn:012d}"
                if fields.get("70") == "001":
                    answer["62"] = keys.build_signon_field(TMK, PIN_KEY, MAC_KEY).hex().upper()
                raw = self.wire.encode(answer, self.mac_fn)
                out.append(self.wire.frame(raw, swap_tpdu(tpdu) if tpdu else None))
                if fields.get("70") == "001":
                    self.mac_fn = make_mac_fn(MAC_KEY)
            if out:
                await stream.send_all(b"".join(reversed(out)))


async def with_terminal(fake: FakeSwitch, body, **cfg: Any) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake.serve)
        config = TerminalSimConfig(port=port, master_key_hex=TMK.hex(), **cfg)
        async with TerminalSim.connect(config, clock=lambda: CLOCK) as term:
            await body(term)
        nursery.cancel_scope.cancel()


@trio_test
async def test_sign_on_then_macd_purchase_with_stan_and_local_time() -> None:
    fake = FakeSwitch()

    async def body(term: TerminalSim) -> None:
        on = await term.sign_on()
        assert on.approved and on.mti == "0810"
        r = await term.purchase(PAN, 1234)
        assert r.approved and r.rrn == "000000000001" and r.mti == "0210"

    await with_terminal(fake, body)
    sign_on, purchase = fake.received
    assert sign_on["70"] == "001" and "64" not in sign_on and "128" not in sign_on
    assert (purchase["11"], purchase["12"], purchase["13"]) == ("000002", "150926", "0314")
    assert purchase["4"] == "000000001234" and purchase["41"] == "TERM0001" and "64" in purchase
    assert fake.mac_results == [True, True]


@trio_test
async def test_wrong_master_key_installs_nothing() -> None:
    fake = FakeSwitch()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake.serve)
        cfg = TerminalSimConfig(port=port, master_key_hex="00" * 16)
        async with TerminalSim.connect(cfg) as term:
            with pytest.raises(TerminalError, match="check value mismatch"):
                await term.sign_on()
            assert term.mac_fn is None
        nursery.cancel_scope.cancel()


@trio_test
async def test_stan_persists_across_sessions(tmp_path: Path) -> None:
    fake = FakeSwitch()
    stan_file = str(tmp_path / "term.stan")

    async def body(term: TerminalSim) -> None:
        await term.echo()
        await term.echo()

    await with_terminal(fake, body, stan_path=stan_file)
    await with_terminal(fake, body, stan_path=stan_file)
    assert [f["11"] for f in fake.received] == ["000001", "000002", "000003", "000004"]


@trio_test
async def test_many_in_flight_answered_out_of_order_are_matched_by_stan() -> None:
    fake = FakeSwitch()
    results = {}

    async def body(term: TerminalSim) -> None:
        async def one(i: int) -> None:
            results[i] = await term.purchase(PAN, 100 + i)

        async with trio.open_nursery() as n:
            for i in range(30):
                n.start_soon(one, i)

    await with_terminal(fake, body)
    assert len(results) == 30
    for i, r in results.items():
        assert r.approved and r.answer["4"] == f"{100 + i:012d}" and r.answer["11"] == r.stan


@trio_test
async def test_void_refund_completion_reversal_name_their_original() -> None:
    fake = FakeSwitch()

    async def body(term: TerminalSim) -> None:
        p = await term.purchase(PAN, 5000)
        await term.void(p)
        await term.refund(p, 1500)
        hold = await term.pre_auth(PAN, 9000)
        await term.completion(hold, 8000)
        first = await term.reversal(p)
        await term.reversal(p, repeat_of=first)
        await term.balance_inquiry(PAN)

    await with_terminal(fake, body)
    purchase, void, refund, hold, completion, rev, rev_repeat, inquiry = fake.received
    assert (void["t"], void["3"], void["37"]) == ("0200", "020000", "000000000001")
    assert (refund["3"], refund["4"], refund["37"]) == ("200000", "000000001500", "000000000001")
    assert (hold["t"], completion["t"], completion["37"], completion["4"]) == (
        "0100",
        "0220",
        "000000000004",
        "000000008000",
    )
    assert rev["t"] == "0400" and rev["11"] != purchase["11"]
    assert rev["90"] == "0200" + purchase["11"] + "0314150926" + "0" * 22
    assert rev_repeat["t"] == "0401" and rev_repeat["11"] == rev["11"]
    assert inquiry["3"] == "310000"


@trio_test
async def test_settlement_sends_totals_of_approved_transactions() -> None:
    fake = FakeSwitch()

    async def body(term: TerminalSim) -> None:
        a = await term.purchase(PAN, 1000)
        await term.purchase(PAN, 2000)
        await term.refund(a, 300)
        b = await term.purchase(PAN, 400)
        await term.void(b)
        assert (await term.settlement()).approved
        assert term.totals.lines["debits"] == [0, 0]  # reset after a balanced settlement

    await with_terminal(fake, body)
    s = fake.received[-1]
    assert s["t"] == "0500"
    # Gross lines plus reversal lines, as ISO 8583:1987 reconciliation totals count them.
    assert (s["76"], s["88"]) == ("0000000003", "0000000000003400")  # debits: three purchases
    assert (s["77"], s["89"]) == ("0000000001", "0000000000000400")  # debit reversals: the void
    assert (s["74"], s["86"]) == ("0000000001", "0000000000000300")  # credits: the refund
    assert (s["75"], s["87"]) == ("0000000000", "0000000000000000")


@trio_test
async def test_packed_profile_with_tpdu() -> None:
    fake = FakeSwitch("terminal_packed", tpdu=True)

    async def body(term: TerminalSim) -> None:
        assert (await term.purchase(PAN, 77)).approved

    await with_terminal(fake, body, profile="terminal_packed", tpdu_hex="6000030000")
    assert fake.tpdus == [bytes.fromhex("6000030000")]
    assert fake.received[0]["2"] == PAN


@trio_test
async def test_unanswered_request_times_out_with_a_clear_error() -> None:
    fake = FakeSwitch(silent_mti="0200")

    async def body(term: TerminalSim) -> None:
        with pytest.raises(TerminalError, match="no answer to 0200 STAN 000001"):
            await term.purchase(PAN, 1)
        assert (await term.echo()).approved  # the connection is still usable

    await with_terminal(fake, body, request_timeout_ms=200)


@trio_test
async def test_bad_card_input_is_refused_without_the_pan() -> None:
    fake = FakeSwitch()

    async def body(term: TerminalSim) -> None:
        with pytest.raises(TerminalError) as info:
            await term.purchase("41111111111111x1", 1)
        assert "41111111111111x1" not in str(info.value)
        with pytest.raises(TerminalError, match="field 4"):
            await term.purchase(PAN, 10**12)

    await with_terminal(fake, body)
    assert fake.received == []


@trio_test
async def test_random_mix_runs_every_kind() -> None:
    fake = FakeSwitch()

    async def body(term: TerminalSim) -> None:
        stats = await run_mix(term, [PAN, "5500000000000004"], count=120, rng=random.Random(5), concurrency=6)
        assert sum(stats.by_kind_code.values()) == 120 and stats.errors == 0
        kinds = {k.split(":")[0] for k in stats.by_kind_code}
        assert {"purchase", "refund", "void", "reversal", "balance_inquiry"} <= kinds
        assert stats.percentile_ms(0.5) <= stats.percentile_ms(0.99)

    await with_terminal(fake, body)


@pytest.mark.parametrize(("text", "minor"), [("12.34", 1234), ("0", 0), ("7", 700), ("0.5", 50)])
def test_parse_amount(text: str, minor: int) -> None:
    assert parse_amount(text) == minor


@pytest.mark.parametrize("text", ["-1", "1.234", "abc", "NaN", "1e12"])
def test_parse_amount_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="amount"):
        parse_amount(text)
