"""End-to-end harness: the real switch (switch.server.app.serve), two acquirer simulators and terminal
simulators over TCP on 127.0.0.1 port 0, on a fresh SQLite ledger in a temp directory."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio

from switch.config import AdminConfig, MerchantServicesConfig
from switch.server.app import SwitchPorts, serve
from switch.server.testbed import TestTerminal, build
from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig
from switch.sim.terminal import TerminalSim, TerminalSimConfig

#: Admin API token of test switches (a throw-away value set in this process's environment).
ADMIN_TOKEN = "e2e-admin-token"
ADMIN_TOKEN_ENV = "SWITCH_E2E_ADMIN_TOKEN"

#: Short deadlines so timeouts are tested in well under a second.
FAST = {
    "request_timeout_ms": 400,
    "echo_interval_ms": 60_000,
    "reconnect_backoff_min_ms": 50,
    "reconnect_backoff_max_ms": 200,
}


class Harness(msgspec.Struct):
    config: Any
    terminals: list[TestTerminal]
    ports: SwitchPorts
    sims: dict[str, AcquirerSim]
    directory: Path
    cancel: Any

    def terminal_config(self, index: int = 0, **kw: Any) -> TerminalSimConfig:
        t = self.terminals[index]
        listener = next(lc for lc in self.config.listeners if lc.name == t.listener)
        return TerminalSimConfig(
            port=self.ports.listeners[t.listener],
            profile=listener.profile,
            tpdu_hex="6000030000" if listener.tpdu else "",
            terminal_id=t.terminal_id,
            merchant_id=t.merchant_id,
            master_key_hex=t.master_key_hex,
            **kw,
        )

    def ledger_drafts(self) -> list[Any]:
        from switch.ledger.codec import decode_draft
        from switch.ledger.sqlite import SqliteBackend

        b = SqliteBackend(self.config.ledger.path, create=False)
        try:
            return [decode_draft(r.body) for r in b.iter_entry_rows(0)]
        finally:
            b.close()


@asynccontextmanager
async def running_switch(
    tmp_path: Path,
    *,
    sims: dict[str, dict[str, Any]] | None = None,
    processing: dict[str, Any] | None = None,
    acquirer: dict[str, Any] | None = None,
    acquirer_overrides: dict[str, dict[str, Any]] | None = None,
    listener: dict[str, Any] | None = None,
    metrics_enabled: bool = False,
    wait_up: bool = True,
    extra_acquirers: dict[str, int] | None = None,
    clock_ms: Callable[[], int] | None = None,
    admin: bool = False,
    merchant_services: dict[str, Any] | None = None,
    **build_kw: Any,
) -> AsyncIterator[Harness]:
    """`extra_acquirers`: configured acquirers with NO simulator (name -> position among acquirers),
    i.e. hosts that are down: their port is one that was bound and closed, so connects are refused.
    `clock_ms`: the switch's wall clock (move it to cross days); `admin`: serve the admin API on a free
    port with the token ADMIN_TOKEN (Harness.ports.admin); `merchant_services`: MerchantServicesConfig
    overrides."""
    sims = sims if sims is not None else {"alpha": {}, "beta": {}}
    async with trio.open_nursery() as nursery:
        running: dict[str, AcquirerSim] = {}
        ports: dict[str, int] = {}
        for name, kw in sims.items():
            sim = AcquirerSim(msgspec.convert({"name": name, **kw}, AcquirerSimConfig))
            ports[name] = await nursery.start(sim.serve)
            running[name] = sim
        for name, pos in (extra_acquirers or {}).items():
            items = list(ports.items())
            items.insert(min(pos, len(items)), (name, _dead_port()))
            ports = dict(items)
        config, terminals = build(
            tmp_path,
            ports,
            processing={"terminal_deadline_ms": 1_500, **(processing or {})},
            acquirer={**FAST, **(acquirer or {})},
            acquirer_overrides=acquirer_overrides,
            listener=listener,
            metrics_enabled=metrics_enabled,
            **build_kw,
        )
        if admin or merchant_services:
            os.environ[ADMIN_TOKEN_ENV] = ADMIN_TOKEN
            config = msgspec.structs.replace(
                config,
                admin=AdminConfig(enabled=admin, port=0, token_env=ADMIN_TOKEN_ENV),
                merchant_services=MerchantServicesConfig(**(merchant_services or {})),
            )
        switch_ports = await nursery.start(
            functools.partial(serve, config, **({"clock_ms": clock_ms} if clock_ms else {}))
        )
        h = Harness(config, terminals, switch_ports, running, tmp_path, nursery.cancel_scope)
        if wait_up:
            with trio.fail_after(5):
                while sum(s.records.sign_ons for s in running.values()) < sum(
                    a.connections for a in config.acquirers if a.name in running
                ):
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
        try:
            yield h
        finally:
            nursery.cancel_scope.cancel()


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signed_on(h: Harness, index: int = 0, **kw: Any) -> Any:
    """`async with signed_on(h, i) as term:` a connected terminal that has signed on."""

    @asynccontextmanager
    async def cm() -> AsyncIterator[TerminalSim]:
        async with TerminalSim.connect(h.terminal_config(index, **kw)) as term:
            r = await term.sign_on()
            assert r.response_code == "00", r
            yield term

    return cm()


def trio_test(fn: Callable[..., Awaitable[Any]]) -> Callable[..., None]:
    """Run an async test under trio.run (no pytest-trio plugin here)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper
