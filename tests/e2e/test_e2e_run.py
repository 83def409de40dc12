"""The shipped switch.toml runs (with its TEST keys), `switch run` explains a missing key, and the
metrics endpoint serves the transactions a terminal made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import trio

from switch.config import load_config
from switch.server.app import serve
from switch.server.testbed import ALPHA_BIN, card
from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig
from switch.sim.terminal import TerminalSim, TerminalSimConfig
from tests.e2e.harness import running_switch, signed_on, trio_test

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "switch.toml"


def _sample_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip("# ").strip()
        if line.startswith("export SWITCH_"):
            k, v = line.removeprefix("export ").split("=", 1)
            env[k] = v
    return env


def test_run_without_kek_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCH_")}
    p = subprocess.run(
        [sys.executable, "-m", "switch", "run", "--config", str(SAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "SWITCH_KEK" in p.stderr


@trio_test
async def test_sample_config_serves_its_demo_terminal(tmp_path: Path, monkeypatch=None) -> None:
    text = SAMPLE.read_text()
    env = _sample_env(text)
    assert set(env) == {"SWITCH_KEK", "SWITCH_CHECKPOINT_KEY", "SWITCH_PAN_HASH_KEY", "SWITCH_ADMIN_TOKEN"}
    os.environ.update(env)
    try:
        cfg = load_config(SAMPLE)
        async with trio.open_nursery() as nursery:
            sim = AcquirerSim(AcquirerSimConfig(name="alpha"))
            port = await nursery.start(sim.serve)
            data = msgspec.to_builtins(cfg)
            for lc in data["listeners"]:
                lc["port"] = 0
            for ac in data["acquirers"]:
                ac["port"] = port
            data["store_forward"]["path"] = str(tmp_path / "saf.db")
            data["ledger"]["path"] = str(tmp_path / "ledger.db")
            data["server"]["armed_path"] = str(tmp_path / "armed.db")
            data["server"]["rrn_path"] = str(tmp_path / "rrn.hwm")
            data["metrics"]["port"] = 0
            data["admin"]["port"] = 0
            cfg = msgspec.convert(data, type(cfg))
            ports = await nursery.start(serve, cfg)
            with trio.fail_after(5):
                while sim.records.sign_ons < 4:
                    await trio.sleep(0.01)
            term_cfg = TerminalSimConfig(
                port=ports.listeners["pos-ascii"],
                terminal_id="TERM0001",
                merchant_id="MERCHANT0000001",
                master_key_hex="239E9176D6080DAE1F57CDF449465204",
            )
            async with TerminalSim.connect(term_cfg) as term:
                assert (await term.sign_on()).response_code == "00"
                assert (await term.purchase(card(ALPHA_BIN, 1), 990)).response_code == "00"
            # `switch run` serves the admin API: the demo terminal is in the registry, in service.
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{ports.admin}",
                headers={"Authorization": f"Bearer {env['SWITCH_ADMIN_TOKEN']}"},
            ) as api:
                r = await api.get("/terminals/TERM0001")
                assert r.status_code == 200 and r.json()["state"] == "active", r.text
                assert (
                    await api.get("/terminals/TERM0001", headers={"Authorization": ""})
                ).status_code == 401
            nursery.cancel_scope.cancel()
    finally:
        for k in env:
            os.environ.pop(k, None)


@trio_test
async def test_metrics_endpoint_counts_transactions(tmp_path: Path) -> None:
    async with running_switch(tmp_path, metrics_enabled=True) as h, signed_on(h) as term:
        assert (await term.purchase(card(ALPHA_BIN, 1), 10)).response_code == "00"
        stream = await trio.open_tcp_stream("127.0.0.1", h.ports.metrics)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b""
        while chunk := await stream.receive_some(65536):
            body += chunk
        text = body.decode()
        assert text.startswith("HTTP/1.1 200")
        assert 'switch_transactions_total{mti="0200",processing_code="00",response_code="00"} 1.0' in text
        assert 'switch_acquirer_up{acquirer="alpha"} 1.0' in text
        assert "switch_terminal_latency_seconds_bucket" in text
        assert "switch_ledger_commit_latency_seconds_count" in text
        assert "4000000" not in text.split("\r\n\r\n", 1)[1]  # no PAN digits anywhere
