"""Wiring: open every store, build the processor, start listeners, links, timers and metrics.

`serve(config)` is the whole switch as one trio task. It is started with `nursery.start(serve, cfg)`
and reports a `SwitchPorts` (the bound port of every listener and of the metrics endpoint) once it
accepts traffic, so tests and the demo bind port 0. On cancellation it closes in order: stop
accepting, let the ledger writer commit what is queued (then its final checkpoint), close the
store-and-forward and armed-reversal files.

Start-up recovery: the processor is fed `Recovered` (ledger entries of the recovery window and of open
holds, armed reversals, RRNs with a queued reversal) before any traffic, so duplicates, voids and
refunds of earlier transactions and unresolved armed reversals survive a restart.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import trio

from switch.codec import keys as keymod
from switch.config import SwitchConfig
from switch.ledger import factory as ledger_factory
from switch.ledger import keys as ledger_keys
from switch.ledger.writer import LedgerUnavailable, LedgerWriter
from switch.merchant.model import RegistryError
from switch.processing import events as ev
from switch.routing.bins import BinTable
from switch.routing.store_forward import StoreForward, StoreForwardError
from switch.server import gcpolicy
from switch.server.acquirer import AcquirerGroup, AcquirerLink
from switch.server.admin.wiring import MerchantWiring
from switch.server.armed import ArmedStore, ArmedStoreError
from switch.server.core import SwitchCore, TerminalKeys, wall_ms
from switch.server.ledger_process import RemoteLedgerWriter
from switch.server.ledger_reader import LedgerReader
from switch.server.metrics import Metrics, serve_metrics
from switch.server.processor_factory import make_processor
from switch.server.rrn_store import RrnStore
from switch.server.terminal import TerminalListener

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The switch cannot start (missing key, unreadable store); the message says what to fix."""


class SwitchPorts(msgspec.Struct):
    """What a started switch reports: bound ports by listener name, and the metrics port (0: off)."""

    listeners: dict[str, int]
    metrics: int = 0
    admin: int = 0


def open_backend(config: SwitchConfig, *, create: bool = True) -> Any:
    lc = config.ledger
    if lc.backend == "postgres":
        from switch.ledger.postgres import PostgresBackend

        return PostgresBackend(lc.dsn, create=create)
    from switch.ledger.sqlite import SqliteBackend

    return SqliteBackend(lc.path, create=create)


class Switch:
    """Everything a running switch holds; `serve` builds one."""

    def __init__(
        self,
        config: SwitchConfig,
        environ: Mapping[str, str] | None = None,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.config = config
        self.manage_gc = False
        self.metrics = Metrics()
        try:
            kek = keymod.load_kek(config.keys, environ)
            master = keymod.load_master_keys(config.terminals, kek)
            link_keys = keymod.load_link_mac_keys(config.acquirers, kek)
            signing_key = ledger_keys.load_signing_key(config.ledger)
            pan_key = ledger_keys.load_pan_hash_key(config.ledger)
        except (keymod.KeyStoreError, ledger_keys.LedgerKeyError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        self.writer: Any
        if config.server.ledger_writer_process:  # its own process: the second core, no GIL sharing
            try:
                self.writer = RemoteLedgerWriter(config, environ=environ)
            except LedgerUnavailable as exc:
                raise StartupError(str(exc)) from None
        else:
            # writer=True: the single-writer lock (SQLite: switch.ledger.writer_lock), as in the process
            self.writer = LedgerWriter(
                ledger_factory.open_backend(config.ledger, writer=True),
                signing_key=signing_key,
                config=config.ledger,
            )
        self.reader = LedgerReader(open_backend(config, create=False))
        try:  # merchant services: registry directory, rules, registry master keys (issue 6)
            self.merchant = MerchantWiring(config, self.writer, kek, master, clock_ms)
        except (keymod.KeyStoreError, RegistryError) as exc:
            raise StartupError(f"merchant services: {exc}") from None
        try:  # a store that does not open (wrong KEK, damaged file, in use) stops the start with its reason
            self.saf = StoreForward.open(config.store_forward, kek=kek)
            self.armed = ArmedStore(
                config.server.armed_path, kek=kek, slot_bytes=config.server.armed_slot_bytes
            )
            if not config.server.ledger_writer_process:
                self.armed.take_over()  # the durable-writer thread of this process writes it
        except (StoreForwardError, ArmedStoreError) as exc:
            raise StartupError(str(exc)) from None
        self.rrns = RrnStore(config.server.rrn_path)
        self.router = BinTable.from_config(config.routing)
        self.processor = make_processor(
            config, self.router, pan_key, rules=self.merchant.rules, directory=self.merchant.directory
        )
        self.metrics.export_processor_counters(self.processor.counters)
        self.core = SwitchCore(
            config,
            self.processor,
            self.writer,
            self.saf,
            self.armed,
            self.rrns,
            self.reader,
            TerminalKeys(master),
            self.metrics,
            clock_ms=clock_ms,
        )
        self.core.on_lifecycle = self.merchant.record
        self.core.refuse_unkeyed = self.merchant.refuse_unkeyed  # 58 before A0: never signed on
        rng = random.Random()
        for acq in config.acquirers:
            key = link_keys.get(acq.name)
            links = [AcquirerLink(acq, i, self.core, self.metrics, rng, key) for i in range(acq.connections)]
            for link in links:
                link.trace = self.core.trace  # stage trace (diagnostics): None unless configured
            self.core.groups[acq.name] = AcquirerGroup(acq, links)
            self.metrics.set_link_states(acq.name, {"disconnected": acq.connections})
        self.listeners = [TerminalListener(lc, self.core, self.metrics) for lc in config.listeners]

    def close(self) -> None:
        try:
            self.writer.close(self.config.server.shutdown_timeout_s)
        finally:
            try:
                self.core.close(self.config.server.shutdown_timeout_s)
            finally:
                self.reader.close()
                self.saf.close()
                self.armed.close()
                self.merchant.close()

    def recover(self) -> None:
        cfg = self.config
        now = self.core.now_ms()
        drafts = tuple(self.reader.recovery_drafts(now - cfg.server.recovery_window_ms))
        self.merchant.recovered(drafts)
        armed = tuple(ev.ArmedReversal(a, r, f) for a, r, f in self.armed.all())
        queued = frozenset(
            item.fields.get("37", "") for item in self.saf.due(now + 10**12, 1_000_000) if item.mti == "0400"
        )
        self.core.feed(
            ev.Recovered(
                now_ms=now,
                business_day_start_ms=now - cfg.server.recovery_window_ms,
                drafts=drafts,
                armed=armed,
                queued_rrns=queued,
            )
        )
        log.info(
            "recovered %d ledger entries, %d armed reversals, %d queued reversals; ledger size %d",
            len(drafts),
            len(armed),
            len(queued),
            self.writer.size,
        )

    async def run(self, *, task_status: trio.TaskStatus[SwitchPorts] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        core = self.core
        core.bind_trio()
        self.recover()
        await core.settle()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.flusher)
            nursery.start_soon(core.ledger_pump)
            for group in core.groups.values():
                for link in group.links:
                    nursery.start_soon(link.run, name=f"link {link.name}")
            metrics_port = 0
            if cfg.metrics.enabled:
                metrics_port = await nursery.start(
                    serve_metrics, self.metrics, cfg.metrics.host, cfg.metrics.port
                )
            await self.merchant.start(nursery, core)  # lifecycle saves, registry poll, admin API
            ports = {}
            for listener in self.listeners:
                ports[listener.config.name] = await nursery.start(listener.serve)
            nursery.start_soon(self._timer)
            nursery.start_soon(self._housekeeping)
            if self.manage_gc:
                nursery.start_soon(gcpolicy.run, cfg.server)
            nursery.start_soon(core.saf_sender, cfg.server.saf_tick_ms, cfg.server.saf_max_items_per_tick)
            log.info("switch up: listeners %s, metrics port %s", ports, metrics_port or "off")
            task_status.started(SwitchPorts(ports, metrics_port, self.merchant.api_port))

    async def _timer(self) -> None:
        tick_s = self.config.server.timer_tick_ms / 1000.0
        while True:
            await trio.sleep(tick_s)
            self.core.expire()

    async def _housekeeping(self) -> None:
        interval_s = self.config.server.housekeeping_interval_ms / 1000.0
        while True:
            await trio.sleep(interval_s)
            self.core.feed(ev.Tick(self.core.now_ms()))
            self.metrics.ledger_sequence.set(self.writer.size - 1)


async def serve(
    config: SwitchConfig,
    *,
    environ: Mapping[str, str] | None = None,
    clock_ms: Callable[[], int] = wall_ms,
    manage_gc: bool = False,
    task_status: trio.TaskStatus[SwitchPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the switch until cancelled; reports SwitchPorts once it accepts traffic. `clock_ms`: the
    wall clock every part of the switch reads (tests move it to cross days and grace periods).
    `manage_gc`: the switch owns the process (`switch run`): apply switch.server.gcpolicy."""
    if config.server.gil_switch_interval_us > 0:
        sys.setswitchinterval(config.server.gil_switch_interval_us / 1_000_000)
    if manage_gc:
        gcpolicy.apply_thresholds(config.server)
    switch = await trio.to_thread.run_sync(Switch, config, environ, clock_ms)
    switch.manage_gc = manage_gc
    try:
        await switch.run(task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(switch.close)
