"""A switch restart after a crash, end to end: `switch run` in its own process, killed with SIGKILL while
it owes an acquirer things, then started again on the same files.

Before the kill: a purchase whose acquirer answers neither it nor its reversals times out (68) and leaves
a reversal pending in store-and-forward; a second purchase is at the acquirer (its pre-stored reversal
armed, no outcome anywhere) when the process dies. After the restart, against a healthy acquirer on the
same port: the pending reversal is delivered (as a repeat), the armed one fires and is delivered, the
ledger holds each approval once, and a terminal that signs on again is served.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import msgspec
import trio

from switch.codec import keys as keymod
from switch.ledger.model import EntryKind
from switch.routing.store_forward import StoreForward
from switch.server.testbed import ALPHA_BIN, build, card
from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig
from switch.sim.terminal import TerminalError, TerminalSim, TerminalSimConfig
from tests.e2e.harness import FAST, Harness, trio_test

ROOT = Path(__file__).resolve().parents[2]
SILENT = card(ALPHA_BIN, 90)  # never answered, nor its reversals, by the first acquirer
PENDING = card(ALPHA_BIN, 91)  # at the acquirer, unanswered, when the switch is killed
GOOD = card(ALPHA_BIN, 1)
DEADLINE_MS = 1_500


def _toml_value(v: Any) -> str:
    """TOML for a config value, inline tables only (enough for a SwitchConfig)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"


def _write_config(config: Any, path: Path) -> None:
    data = msgspec.to_builtins(config)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items() if v is not None))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sim(name: str, port: int = 0, **kw: object) -> AcquirerSim:
    return AcquirerSim(msgspec.convert({"name": name, "port": port, **kw}, AcquirerSimConfig))


async def _wait_for(predicate, timeout_s: float = 15.0) -> None:
    with trio.fail_after(timeout_s):  # a hang guard, not a speed assertion
        while not predicate():
            await trio.sleep(0.02)


async def _start_switch(config_path: Path, port: int, log_path: Path) -> trio.Process:
    log = open(log_path, "ab")  # noqa: SIM115 -- the process owns it until it exits
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "switch", "run", "--config", str(config_path)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    log.close()
    with trio.fail_after(30):
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"switch exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return proc
            except OSError:
                await trio.sleep(0.05)


async def _signed_on_purchase(term: TerminalSim, pan: str, amount: int):
    """A purchase, retried while the switch's acquirer links are still signing on (91)."""
    with trio.fail_after(15):
        while (r := await term.purchase(pan, amount)).response_code == "91":
            await trio.sleep(0.05)
    return r


def _seen(sim: AcquirerSim, pan: str) -> bool:
    return any(a.pan == pan for a in sim.records.approved.values())


def _terminal(config: Any, t: Any, port: int, stan_path: str) -> TerminalSimConfig:
    return TerminalSimConfig(
        port=port,
        profile=config.listeners[0].profile,
        terminal_id=t.terminal_id,
        merchant_id=t.merchant_id,
        master_key_hex=t.master_key_hex,
        stan_path=stan_path,
    )


def _pending_saf(config: Any) -> list:
    saf = StoreForward.open(config.store_forward, kek=keymod.load_kek(config.keys))
    try:
        return saf.due(2**62, 1_000)
    finally:
        saf.close()


@trio_test
async def test_crash_restart_delivers_what_was_owed_and_terminals_carry_on(tmp_path: Path) -> None:
    faulty = {"card_faults": {SILENT: "no_answer", PENDING: "no_answer"},
              "fault_mtis": ["0200", "0400", "0401"]}  # fmt: skip
    stan_file = str(tmp_path / "term0.stan")
    config_path, log_path = tmp_path / "switch.toml", tmp_path / "switch.log"
    async with trio.open_nursery() as outer:
        beta = _sim("beta")
        beta_port = await outer.start(beta.serve)

        # --- first life: the acquirer answers neither PENDING/SILENT nor their reversals ---------------
        async with trio.open_nursery() as first_acquirer:
            alpha1 = _sim("alpha", **faulty)
            alpha_port = await first_acquirer.start(alpha1.serve)
            config, terminals = build(
                tmp_path,
                {"alpha": alpha_port, "beta": beta_port},
                packed_listener=False,
                processing={"terminal_deadline_ms": DEADLINE_MS},
                acquirer={**FAST, "request_timeout_ms": DEADLINE_MS},
                listener={"port": _free_port()},
            )
            _write_config(config, config_path)
            port = config.listeners[0].port
            proc = await _start_switch(config_path, port, log_path)
            try:
                async with TerminalSim.connect(_terminal(config, terminals[0], port, stan_file)) as term:
                    assert (await term.sign_on()).response_code == "00"
                    ok = await _signed_on_purchase(term, GOOD, 1_000)
                    assert ok.response_code == "00"
                    timed_out = await term.purchase(SILENT, 2_000)
                    assert timed_out.response_code == "68"
                    await _wait_for(lambda: alpha1.records.reversal_requests >= 1)  # sent, unanswered

                    async def doomed() -> None:
                        try:
                            await term.purchase(PENDING, 3_000)
                        except TerminalError:
                            pass  # the switch dies before answering

                    async with trio.open_nursery() as n:
                        n.start_soon(doomed)
                        await _wait_for(lambda: _seen(alpha1, PENDING))
                        proc.send_signal(signal.SIGKILL)  # a crash: no shutdown code runs
                        await proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
            first_acquirer.cancel_scope.cancel()

        owed = _pending_saf(config)
        assert [i.fields.get("37") for i in owed] == [timed_out.rrn]  # the armed one is not in SAF yet
        pending_rrn = next(a.rrn for a in alpha1.records.approved.values() if a.pan == PENDING)

        # --- second life: the acquirer is back, healthy, on the same port -----------------------------
        alpha2 = _sim("alpha", alpha_port)
        await outer.start(alpha2.serve)
        proc = await _start_switch(config_path, port, log_path)
        try:
            await _wait_for(lambda: alpha2.records.reversal_requests >= 2)
            await _wait_for(lambda: not _pending_saf(config))
            async with TerminalSim.connect(_terminal(config, terminals[0], port, stan_file)) as term:
                unsigned = await term.purchase(GOOD, 1_100)
                assert unsigned.response_code in ("A0", "91")  # working keys do not survive a restart
                assert (await term.sign_on()).response_code == "00"
                again = await _signed_on_purchase(term, GOOD, 1_200)
                assert again.response_code == "00"
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: the ledger's last batch and checkpoint
            with trio.fail_after(30):
                await proc.wait()
        outer.cancel_scope.cancel()

    # Both reversals reached the new host (it never saw the originals: unknown to it, answered 00).
    assert alpha2.records.reversal_requests == alpha2.records.unknown_reversals == 2
    drafts = Harness(config, terminals, None, {}, tmp_path, None).ledger_drafts()
    purchases = sorted(d.rrn for d in drafts if d.kind is EntryKind.PURCHASE)
    assert purchases == sorted([ok.rrn, again.rrn])  # each approval posted once
    assert timed_out.rrn in {d.rrn for d in drafts if d.kind is EntryKind.DECLINE}
    assert pending_rrn not in purchases  # never approved to the terminal; reversed at the acquirer
