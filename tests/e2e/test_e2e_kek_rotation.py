"""KEK rotation on a live switch, following docs/operations.md ("Rotating the KEK") step by step, with
`switch run` and `switch keys ...` as separate processes on one config file.

Sealed state under KEK A before the rotation: the terminal master keys and both acquirer link MAC keys
in the config, and a reversal pending in store-and-forward (a purchase the acquirer never answered,
nor its reversal). Then: `generate-kek` B; the config names B current and A previous (`switch keys
check` now fails: nothing is under B yet); the switch starts on it (re-sealing the SAF record at start),
terminals sign on and transact over MACed links; `switch keys reseal --skip-stores` while it runs; stop;
`switch keys check` passes. Finally A is dropped from the config and its file destroyed: the switch
starts on B alone, the old SAF reversal drains to the acquirer, terminals transact, the ledger holds each
approval once, and `switch keys check` still passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import trio

from switch.codec import keys as keymod
from switch.config import KeysConfig, SwitchConfig, load_config
from switch.ledger.model import EntryKind
from switch.routing.store_forward import StoreForward
from switch.server.testbed import ALPHA_BIN, BETA_BIN, build, card
from switch.sim.terminal import TerminalSim
from tests.e2e.harness import FAST, Harness, trio_test
from tests.e2e.test_e2e_restart import (
    _free_port,
    _signed_on_purchase,
    _sim,
    _start_switch,
    _terminal,
    _wait_for,
    _write_config,
)

ROOT = Path(__file__).resolve().parents[2]
LINK_KEY_HEX = "0123456789ABCDEFFEDCBA9876543210"  # TEST link MAC key (switch.toml's)
SILENT = card(ALPHA_BIN, 90)  # neither it nor its reversals answered by the first acquirer
GOOD = card(ALPHA_BIN, 1)
OTHER = card(BETA_BIN, 1)
DEADLINE_MS = 1_500


async def keys_command(*argv: str) -> tuple[int, str]:
    """`switch keys ...` in its own process, as an operator runs it; (exit status, stdout+stderr)."""
    done = await trio.run_process(
        [sys.executable, "-m", "switch", "keys", *argv],
        cwd=ROOT,
        capture_stdout=True,
        stderr=subprocess.STDOUT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return done.returncode, done.stdout.decode()


def _saf(config: SwitchConfig) -> list[Any]:
    """Pending SAF items, opened with `config`'s KEK(s)."""
    saf = StoreForward.open(config.store_forward, kek=keymod.load_kek(config.keys))
    try:
        return saf.due(2**62, 1_000)
    finally:
        saf.close()


async def _stop(proc: trio.Process) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful: the ledger's last batch, SAF and armed files closed
    with trio.fail_after(30):  # a hang guard
        await proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s.upper() in text.upper()]


@trio_test
async def test_kek_rotation_on_a_live_switch(tmp_path: Path) -> None:
    config_path, log_path = tmp_path / "switch.toml", tmp_path / "switch.log"
    ok_line = "check OK: everything opens under the current KEK"
    stan_file = str(tmp_path / "term0.stan")
    silent = {"card_faults": {SILENT: "no_answer"}, "fault_mtis": ["0200", "0400", "0401"]}
    async with trio.open_nursery() as outer:
        beta = _sim("beta", mac_key_hex=LINK_KEY_HEX)
        beta_port = await outer.start(beta.serve)
        first_alpha = trio.CancelScope()
        alpha1 = _sim("alpha", mac_key_hex=LINK_KEY_HEX, **silent)

        async def serve_alpha1(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with first_alpha:
                await alpha1.serve(task_status=task_status)

        alpha_port = await outer.start(serve_alpha1)
        config, terminals = build(
            tmp_path,
            {"alpha": alpha_port, "beta": beta_port},
            packed_listener=False,
            processing={"terminal_deadline_ms": DEADLINE_MS},
            acquirer={**FAST, "request_timeout_ms": DEADLINE_MS, "mac_key_hex": LINK_KEY_HEX},
            listener={"port": _free_port()},
        )
        assert all(a.mac_key_sealed_hex for a in config.acquirers)  # links MACed, keys sealed under A
        _write_config(config, config_path)
        kek_a_file = Path(config.keys.kek_file)
        kek_a = keymod.load_kek(config.keys)
        port = config.listeners[0].port
        term_cfg = _terminal(config, terminals[0], port, stan_file)

        # --- life 1, KEK A: a terminal signed on, an approval, a reversal left in SAF ------------------
        proc = await _start_switch(config_path, port, log_path)
        try:
            async with TerminalSim.connect(term_cfg) as term:
                assert (await term.sign_on()).response_code == "00"
                ok1 = await _signed_on_purchase(term, GOOD, 1_000)
                assert ok1.response_code == "00"
                timed_out = await term.purchase(SILENT, 2_000)
                assert timed_out.response_code == "68"
                await _wait_for(lambda: alpha1.records.reversal_requests >= 1)  # sent, never answered
        finally:
            await _stop(proc)
        owed = _saf(config)
        assert [i.fields.get("37") for i in owed] == [timed_out.rrn]

        # --- step 1: a new KEK B in a 0600 file ---------------------------------------------------------
        kek_b_file = tmp_path / "kek-2.hex"
        code, out = await keys_command("generate-kek", "--out", str(kek_b_file))
        assert code == 0, out
        kek_b = keymod.load_kek(KeysConfig(kek_file=str(kek_b_file)), {})
        assert kek_b.check_value in out and kek_b.check_value != kek_a.check_value

        # --- step 2: B current, A previous. Nothing is under B yet, so `check` fails ----------------------
        rotating = msgspec.structs.replace(
            config, keys=KeysConfig(kek_file=str(kek_b_file), previous_kek_files=[str(kek_a_file)])
        )
        _write_config(rotating, config_path)
        code, out = await keys_command("check", "--config", str(config_path))
        assert code == 1 and "check FAILED" in out, out
        assert "NOT UNDER THE CURRENT KEK" in out, out

        # --- steps 3-4, the short-downtime way: start at once (SAF re-sealed at start), reseal live ---
        proc = await _start_switch(config_path, port, log_path)
        try:
            async with TerminalSim.connect(term_cfg) as term:  # its TMK still sealed under A in the config
                assert (await term.sign_on()).response_code == "00"
                ok2 = await _signed_on_purchase(term, GOOD, 1_100)
                assert ok2.response_code == "00"  # over the alpha link, MAC key opened with A
                ok3 = await _signed_on_purchase(term, OTHER, 1_200)
                assert ok3.response_code == "00"  # over beta's
            code, out = await keys_command("reseal", "--config", str(config_path), "--skip-stores")
            assert code == 0, out
            assert "sealed keys re-sealed" in out and f"{ok_line} {kek_b.check_value} alone" in out, out
        finally:
            await _stop(proc)
        resealed = load_config(config_path)
        assert resealed.keys == rotating.keys  # only the sealed values changed
        for before, after in zip(config.terminals, resealed.terminals, strict=True):
            assert after.master_key_encrypted_hex != before.master_key_encrypted_hex
            assert kek_b.open(after.id, after.master_key_encrypted_hex) == kek_a.open(
                before.id, before.master_key_encrypted_hex
            )
        for acq in resealed.acquirers:
            link_key = kek_b.open_link_mac_key(acq.name, acq.mac_key_sealed_hex)
            assert link_key.value == bytes.fromhex(LINK_KEY_HEX)
        # the SAF record was re-sealed when the switch opened it with A listed as previous
        code, out = await keys_command("check", "--config", str(config_path))
        assert code == 0 and "store-and-forward" in out and "1 pending items open" in out, out

        # --- step 5: drop A (config and file); B alone from now on -----------------------------------
        final = msgspec.structs.replace(resealed, keys=KeysConfig(kek_file=str(kek_b_file)))
        _write_config(final, config_path)
        kek_a_file.unlink()
        assert [i.fields.get("37") for i in _saf(final)] == [timed_out.rrn]  # opens under B alone

        first_alpha.cancel()  # the acquirer comes back healthy on the same port
        await _wait_for(lambda: first_alpha.cancelled_caught)
        alpha2 = _sim("alpha", alpha_port, mac_key_hex=LINK_KEY_HEX)
        await outer.start(alpha2.serve)
        proc = await _start_switch(config_path, port, log_path)
        try:
            await _wait_for(lambda: alpha2.records.reversal_requests >= 1)
            await _wait_for(lambda: not _saf(final))  # the reversal sealed under A drained under B
            async with TerminalSim.connect(term_cfg) as term:
                assert (await term.sign_on()).response_code == "00"
                ok4 = await _signed_on_purchase(term, GOOD, 1_300)
                assert ok4.response_code == "00"
            code, out = await keys_command("check", "--config", str(config_path), "--skip-stores")
            assert code == 0, out
        finally:
            await _stop(proc)
        code, out = await keys_command("check", "--config", str(config_path))
        assert code == 0 and f"{ok_line} {kek_b.check_value} alone" in out, out
        outer.cancel_scope.cancel()

    assert alpha2.records.reversal_requests == alpha2.records.unknown_reversals == 1  # the owed one
    drafts = Harness(final, terminals, None, {}, tmp_path, None).ledger_drafts()
    purchases = sorted(d.rrn for d in drafts if d.kind is EntryKind.PURCHASE)
    assert purchases == sorted([ok1.rrn, ok2.rrn, ok3.rrn, ok4.rrn])  # each approval posted once
    log = log_path.read_text(errors="replace")
    secrets = [LINK_KEY_HEX, terminals[0].master_key_hex, GOOD, SILENT, OTHER]
    secrets += [Path(kek_b_file).read_text().strip()]
    assert not _leaks(log, secrets)
