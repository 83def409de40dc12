"""Acquirer simulator over real TCP on 127.0.0.1: rules, reversals, in-flight order, every fault mode."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from switch.codec.wire import WireError
from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig, Fault
from tests.sim.simclient import MAC_KEY, Client, trio_test

PAN = "4111111111111111"
POOR = "4000000000000002"
BLOCKED = "4000000000000010"
_stan = itertools.count(1)


def purchase(
    pan: str = PAN, amount: int = 1000, pc: str = "000000", rrn: str | None = None
) -> dict[str, Any]:
    stan = f"{next(_stan):06d}"
    return {
        "t": "0200",
        "2": pan,
        "3": pc,
        "4": f"{amount:012d}",
        "7": "1122334455",
        "11": stan,
        "37": rrn or f"RRN{stan:>09}",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
    }


async def run_with(config: AcquirerSimConfig, body) -> AcquirerSim:
    sim = AcquirerSim(config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        client = await Client.connect(port, config.mac_key_hex)
        try:
            await body(sim, client)
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
    return sim


BASE = AcquirerSimConfig(
    approve_max_minor=100_000, declined_pans=[BLOCKED], balances={POOR: 500}, mac_key_hex=MAC_KEY
)


@trio_test
async def test_sign_on_echo_and_rules() -> None:
    async def body(sim: AcquirerSim, c: Client) -> None:
        on = await c.request({"t": "0800", "7": "1122334455", "11": "000001", "70": "001"})
        assert (on["t"], on["39"], on["11"], on["70"]) == ("0810", "00", "000001", "001")
        assert (await c.request({"t": "0800", "11": "000002", "70": "301"}))["39"] == "00"
        ok = await c.request(purchase(amount=1234))
        assert ok["t"] == "0210" and ok["39"] == "00" and len(ok["38"]) == 6
        assert (await c.request(purchase(amount=100_001)))["39"] == "61"
        assert (await c.request(purchase(BLOCKED)))["39"] == "05"
        assert (await c.request(purchase(POOR, 600)))["39"] == "51"
        assert (await c.request(purchase(POOR, 400)))["39"] == "00"
        assert sim.balance(POOR) == 100
        inquiry = await c.request(purchase(POOR, 0, pc="310000"))
        assert inquiry["39"] == "00" and inquiry["54"].endswith("C000000000100")

    sim = await run_with(BASE, body)
    assert sim.records.sign_ons == 1 and sim.records.echoes == 1
    assert sim.records.answers[("0200", "00")] == 3


@trio_test
async def test_reversal_is_idempotent_and_restores_the_balance() -> None:
    async def body(sim: AcquirerSim, c: Client) -> None:
        p = purchase(POOR, 300, rrn="000000000777")
        assert (await c.request(p))["39"] == "00"
        assert sim.balance(POOR) == 200
        rev = {**p, "t": "0400", "11": "000900"}
        assert (await c.request(rev))["t"] == "0410"
        assert (await c.request({**rev, "t": "0401"}))["39"] == "00"
        assert sim.balance(POOR) == 500
        unknown = await c.request({**rev, "37": "000000000999", "11": "000901"})
        assert unknown["39"] == "00"

    sim = await run_with(BASE, body)
    assert sim.records.reversals == ["000000000777"]
    assert sim.records.reversal_requests == 3 and sim.records.unknown_reversals == 1
    assert sim.records.approved["000000000777"].reversed


@trio_test
async def test_advice_and_settlement_are_acknowledged() -> None:
    async def body(sim: AcquirerSim, c: Client) -> None:
        adv = {**purchase(amount=50), "t": "0220"}
        assert (await c.request(adv))["t"] == "0230"
        assert (await c.request({**adv, "t": "0221"}))["39"] == "00"
        settle = {"t": "0500", "7": "1122334455", "11": "000777", "41": "TERM0001", "74": "0000000003"}
        assert (await c.request(settle))["t"] == "0510"

    sim = await run_with(BASE, body)
    assert len(sim.records.advices) == 2 and len(sim.records.settlements) == 1


@trio_test
async def test_many_in_flight_answers_leave_in_latency_order() -> None:
    cfg = AcquirerSimConfig(latency_distribution="uniform", latency_min_ms=0, latency_max_ms=60, seed=3)

    async def body(sim: AcquirerSim, c: Client) -> None:
        reqs = [purchase(amount=i + 1) for i in range(20)]
        for r in reqs:
            await c.send(r)
        got = [(await c.receive())["11"] for _ in reqs]
        assert sorted(got) == sorted(r["11"] for r in reqs)
        assert got != [r["11"] for r in reqs]

    await run_with(cfg, body)


@trio_test
async def test_no_answer_fault_processes_but_stays_silent() -> None:
    cfg = AcquirerSimConfig(card_faults={POOR: Fault.NO_ANSWER})

    async def body(sim: AcquirerSim, c: Client) -> None:
        await c.send(purchase(POOR, 10, rrn="000000000001"))
        assert (await c.request(purchase(PAN)))["2"] == PAN
        assert (await c.request({"t": "0800", "11": "000003", "70": "301"}))["t"] == "0810"
        assert not c.frames
        assert "000000000001" in sim.records.approved  # money moved: the switch must reverse

    sim = await run_with(cfg, body)
    assert sim.records.faults == {"no_answer": 1}


@trio_test
async def test_late_fault_answers_after_later_requests() -> None:
    cfg = AcquirerSimConfig(card_faults={POOR: Fault.LATE}, late_ms=300)

    async def body(sim: AcquirerSim, c: Client) -> None:
        late = purchase(POOR, 10)
        await c.send(late)
        await c.send(purchase(PAN))
        first, second = await c.receive(), await c.receive()
        assert first["2"] == PAN and second["11"] == late["11"] and second["39"] == "00"

    await run_with(cfg, body)


@trio_test
async def test_disconnect_fault_closes_the_connection() -> None:
    cfg = AcquirerSimConfig(fault=Fault.DISCONNECT)

    async def body(sim: AcquirerSim, c: Client) -> None:
        assert (await c.request({"t": "0800", "11": "000001", "70": "001"}))["39"] == "00"  # not faulted
        await c.send(purchase())
        assert await c.next_payload() is None

    sim = await run_with(cfg, body)
    assert sim.records.faults == {"disconnect": 1}


@trio_test
async def test_garbage_fault_sends_an_undecodable_frame() -> None:
    cfg = AcquirerSimConfig(card_faults={POOR: Fault.GARBAGE})

    async def body(sim: AcquirerSim, c: Client) -> None:
        await c.send(purchase(POOR))
        payload = await c.next_payload()
        assert payload is not None
        with pytest.raises(WireError):
            c.wire.decode(payload)
        assert (await c.request(purchase()))["39"] == "00"  # connection still usable

    await run_with(cfg, body)


@trio_test
async def test_wrong_mac_fault_and_requests_with_bad_mac_are_dropped() -> None:
    cfg = AcquirerSimConfig(mac_key_hex=MAC_KEY, card_faults={POOR: Fault.WRONG_MAC})

    async def body(sim: AcquirerSim, c: Client) -> None:
        await c.send(purchase(POOR))
        fields, mac_ok = c.wire.decode_verified(await c.next_payload(), c.mac_fn)
        assert fields["39"] == "00" and not mac_ok
        await c.stream.send_all(c.wire.frame(c.wire.encode(purchase(), c.mac_fn, wrong_mac=True)))
        assert (await c.request({"t": "0800", "11": "000009", "70": "301"}))["t"] == "0810"
        assert not c.frames and sim.records.bad_macs == 1

    await run_with(cfg, body)


@trio_test
async def test_per_run_fault_rate_is_seeded() -> None:
    def faults(seed: int) -> list[bool]:
        sim = AcquirerSim(AcquirerSimConfig(fault=Fault.NO_ANSWER, fault_rate=0.3, seed=seed))
        return [sim.fault_for({"t": "0200", "2": PAN}) is Fault.NO_ANSWER for _ in range(200)]

    assert faults(1) == faults(1)
    assert 30 <= sum(faults(1)) <= 90
    sim = AcquirerSim(AcquirerSimConfig(fault=Fault.NO_ANSWER))
    assert sim.fault_for({"t": "0400", "2": PAN}) is Fault.NONE  # reversals are never faulted by default


@trio_test
async def test_oversized_frame_closes_the_connection() -> None:
    cfg = AcquirerSimConfig(max_frame_bytes=64)

    async def body(sim: AcquirerSim, c: Client) -> None:
        await c.stream.send_all((1000).to_bytes(2, "big") + b"x" * 1000)
        assert await c.next_payload() is None

    await run_with(cfg, body)
