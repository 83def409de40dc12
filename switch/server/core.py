"""The switch's trio core: feeds the sans-I/O processor and carries out its decisions.

Everything here runs on the trio thread, synchronously, in batches (DESIGN.md): an entry point
(`on_frames` for a terminal read, `on_link_answers` for an acquirer read, the ledger completions, the
timer) feeds every event of its batch to the processor, collecting the decisions; then `_flush` does the
work that needs I/O ONCE for the whole batch:

1. hand the pre-stored reversals of the batch's acquirer requests to the durable-writer thread
   (switch.server.durable); the requests go out on their links when it calls back (armed = durable);
2. hand queued reversals/advices to the same thread for store-and-forward, and the releases of armed
   reversals after them;
3. hand every `Post` to the ledger writer (they land in the same group commit).

Nothing on the trio thread waits for a disk: both writer threads group what was queued meanwhile into
one commit and call back from their thread; completions are queued under a lock and ONE
`run_sync_soon` per burst brings them to the trio thread, where they are processed as one batch.
Answers (`Reply`) only exist once their entries are durable (the processor's contract); they are queued
on their connection and its writer task sends all of a batch's answers in one write.

Crash safety with asynchronous writes: a request leaves only after its armed reversal is durable; an
armed reversal is deleted only after its store-and-forward copy is durable (same thread, in order) or
its outcome is in the ledger; anything in between is resolved by start-up recovery against the ledger
(an entry that says "reversal queued" re-queues it).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import trio

from switch.codec import keys as keymod
from switch.codec.masking import scrub_text
from switch.codec.wire import MacFn, Wire, WireError, has_mac, make_mac_fn
from switch.config import SwitchConfig
from switch.ledger.model import Entry
from switch.ledger.writer import LedgerBusy, LedgerUnavailable
from switch.processing import decisions as d
from switch.processing import events as ev
from switch.routing.matching import Pending
from switch.routing.store_forward import StoreForward
from switch.server import stagetrace as st
from switch.server.acquirer import AcquirerGroup, AcquirerLink
from switch.server.armed import ArmedStore
from switch.server.durable import DurableBusy, DurableWriter
from switch.server.ledger_reader import LedgerReader
from switch.server.limits import LimitLog
from switch.server.lookups import LookupThread
from switch.server.metrics import Metrics
from switch.server.rrn_store import RrnStore
from switch.server.stagetrace import StageTrace
from switch.server.terminal import TerminalConnection

log = logging.getLogger(__name__)

#: Network management codes of field 70 that are sign-ons (new working keys) and echoes.
SIGN_ON_CODES = frozenset({"001", "101"})
ECHO_CODE = "301"
#: Context tag of store-and-forward deliveries on a link.
SAF = "saf"
#: An answered store-and-forward item: (item id, acquirer, mti, rrn, response code, answered at ms).
SafCompletion = tuple[int, str, str, str, str, int]
#: Start-up: longest wait for the durable writer to finish the recovery's writes (RRN block...).
SETTLE_TIMEOUT_S = 30.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Processor:  # the shape the core needs; switch.processing's Processor has it
    def handle(self, event: Any) -> list[Any]: ...


class TerminalKeys:
    """Terminal master keys (opened under the KEK at start) and the working MAC keys of signed-on
    terminals. Working keys live in memory only: after a restart a terminal's MAC fails (A0) and it signs
    on again, as POS terminals do."""

    def __init__(self, master: dict[str, keymod.SecretKey]) -> None:
        self._master = master
        self._mac: dict[str, MacFn] = {}

    def mac_fn(self, terminal_id: str | None) -> MacFn | None:
        return self._mac.get(terminal_id) if terminal_id else None

    def sign_on(self, terminal_id: str) -> str | None:
        """Fresh working keys for the terminal: field 62 as hex, or None without a master key."""
        tmk = self._master.get(terminal_id)
        if tmk is None:
            return None
        pin_key = keymod.generate_working_key()
        mac_key = keymod.generate_working_key()
        field = keymod.build_signon_field(tmk, pin_key, mac_key)
        self._mac[terminal_id] = make_mac_fn(mac_key)
        return field.hex().upper()


class _Request:
    """What the core remembers of a terminal request until its answer leaves (latency, metrics)."""

    __slots__ = ("mti", "pc", "t0")

    def __init__(self, mti: str, pc: str, t0: float) -> None:
        self.mti = mti
        self.pc = pc
        self.t0 = t0


class _BatchEndFlush(trio.abc.Instrument):
    """Runs the flusher's work at the END of the scheduling batch that wanted it (trio calls
    `before_io_wait` after running every runnable task, before polling for I/O), instead of in the
    flusher task, which trio runs in the NEXT batch, after the tasks woken by that poll: on a busy
    trio thread a batch lasts milliseconds, and a purchase waits for two flushes (arm, post).
    `_want_flush` does not wake the flusher task while this instrument is installed: waking it cost a
    task step and one more loop turn (an epoll_wait with timeout 0) per round, to find nothing left
    to do. The poll cannot sleep on queued work: trio calls this hook after it chose the poll's
    timeout, so when the flush made a task runnable (a writer task for a full socket, a waiter of an
    event it set) and the timeout is not 0, the hook wakes the loop itself. An error is handed to the
    flusher task to raise (trio would silently disable an instrument that raised)."""

    def __init__(self, core: SwitchCore) -> None:
        self.core = core
        self.error: BaseException | None = None
        self._runq = _run_queue()

    def before_io_wait(self, timeout: float) -> None:
        core = self.core
        if not core._flush_wanted or core._busy or self.error is not None:
            return
        try:
            core._flush_round()
            if timeout > 0 and (
                self._runq if self._runq is not None else trio.lowlevel.current_statistics().tasks_runnable
            ):
                token = core._token
                if token is not None:
                    token.run_sync_soon(_nothing)  # the poll returns at once: the new runnables run
        except BaseException as exc:
            self.error = exc
            core._flush_wake.set()


def _nothing() -> None:
    """Wakes the trio loop (run_sync_soon) and does nothing else."""


def _run_queue() -> Any:
    """The running trio loop's queue of runnable tasks (call on the trio thread), or None when this trio
    keeps it elsewhere: `current_statistics().tasks_runnable` reads the same length, but builds the
    I/O backend's statistics too (~2% of the trio thread when called every round)."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runq = GLOBAL_RUN_CONTEXT.runner.runq
    except (ImportError, AttributeError):
        return None
    return runq if isinstance(runq, deque) else None


class SwitchCore:
    def __init__(
        self,
        config: SwitchConfig,
        processor: Processor,
        writer: Any,
        saf: StoreForward,
        armed: ArmedStore,
        rrns: RrnStore,
        reader: LedgerReader,
        keys: TerminalKeys,
        metrics: Metrics,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.config = config
        self.processor = processor
        self.writer = writer
        self.saf = saf
        self.armed = armed
        self.rrns = rrns
        self.reader = reader
        self.keys = keys
        self.metrics = metrics
        self.now_ms = clock_ms
        self.wires: dict[str, Wire] = {}
        self.conns: dict[int, TerminalConnection] = {}
        self.groups: dict[str, AcquirerGroup] = {}
        self._group_up: dict[str, bool] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        # Work collected during one batch, carried out by _flush.
        self._sends: list[d.SendToAcquirer] = []
        self._saf_items: list[tuple[str, str, dict, str]] = []
        self._posts: list[d.Post] = []
        self._releases: list[tuple[str, str]] = []
        self._events: deque[Any] = deque()
        # Completions from the writer threads (ledger submissions; durable-writer groups as lists).
        self._done_lock = threading.Lock()
        self._done: list[Any] = []
        self._done_scheduled = False
        self._pumping = False  # ledger_pump is delivering on the trio thread: no run_sync_soon
        self._busy = False
        # Connections and links with bytes queued during the current pass (written at its end).
        self._dirty_conns: list[TerminalConnection] = []
        self._dirty_links: list[AcquirerLink] = []
        self._flush_wake = trio.Event()
        self._flush_wanted = False
        self._flusher_running = False
        self._flush_at_batch_end = False  # the flusher's _BatchEndFlush instrument is installed
        self._saf_wake = trio.Event()
        self._saf_completions: list[SafCompletion] = []
        self._busy_log = LimitLog(
            log,
            "server",
            "max_pending_durable_items",
            metrics.limit_hits.labels("server", "max_pending_durable_items"),
        )
        self.decisions_seen = 0
        #: Where RecordLifecycle decisions go (switch.server.admin.wiring.MerchantWiring.record).
        self.on_lifecycle: Callable[[d.RecordLifecycle], None] = lambda dec: None
        #: Merchant services' answer for a request of a terminal WITHOUT working keys (no MAC key yet):
        #: a response code (58 for a registered terminal that never signed on) or None (A0 as before).
        self.refuse_unkeyed: Callable[[dict, int], str | None] = lambda fields, now_ms: None
        self.durable = DurableWriter(
            armed,
            saf,
            rrns,
            self._durable_done,
            max_pending_items=config.server.max_pending_durable_items,
        )
        #: Where arms and releases go: the ledger process keeps the armed store when the ledger runs
        #: there (one message per batch for both); else the durable-writer thread.
        self.arm_sink: Any = writer if hasattr(writer, "arm") else self.durable
        self.lookups = LookupThread(self._durable_done, max_pending=config.server.max_pending_lookups)
        #: Opt-in stage timestamps of each transaction (diagnostics, switch.server.stagetrace).
        sc = config.server
        self.trace: StageTrace | None = (
            StageTrace(sc.stage_trace_path, sc.stage_trace_max_txns) if sc.stage_trace_path else None
        )

    def bind_trio(self) -> None:
        """Call on the trio thread before any traffic: completions are delivered to this run."""
        self._token = trio.lowlevel.current_trio_token()
        if not self.durable._thread.is_alive():
            self.durable.start()
        if not self.lookups.running:
            self.lookups.start()

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Stop the durable writer after it wrote what is queued (its callbacks are then dropped)."""
        self.lookups.close(timeout_s)
        self.durable.close(timeout_s)
        if self.trace is not None:
            self.trace.dump()

    async def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until every queued durable write is done and its events processed (start-up: the
        recovery's RRN block and re-queued reversals are in before the first request)."""
        with trio.fail_after(timeout_s):
            while not self.durable.idle() or self._done_scheduled or self._events or self._flush_wanted:
                await trio.sleep(0.001)

    def wire_for(self, listener_name: str, profile: str, framing: str, tpdu: bool) -> Wire:
        wire = self.wires.get(listener_name)
        if wire is None:
            wire = self.wires[listener_name] = Wire(profile, framing, tpdu)
        return wire

    # --- events into the processor ------------------------------------------------------------------
    def feed(self, event: Any) -> None:
        """Feed one event (and the events its decisions cause), then flush the batch's I/O."""
        self._events.append(event)
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        self._busy = True
        try:
            while True:
                while self._events:
                    self._execute(self.processor.handle(self._events.popleft()))
                if self._flusher_running:
                    self._want_flush()
                    break
                if not self._flush():
                    break
        finally:
            self._busy = False
            self._write_out()

    def _write_out(self) -> None:
        """End of a pass: every answer and acquirer request queued in it goes to the kernel now, one
        write per connection and link (no writer-task round trip; see switch.server.terminal)."""
        if self._dirty_conns:
            conns, self._dirty_conns = self._dirty_conns, []
            for conn in conns:
                conn.write_now()
        if self._dirty_links:
            links, self._dirty_links = self._dirty_links, []
            for link in links:
                link.write_now()

    def _want_flush(self) -> None:
        """Wake the flusher once for everything queued during this scheduling round."""
        if not self._flush_wanted and (self._sends or self._saf_items or self._posts or self._releases):
            self._flush_wanted = True
            if not self._flush_at_batch_end:  # the instrument runs it before the poll, no task wake
                self._flush_wake.set()

    async def flusher(self) -> None:
        """Carry out the I/O of every batch processed in one trio scheduling round, together.

        Each read (a terminal's frames, an acquirer's answers, a burst of ledger completions) is processed
        at once, but its durable writes and link sends wait for this task, which trio runs after every
        task already runnable: at moderate load, when each read carries one frame, the arms and posts of
        all connections read in the same round become one durable-writer job and one ledger message
        instead of one each (measured: a flush per read doubled the CPU per transaction at half load).
        """
        self._flusher_running = True
        instrument = _BatchEndFlush(self)
        trio.lowlevel.add_instrument(instrument)
        self._flush_at_batch_end = True
        try:
            while True:
                await self._flush_wake.wait()
                self._flush_wake = trio.Event()
                if instrument.error is not None:
                    raise instrument.error
                self._flush_round()
        finally:
            self._flusher_running = False
            self._flush_at_batch_end = False
            try:
                trio.lowlevel.remove_instrument(instrument)
            except KeyError:
                pass

    def _flush_round(self) -> None:
        self._flush_wanted = False
        self._busy = True
        try:
            while self._flush() or self._events:
                while self._events:
                    self._execute(self.processor.handle(self._events.popleft()))
        finally:
            self._busy = False
            self._write_out()

    # --- terminal side --------------------------------------------------------------------------------
    def on_frames(self, conn: TerminalConnection, frames: Sequence[Any]) -> None:
        self.conns[conn.conn_id] = conn
        lcfg = conn.config
        wire = self.wire_for(lcfg.name, lcfg.profile, lcfg.framing, lcfg.tpdu)
        now = self.now_ms()
        t0 = time.perf_counter()
        self._busy = True
        try:
            for frame in frames:
                if conn.closed:
                    break
                payload = frame.payload
                if frame.tpdu is not None:
                    conn.tpdu = frame.tpdu
                try:
                    fields = wire.decode(payload)
                except WireError as exc:
                    self._undecodable(conn, wire, exc)
                    continue
                mti = fields.get("t", "")
                if len(mti) != 4 or mti[2] not in "024":
                    log.warning("%s: message with MTI %r is not a request; closing", conn.peer, mti)
                    self.metrics.decode_errors.labels("terminal").inc()
                    conn.close_soon()
                    break
                tid = fields.get("41")
                if tid:
                    conn.terminal_id = tid
                code70 = fields.get("70", "")
                network = mti[1] == "8"
                if not (
                    network and (code70 in SIGN_ON_CODES or (code70 == ECHO_CODE and not has_mac(fields)))
                ):
                    mac_fn = self.keys.mac_fn(tid)
                    # No working key: the terminal lifecycle speaks first (issue 6: a registered terminal
                    # that never signed on gets 58, not A0). Unmaced (no key), nothing posted; merchant
                    # services log and record the reason. Unknown terminals keep A0 below.
                    if mac_fn is None and (code := self.refuse_unkeyed(fields, now)) is not None:
                        self.metrics.unkeyed_refusals.inc()
                        conn.request_started()
                        self._remember(conn, fields, t0)
                        self._answer(conn, _bare_answer(fields, code), mac=False)
                        continue
                    if mac_fn is None or not has_mac(fields) or not wire.verify(payload, mac_fn):
                        self.metrics.mac_failures.labels("terminal").inc()
                        conn.request_started()
                        self._remember(conn, fields, t0)
                        self._answer(conn, _bare_answer(fields, "A0"), mac=mac_fn is not None)
                        continue
                conn.request_started()
                self._remember(conn, fields, t0)
                self._events.append(ev.TerminalRequest(conn.conn_id, lcfg.profile, fields, now))
            while True:
                while self._events:
                    self._execute(self.processor.handle(self._events.popleft()))
                if self._flusher_running:
                    self._want_flush()
                    break
                if not self._flush():
                    break
        finally:
            self._busy = False
            self._write_out()

    def on_closed(self, conn: TerminalConnection) -> None:
        # In-flight requests of a closed connection stay counted until the processor answers them
        # (its Reply to a closed connection is dropped and uncounted there).
        self.conns.pop(conn.conn_id, None)
        conn.requests.clear()

    def _undecodable(self, conn: TerminalConnection, wire: Wire, exc: WireError) -> None:
        self.metrics.decode_errors.labels("terminal").inc()
        mti = exc.mti
        if mti is None or mti[2] not in "024":
            log.warning("%s: undecodable message without a readable MTI (%s); closing", conn.peer, exc)
            conn.close_soon()
            return
        log.info("%s: format error in MTI %s (%s); answering 30", conn.peer, mti, scrub_text(str(exc)))
        conn.request_started()
        self.metrics.inflight_count += 1
        fields = {"t": mti}
        conn.requests[(mti[:2], "")] = _Request(mti, "", time.perf_counter())
        self._answer(conn, _bare_answer(fields, "30"), mac=True)

    def _remember(self, conn: TerminalConnection, fields: dict, t0: float) -> None:
        mti = fields["t"]
        self.metrics.inflight_count += 1
        conn.requests[(mti[:2], fields.get("11", ""))] = _Request(mti, fields.get("3", ""), t0)

    def _answer(
        self, conn: TerminalConnection, fields: dict, *, mac: bool = True, mac_fn: Any = None
    ) -> None:
        """Encode, MAC with the terminal's working key (when it has one), frame and queue one answer."""
        lcfg = conn.config
        wire = self.wire_for(lcfg.name, lcfg.profile, lcfg.framing, lcfg.tpdu)
        mti = fields.get("t", "")
        if mac and mac_fn is None:
            mac_fn = self.keys.mac_fn(fields.get("41") or conn.terminal_id)
        try:
            payload = wire.encode(fields, mac_fn)
        except Exception as exc:  # an answer the profile cannot carry: 96 instead
            log.error("%s: cannot encode answer MTI %s: %s", conn.peer, mti, scrub_text(str(exc)))
            base = {k: fields[k] for k in ("t", "11", "41", "42") if k in fields}
            base["39"] = "96"
            payload = wire.encode(base, mac_fn)
        req = conn.requests.pop((mti[:2], fields.get("11", "")), None)
        if req is None and fields.get("39") == "30":
            req = conn.requests.pop((mti[:2], ""), None)
        if conn.send(wire.frame_reply(payload, conn.tpdu)) and not conn.dirty:
            conn.dirty = True
            self._dirty_conns.append(conn)
            if not self._busy:  # outside a pass (start-up, a test's direct call): write at once
                self._write_out()
        self.metrics.inflight_count -= 1
        if req is not None:
            self.metrics.answered(req.mti, req.pc, fields.get("39", ""), time.perf_counter() - req.t0)
            if self.trace is not None:
                stamps = self.trace.answered(
                    fields.get("41", ""), fields.get("11", ""), fields.get("37", ""), req.t0
                )
                if stamps is not None:
                    conn.traced.append(stamps)

    # --- acquirer side --------------------------------------------------------------------------------
    def on_link_answers(self, link: AcquirerLink, answers: Sequence[tuple[Pending[Any], dict]]) -> None:
        now = self.now_ms()
        for pending, fields in answers:
            ctx = pending.context
            if isinstance(ctx, tuple) and ctx[0] == SAF:
                self._saf_answered(link, ctx, fields, now)
            else:
                self._events.append(ev.AcquirerAnswered(ctx, fields, now))
        if not self._busy:
            self._drain()

    def on_link_lost(self, link: AcquirerLink, pending: Sequence[Pending[Any]]) -> None:
        """Requests written on a dropped link: their outcome is unknown, so they time out now."""
        now = self.now_ms()
        for p in pending:
            ctx = p.context
            if isinstance(ctx, tuple) and ctx[0] == SAF:
                continue  # store-and-forward retries on its own schedule
            self.metrics.timeouts.labels(link.config.name).inc()
            self._events.append(ev.DeadlinePassed(ctx, now))
        if not self._busy:
            self._drain()

    def on_link_state(self, link: AcquirerLink) -> None:
        name = link.config.name
        group = self.groups.get(name)
        if group is None:
            return
        counts: dict[str, int] = {}
        for ln in group.links:
            counts[ln.state] = counts.get(ln.state, 0) + 1
        self.metrics.set_link_states(name, counts)
        up = group.up
        if self._group_up.get(name) != up:
            self._group_up[name] = up
            log.info("acquirer %s is %s", name, "UP" if up else "DOWN")
            if up:
                self._saf_wake.set()
            self.feed(ev.AcquirerHealth(name, up, self.now_ms()))

    def expire(self) -> None:
        """Timer: requests past their deadline on any link time out."""
        now = self.now_ms()
        for group in self.groups.values():
            for link in group.links:
                nxt = link.matcher.next_deadline_ms()
                if nxt is None or nxt > now:
                    continue
                for p in link.expire(now):
                    ctx = p.context
                    if isinstance(ctx, tuple) and ctx[0] == SAF:
                        continue
                    self.metrics.timeouts.labels(group.config.name).inc()
                    self._events.append(ev.DeadlinePassed(ctx, now))
        if self._events and not self._busy:
            self._drain()

    # --- decisions ----------------------------------------------------------------------------------
    def _execute(self, decisions: Sequence[Any]) -> None:
        for dec in decisions:
            self.decisions_seen += 1
            if isinstance(dec, d.Reply):
                conn = self.conns.get(dec.conn_id)
                if conn is None or conn.closed:
                    self.metrics.inflight_count -= 1
                    continue
                self._answer(conn, dec.fields)
            elif isinstance(dec, d.Post):
                self._posts.append(dec)
            elif isinstance(dec, d.SendToAcquirer):
                self._sends.append(dec)
                if self.trace is not None:
                    self.trace.start(dec.txn_id, dec.fields.get("37", ""))
            elif isinstance(dec, d.QueueReversal):
                self._saf_items.append((dec.acquirer, "0400", dec.fields, dec.rrn))
                self.metrics.reversals_queued.labels(dec.acquirer).inc()
            elif isinstance(dec, d.QueueAdvice):
                mti = dec.fields.get("t", "0220")
                self._saf_items.append(
                    (dec.acquirer, mti if mti in ("0120", "0220") else "0220", dec.fields, dec.rrn)
                )
                self.metrics.advices_queued.labels(dec.acquirer).inc()
            elif isinstance(dec, d.ReleaseReversal):
                self._releases.append((dec.acquirer, dec.rrn))
            elif isinstance(dec, d.FindOriginal):
                found = functools.partial(self._original_found, dec.txn_id)
                args = (dec.rrn, dec.idempotency_key)
                if not (self.lookups.running and self.lookups.submit(self.reader.find_original, args, found)):
                    # no lookup thread (start-up) or max_pending reads queued: read here, in order
                    try:
                        drafts, error = self.reader.find_original(*args), None
                    except Exception as exc:
                        drafts, error = [], exc
                    found(error, drafts)
            elif isinstance(dec, d.ReserveRrns):
                self.durable.reserve_rrns(dec.count, functools.partial(self._rrns_reserved, dec.count))
            elif isinstance(dec, d.SignOn):
                self._sign_on(dec)
            elif isinstance(dec, d.RecordLifecycle):
                self.on_lifecycle(dec)  # merchant services save it in the registry
            elif isinstance(dec, d.SettlementReport):
                log.info(
                    "settlement terminal %s merchant %s currency %s: %s",
                    dec.terminal_id,
                    dec.merchant_id,
                    dec.currency,
                    "balanced"
                    if dec.balanced
                    else "OUT OF BALANCE "
                    + ", ".join(
                        f"{ln.name} terminal {ln.terminal_count}/{ln.terminal_amount_minor} "
                        f"ledger {ln.ledger_count}/{ln.ledger_amount_minor}"
                        for ln in dec.lines
                        if not ln.balanced
                    ),
                )
            elif isinstance(dec, d.Log):
                self._log(dec)

    def _log(self, dec: d.Log) -> None:
        event = dec.event
        level = getattr(logging, dec.level.upper(), logging.INFO)
        if log.isEnabledFor(level):
            log.log(level, "%s: %s", event, scrub_text(dec.text))  # the last gate before text

    def _sign_on(self, dec: d.SignOn) -> None:
        conn = self.conns.get(dec.conn_id)
        reply = dict(dec.reply)
        # The answer is MACed with the key the terminal holds NOW (none at first sign-on).
        old_mac = self.keys.mac_fn(dec.terminal_id)
        field62 = self.keys.sign_on(dec.terminal_id)
        if field62 is None:
            reply["39"] = "96"
            log.warning("sign-on of terminal %s: no master key configured; answered 96", dec.terminal_id)
        else:
            reply["62"] = field62
            self.metrics.sign_ons.inc()
        if conn is None or conn.closed:
            self.metrics.inflight_count -= 1
            return
        self._answer(conn, reply, mac=old_mac is not None, mac_fn=old_mac)

    def _flush(self) -> bool:
        """Hand the batch's durable work to the writers. True when it produced events for another round.

        Nothing here waits: arms, store-and-forward appends and releases go to the durable-writer
        thread, posts to the ledger writer; their completions come back through `_wake_from_thread`.
        """
        if not (self._sends or self._saf_items or self._posts or self._releases):
            return bool(self._events)
        now = self.now_ms()
        traced_ids: list[tuple[list[int], int]] = []
        sends, self._sends = self._sends, []
        if sends:
            armed = [s for s in sends if s.reversal is not None]
            if armed:
                arms = [(s.acquirer, s.fields.get("37", ""), s.reversal) for s in armed]
                try:
                    on_armed: Any = functools.partial(self._armed, armed)
                    if self.arm_sink is not self.durable:  # called on the ledger's reader thread
                        on_armed = _OnTrio(self._from_thread, on_armed)
                        if self.trace is not None:
                            ids = [s.txn_id for s in armed]
                            on_armed.stamp = self.trace.marker(ids, st.ARM_BACK)
                            traced_ids.append((ids, st.ARM_FLUSHED))
                    self.arm_sink.arm(arms, now, on_armed)
                except (DurableBusy, LedgerBusy, LedgerUnavailable) as exc:  # not armed: must not send
                    self._busy_log.hit(f"cannot arm pre-stored reversals: {exc}")
                    for s in armed:
                        self._events.append(ev.AcquirerUnavailable(s.txn_id, s.fields, now, "arming refused"))
            self._send_now([s for s in sends if s.reversal is None], now)
        items, self._saf_items = self._saf_items, []
        if items:
            # The armed copies of queued reversals are released once the items are stored (callback).
            self.durable.append_saf(
                [
                    (acq, mti, fields, f"{'reversal' if mti == '0400' else 'advice'}:{acq}:{rrn}")
                    for acq, mti, fields, rrn in items
                ],
                now,
                [],
                functools.partial(
                    self._saf_stored, len(items), [(acq, rrn) for acq, mti, _, rrn in items if mti == "0400"]
                ),
            )
        releases, self._releases = self._releases, []
        if releases:
            self.arm_sink.release(releases)
        posts, self._posts = self._posts, []
        if posts:
            self._submit(posts, now)
            if self.trace is not None:
                traced_ids.append(([p.txn_id for p in posts], st.POST_FLUSHED))
        flush = getattr(self.writer, "flush", None)
        if flush is not None:  # the ledger process: this batch's arms, releases and posts, one message
            flush()
        for ids, stage in traced_ids:
            self.trace.marker(ids, stage)()  # type: ignore[union-attr]
        return bool(self._events)

    def _send_now(self, sends: Sequence[d.SendToAcquirer], now: int) -> None:
        trace = self.trace
        for s in sends:
            if trace is not None:
                trace.mark(s.txn_id, st.LINK_QUEUED)
            if s.deadline_ms <= now:  # its time ran out while the arm was written: never sent
                self.metrics.timeouts.labels(s.acquirer).inc()
                self._events.append(ev.DeadlinePassed(s.txn_id, now))
                continue
            group = self.groups.get(s.acquirer)
            link = group.send(s.fields, s.txn_id, now, s.deadline_ms - now) if group is not None else None
            ok = link is not None
            if ok and not link.dirty:
                link.dirty = True
                self._dirty_links.append(link)
            if not ok:
                self.metrics.acquirer_unavailable.labels(s.acquirer).inc()
                self._events.append(
                    ev.AcquirerUnavailable(s.txn_id, s.fields, now, "no link up or all links full")
                )
        if self._dirty_links:  # requests leave now, not after the rest of the pass
            links, self._dirty_links = self._dirty_links, []
            for link in links:
                link.write_now()

    def _armed(self, sends: list[d.SendToAcquirer], error: BaseException | None, _: Any) -> None:
        """Durable-writer completion: the batch's reversals are armed (or not); send (or refuse)."""
        now = self.now_ms()
        if self.trace is not None:
            self.trace.marker([s.txn_id for s in sends], st.ARMED)()
        if error is not None:
            log.error("cannot arm pre-stored reversals: %s", error)
            for s in sends:
                self._events.append(ev.AcquirerUnavailable(s.txn_id, s.fields, now, "arming failed"))
            return
        self._send_now(sends, now)

    def _saf_stored(
        self, count: int, release: list[tuple[str, str]], error: BaseException | None, _: Any
    ) -> None:
        if error is not None:  # the armed copies stay: start-up recovery fires them
            log.error("store-and-forward append failed for %d items: %s", count, error)
            return
        self._releases.extend(release)
        self._saf_wake.set()

    def _original_found(self, txn_id: int, error: BaseException | None, drafts: Any) -> None:
        if error is not None:  # answered as "not found": the processor declines the request
            log.error("original lookup for txn %d failed: %s", txn_id, scrub_text(str(error)))
            drafts = []
        self._events.append(ev.OriginalFound(txn_id, tuple(drafts or ()), self.now_ms()))

    def _rrns_reserved(self, count: int, error: BaseException | None, start: Any) -> None:
        if error is not None:
            log.error("cannot reserve %d RRNs: %s", count, error)
            return
        self._events.append(ev.RrnsReserved(start, count))

    # --- completions from the writer threads --------------------------------------------------------
    def _from_thread(self, item: Any) -> None:
        """Called on a writer thread: queue `item` and wake the trio thread once per burst."""
        with self._done_lock:
            self._done.append(item)
            if self._done_scheduled or self._pumping:  # ledger_pump processes them right after
                return
            self._done_scheduled = True
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._on_thread_results)
        except trio.RunFinishedError:
            pass

    async def ledger_pump(self) -> None:
        """Read the ledger process's results on the trio thread (RemoteLedgerWriter.attach_pump): one
        task waiting for readability instead of a thread that must win the GIL and wake the loop."""
        attach = getattr(self.writer, "attach_pump", None)
        if attach is None:
            return
        sock = await trio.to_thread.run_sync(attach)
        while True:
            await trio.lowlevel.wait_readable(sock)
            self._pumping = True
            try:
                alive = self.writer.pump()
            finally:
                self._pumping = False
            self._on_thread_results()
            if not alive:
                return

    def _durable_done(self, done: list[Any]) -> None:
        """DurableWriter's deliver hook (its thread): one item for the whole group."""
        self._from_thread(done)

    def _on_thread_results(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._done_scheduled = False
        now = self.now_ms()
        t1 = time.perf_counter()
        seen_t0: set[float] = set()
        top = -1
        for item in done:
            if type(item) is list:  # a durable-writer group: (callback, error, value) each
                for callback, error, value in item:
                    callback(error, value)
                continue
            txn_id, t0, entries, error = item
            if self.trace is not None:
                self.trace.mark(txn_id, st.COMMITTED)
            if t0 not in seen_t0:
                seen_t0.add(t0)
                self.metrics.ledger_commit_latency.observe(t1 - t0)
            if error is not None:
                self.metrics.ledger_failures.inc()
                conflict = type(error).__name__ == "IdempotencyConflict"
                self._events.append(ev.LedgerFailed(txn_id, scrub_text(str(error)), now, conflict))
            else:
                ents = tuple(entries or ())
                if ents:
                    top = max(top, ents[-1].seq)
                self._events.append(ev.LedgerCommitted(txn_id, ents, now))
        if top >= 0:
            self.metrics.ledger_sequence.set(top)
        if not self._busy:
            self._drain()  # writes out at its end

    # --- ledger -------------------------------------------------------------------------------------
    def _submit(self, posts: list[d.Post], now: int) -> None:
        t0 = time.perf_counter()
        entries = sum(len(post.drafts) for post in posts)
        # the ledger process (it also keeps the armed store): one message for the whole batch
        submit_many = self.writer.submit_many if self.arm_sink is self.writer else None
        if submit_many is not None:
            try:
                submit_many(
                    [(p.drafts, _LedgerCallback(self._from_thread, p.txn_id, t0, self.trace)) for p in posts]
                )
            except Exception as exc:  # LedgerUnavailable: every post of the batch fails
                self.metrics.ledger_failures.inc(len(posts))
                log.error("ledger refused %d posts: %s", len(posts), exc)
                self._events.extend(ev.LedgerFailed(p.txn_id, str(exc), now) for p in posts)
        else:
            submit = self.writer.submit
            for post in posts:
                txn_id = post.txn_id
                try:
                    submit(post.drafts, _LedgerCallback(self._from_thread, txn_id, t0, self.trace))
                except Exception as exc:  # LedgerBusy, invalid draft: this txn fails
                    self.metrics.ledger_failures.inc()
                    log.error("ledger refused txn %d: %s", txn_id, exc)
                    self._events.append(ev.LedgerFailed(txn_id, str(exc), now))
        self.metrics.ledger_batch.observe(entries)

    # --- store-and-forward --------------------------------------------------------------------------
    async def saf_sender(self, tick_ms: int, max_items: int) -> None:
        """Deliver due reversals/advices on up links (0400 first, 0401 repeats) until answered.

        Its database work (due items, mark-sent before the bytes leave, completions) runs in a worker
        thread: each is an fsync, and a reversal storm must not stall the terminals."""
        while True:
            now = self.now_ms()
            completions, self._saf_completions = self._saf_completions, []
            up = {name for name, group in self.groups.items() if group.up}
            depth, oldest_ms, due, completed = await trio.to_thread.run_sync(
                self._saf_io, completions, up, now, max_items
            )
            self.metrics.saf_depth.set(depth)
            self.metrics.saf_oldest_age.set(oldest_ms / 1000.0)
            for (_id, acquirer, mti, rrn, rc, _at), first in zip(completions, completed):
                if not first:
                    continue
                kind = "reversal" if mti == "0400" else "advice"
                if kind == "reversal":
                    self.metrics.reversals_completed.labels(acquirer).inc()
                else:
                    self.metrics.advices_completed.labels(acquirer).inc()
                self._events.append(ev.StoreForwardCompleted(acquirer, rrn, kind, rc, self.now_ms()))
            now = self.now_ms()
            for item in due:
                group = self.groups.get(item.acquirer)
                if group is None:
                    continue
                fields = dict(item.fields)
                fields["t"] = item.send_mti
                ctx = (SAF, item.id, item.acquirer, item.mti, fields.get("37", ""))
                link = group.send(fields, ctx, now, group.config.request_timeout_ms)
                if link is not None:
                    self.metrics.saf_sent.labels(group.config.name).inc()
                    if not link.dirty:
                        link.dirty = True
                        self._dirty_links.append(link)
            self._write_out()
            if self._events and not self._busy:
                self._drain()
            if self._saf_completions:
                continue
            with trio.move_on_after(tick_ms / 1000.0):
                await self._saf_wake.wait()
            self._saf_wake = trio.Event()

    def _saf_io(
        self, completions: list[SafCompletion], up: set[str], now: int, max_items: int
    ) -> tuple[int, int, list[Any], list[bool]]:
        """(worker thread) complete answered items, pick due ones on up links and mark them sent."""
        saf = self.saf
        completed = [saf.complete(item_id, at_ms, rc) for item_id, _acq, _mti, _rrn, rc, at_ms in completions]
        due = [item for item in saf.due(now, max_items) if item.acquirer in up]
        if due:
            saf.mark_sent_many([item.id for item in due], now)  # before the bytes leave: a crash repeats
        return saf.depth(), saf.oldest_age_ms(now), due, completed

    def _saf_answered(self, link: AcquirerLink, ctx: tuple, fields: dict, now: int) -> None:
        _, item_id, acquirer, mti, rrn = ctx
        self._saf_completions.append((item_id, acquirer, mti, rrn, fields.get("39", ""), now))
        self._saf_wake.set()


class _OnTrio:
    """A (error, value) callback called on another thread, run on the trio thread instead."""

    __slots__ = ("callback", "post", "stamp")

    def __init__(self, post: Callable[[Any], None], callback: Callable[[Any, Any], None]) -> None:
        self.post = post
        self.callback = callback
        self.stamp: Callable[[], None] | None = None  # stage trace (diagnostics)

    def __call__(self, error: BaseException | None, value: Any) -> None:
        if self.stamp is not None:
            self.stamp()
        self.post([(self.callback, error, value)])


class _LedgerCallback:
    """The ledger writer's per-submission callback (its thread): hands the result to the trio thread."""

    __slots__ = ("post", "t0", "trace", "txn_id")

    def __init__(
        self, post: Callable[[Any], None], txn_id: int, t0: float, trace: StageTrace | None = None
    ) -> None:
        self.post = post
        self.txn_id = txn_id
        self.t0 = t0
        self.trace = trace

    def __call__(self, entries: list[Entry] | None, error: BaseException | None) -> None:
        if self.trace is not None:
            self.trace.mark(self.txn_id, st.COMMIT_BACK)
        self.post((self.txn_id, self.t0, entries, error))


def _bare_answer(fields: dict, code: str) -> dict:
    """An answer built by the server itself (A0, 30): echo what identifies the request."""
    mti = fields.get("t", "")
    out = {"t": f"{mti[0]}{mti[1]}{int(mti[2]) + 1}0" if len(mti) == 4 and mti.isdigit() else mti}
    for f in ("3", "4", "11", "12", "13", "41", "42", "49"):
        if f in fields:
            out[f] = fields[f]
    out["39"] = code
    return out
