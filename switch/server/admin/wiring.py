"""Merchant services inside a running switch: the registry, the rules the processing core calls, the
admin API, and the threads between them.

What it owns and why:
- `rules` (switch.merchant.rules.MerchantRules) and `directory` (RegistryDirectory): built from the
  registry in the ledger's database at start-up, handed to the processing core. Terminals and merchants
  declared in switch.toml that the registry does not know are imported once (audited, actor
  "switch.toml") as devices already in service, so the registry is the one directory.
- Registry master keys: a terminal registered through the API or CLI gets its master key from the
  registry (sealed under the KEK, like switch.toml's). They are opened into the SAME dict the server's
  TerminalKeys reads, at start-up and whenever a key record changes.
- Lifecycle persistence: the core's RecordLifecycle decisions are queued (bounded) and saved by a
  worker thread with MerchantService.apply_lifecycle, which re-applies the event to the registry's
  current record: an operator's renewal made meanwhile is never overwritten.
- Changes reach the running rules at once: the admin API's service calls back (on_change, on_cutover,
  and every ledger entry it posts for `observe`), hopping to the trio thread with
  TrioToken.run_sync_soon; changes made outside this process (the CLI) are read from the registry's
  append-only audit every `registry_poll_interval_ms`.
- The admin API (switch.server.admin.app.serve_admin) in the switch's nursery when AdminConfig.enabled.

Each thread has its own registry connection (a RegistryStore is one thread's); the rules and the
processor are touched only on the trio thread.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import trio

from switch.codec import keys as keymod
from switch.config import SwitchConfig
from switch.ledger.factory import open_backend
from switch.ledger.model import Entry, EntryDraft
from switch.ledger.queries import LedgerReader
from switch.merchant.directory import RegistryDirectory
from switch.merchant.ledger_view import refunds_by_day, unsettled_balances
from switch.merchant.lifecycle import refuse_without_keys
from switch.merchant.model import Contract, Merchant, RegistryError, Terminal, TerminalKey
from switch.merchant.refusals import Refusal, RefusalLog
from switch.merchant.rules import MerchantRules
from switch.merchant.service import MerchantService
from switch.merchant.store import KINDS, RegistryStore
from switch.processing import events as ev
from switch.processing.decisions import RecordLifecycle

log = logging.getLogger("switch.merchant")

#: Registry rows read per page at start-up and per poll.
PAGE_ROWS = 1_000


def open_store(config: SwitchConfig) -> RegistryStore:
    lc = config.ledger
    if lc.backend == "postgres":
        return RegistryStore.open_postgres(lc.dsn)
    return RegistryStore.open_sqlite(lc.path)


def list_all(store: RegistryStore, kind: str, type_: Any) -> list[Any]:
    out: list[Any] = []
    after = ""
    while True:
        page = store.list(kind, type_, after_id=after, limit=PAGE_ROWS)
        out += page
        if len(page) < PAGE_ROWS:
            return out
        after = _record_id(kind, page[-1])


def _record_id(kind: str, record: Any) -> str:
    return f"{record.terminal_id}/{record.key_index}" if kind == "key" else str(record.id)


def newest_keys(keys: Iterable[TerminalKey]) -> dict[str, TerminalKey]:
    """The master key in use per terminal: the highest index not retired."""
    out: dict[str, TerminalKey] = {}
    for k in keys:
        if k.retired_at_ms is None and (
            k.terminal_id not in out or k.key_index > out[k.terminal_id].key_index
        ):
            out[k.terminal_id] = k
    return out


class ObservedLedger:
    """The admin service's ledger port: a blocking append on the switch's writer, whose committed
    entries are also shown to the running rules (unsettled balances move with subscriptions, deposits
    and cutover settlements)."""

    def __init__(self, writer: Any, observe: Callable[[Sequence[EntryDraft]], None]) -> None:
        self._writer = writer
        self._observe = observe

    def append(self, drafts: Sequence[EntryDraft], timeout_s: float | None = None) -> list[Entry]:
        entries: list[Entry] = self._writer.append(drafts, timeout_s=timeout_s)
        self._observe([e.draft for e in entries])
        return entries


class MerchantWiring:
    def __init__(
        self,
        config: SwitchConfig,
        writer: Any,
        kek: keymod.Kek,
        master_keys: dict[str, keymod.SecretKey],
        clock_ms: Callable[[], int],
    ) -> None:
        self.config = config
        self.cfg = config.merchant_services
        self.writer = writer
        self.kek = kek
        self.master_keys = master_keys  # the dict the server's TerminalKeys reads
        self.clock_ms = clock_ms
        self._token: trio.lowlevel.TrioToken | None = None
        self._core: Any = None
        self._send: trio.MemorySendChannel[RecordLifecycle] | None = None
        self._recv: trio.MemoryReceiveChannel[RecordLifecycle] | None = None
        #: Lifecycle events per terminal queued but not saved yet: until they are, a terminal record
        #: read back from the registry is older than the rules' copy and must not replace it.
        self._unsaved: dict[str, int] = {}
        self._db_lock = trio.Lock()  # the switch's registry connection serves one thread at a time
        #: Refusals answered before the core (no ledger entry): shown by GET /terminals/{tid}/refusals.
        self.refusals = RefusalLog(self.cfg.max_refusals_per_terminal, self.cfg.max_refusal_terminals)
        self.dropped_events = 0
        self.saved_events = 0
        self.deposit_passes = 0  # passes of the deposit schedule so far (switch.server.merchant_schedule)
        self.api_port = 0
        self._api_token = ""
        if config.admin.enabled:
            from switch.server.admin.app import admin_token

            try:
                self._api_token = admin_token(config.admin)
            except RuntimeError as exc:  # said at start-up, in one line, not from inside the nursery
                raise RegistryError(str(exc)) from None
        # The switch's own registry connection (start-up, lifecycle saves, polling): one thread at a time.
        self.store = open_store(config)
        self.reader = LedgerReader(open_backend(config.ledger, create=False))
        self.service = MerchantService(self.store, self.reader, None, self.cfg, clock_ms)
        self.service.on_change = self._changed_from_thread
        imported = self.service.import_from_config(config.merchants, config.terminals)
        if imported:
            log.info("imported from switch.toml into the registry: %s", ", ".join(imported))
        self._audit_seq = self.store.last_audit_seq()
        self.rules = MerchantRules(
            self.cfg,
            list_all(self.store, "merchant", Merchant),
            list_all(self.store, "contract", Contract),
            list_all(self.store, "terminal", Terminal),
        )
        self.rules.recover(unsettled_balances(self.reader.backend), {})
        self.directory = RegistryDirectory(self.rules)
        for tid, k in newest_keys(list_all(self.store, "key", TerminalKey)).items():
            if tid not in self.master_keys:
                self.master_keys[tid] = kek.open(tid, k.encrypted_hex)
        # The admin API's service: its own connections, posting through the switch's ledger writer.
        self.api_store: RegistryStore | None = None
        self.api_reader: LedgerReader | None = None
        self.api_service: MerchantService | None = None
        if config.admin.enabled:
            self.api_store = open_store(config)
            self.api_reader = LedgerReader(open_backend(config.ledger, create=False))
            self.api_service = MerchantService(
                self.api_store,
                self.api_reader,
                ObservedLedger(writer, self._observed_from_thread),
                self.cfg,
                clock_ms,
            )
            self.api_service.on_change = self._changed_from_thread
            self.api_service.on_cutover = self._cutover_from_thread

    # --- start-up ----------------------------------------------------------------------------------
    def recovered(self, drafts: Iterable[EntryDraft]) -> None:
        """The server's recovery entries (they cover today): today's refunds for the daily caps."""
        self.rules.refunded_by_day = refunds_by_day(drafts, self.cfg.business_day_utc_offset_minutes)

    async def start(self, nursery: trio.Nursery, core: Any) -> None:
        """Start lifecycle saving, registry polling and (when enabled) the admin API."""
        self._token = trio.lowlevel.current_trio_token()
        self._core = core
        self._send, self._recv = trio.open_memory_channel(self.cfg.max_pending_lifecycle_events)
        nursery.start_soon(self._save_lifecycle)
        nursery.start_soon(self._poll)
        if self.cfg.deposit_check_interval_s > 0:
            from switch.server.merchant_schedule import run_deposit_schedule

            await nursery.start(run_deposit_schedule, self)
        if self.api_service is not None:
            from switch.server.admin.app import serve_admin

            self.api_port = await nursery.start(
                functools.partial(
                    serve_admin,
                    self.config.admin,
                    self.api_service,
                    token=self._api_token,
                    refusals=self.refusals,
                )
            )

    def posting_service(self) -> MerchantService:
        """A service with its own registry and ledger-reader connections that posts through the
        switch's ledger writer, its changes reaching the running rules (for a task's worker thread,
        e.g. the deposit schedule). The caller closes `store` and `reader`."""
        svc = MerchantService(
            open_store(self.config),
            LedgerReader(open_backend(self.config.ledger, create=False)),
            ObservedLedger(self.writer, self._observed_from_thread),
            self.cfg,
            self.clock_ms,
        )
        svc.on_change = self._changed_from_thread
        return svc

    def close(self) -> None:
        for closeable in (self.api_store, self.api_reader, self.store, self.reader):
            if closeable is not None:
                try:
                    closeable.close()
                except Exception as exc:  # closing must not hide the error that stopped the switch
                    log.warning("closing %s: %s", type(closeable).__name__, exc)

    # --- core -> registry ------------------------------------------------------------------------
    def refuse_unkeyed(self, fields: dict[str, str], now_ms: int) -> str | None:
        """The server core's hook for a request of a terminal with no working key (trio thread): the
        response code the lifecycle gives it (58: registered, never signed on), or None (A0 stands).
        The refusal is logged (rate-limited per terminal) and kept for the admin API."""
        tid = fields.get("41", "")
        decline = refuse_without_keys(self.rules.terminals.get(tid) if tid else None)
        if decline is None:
            return None
        r = Refusal(
            terminal_id=tid,
            at_ms=now_ms,
            mti=fields.get("t", "")[:4],
            stan=fields.get("11", "")[:6],
            response_code=decline.code,
            reason=decline.reason,
        )
        skipped = self.refusals.add(r)
        if skipped is not None:
            more = f" ({skipped} more since the last line)" if skipped else ""
            log.warning("terminal %s MTI %s refused %s: %s%s", tid, r.mti, r.response_code, r.reason, more)
        return decline.code

    def record(self, dec: RecordLifecycle) -> None:
        """Called by the server core (trio thread) for each RecordLifecycle decision."""
        log.info("terminal %s lifecycle %s: %s", dec.terminal_id, dec.event, dec.reason)
        if self._send is None:
            self.dropped_events += 1
            return
        try:
            self._send.send_nowait(dec)
            self._unsaved[dec.terminal_id] = self._unsaved.get(dec.terminal_id, 0) + 1
        except trio.WouldBlock:
            self.dropped_events += 1
            log.error(
                "lifecycle event of terminal %s not saved: max_pending_lifecycle_events=%d reached",
                dec.terminal_id,
                self.cfg.max_pending_lifecycle_events,
            )

    async def _save_lifecycle(self) -> None:
        assert self._recv is not None
        async for dec in self._recv:
            saved = None
            try:
                async with self._db_lock:
                    saved = await trio.to_thread.run_sync(
                        self.service.apply_lifecycle, dec.terminal_id, dec.event, dec.now_ms, dec.flow
                    )
                self.saved_events += 1
            except (RegistryError, OSError) as exc:
                log.error("lifecycle event %s of terminal %s not saved: %s", dec.event, dec.terminal_id, exc)
            left = self._unsaved.get(dec.terminal_id, 1) - 1
            if left > 0:
                self._unsaved[dec.terminal_id] = left
            else:
                self._unsaved.pop(dec.terminal_id, None)
                if saved is not None:  # the event merged with whatever an operator changed meanwhile
                    self.rules.put(saved)

    async def _poll(self) -> None:
        interval_s = self.cfg.registry_poll_interval_ms / 1000.0
        while True:
            await trio.sleep(interval_s)
            try:
                async with self._db_lock:
                    records = await trio.to_thread.run_sync(self._read_changes)
            except Exception as exc:  # a database hiccup: try again next round
                log.warning("registry poll failed: %s", exc)
                continue
            for record in records:
                self._apply_change(record)

    def _read_changes(self) -> list[msgspec.Struct]:
        """Records changed since the last poll (worker thread, the switch's registry connection)."""
        out: list[msgspec.Struct] = []
        changes = self.store.changed_since(self._audit_seq, PAGE_ROWS)
        for seq, kind, object_id in changes:
            self._audit_seq = max(self._audit_seq, seq)
            if kind in KINDS:
                got = self.store.get(kind, object_id, KINDS[kind][1])
                if got is not None:
                    out.append(got[0])
        return out

    # --- registry / API -> running rules (always applied on the trio thread) ---------------------
    def _apply_change(self, record: Any) -> None:
        if isinstance(record, TerminalKey):
            if record.retired_at_ms is None:
                try:
                    self.master_keys[record.terminal_id] = self.kek.open(
                        record.terminal_id, record.encrypted_hex
                    )
                except keymod.KeyStoreError as exc:
                    log.error("master key of terminal %s not usable: %s", record.terminal_id, exc)
            return
        if isinstance(record, Terminal) and record.id in self._unsaved:
            return  # older than the rules' copy; the save in flight delivers the merged record
        self.rules.put(record)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        if self._token is None:  # not started yet (start-up import): the rules are built after it
            return
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _changed_from_thread(self, record: msgspec.Struct) -> None:
        self._call_soon(self._apply_change, record)

    def _observed_from_thread(self, drafts: Sequence[EntryDraft]) -> None:
        self._call_soon(self.rules.observe, list(drafts))

    def _cutover_from_thread(self, cut: Any) -> None:
        def feed() -> None:
            if self._core is not None:
                self._core.feed(ev.Cutover(self.clock_ms()))

        self._call_soon(feed)
