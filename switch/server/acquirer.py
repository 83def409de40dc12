"""Acquirer links: several persistent TCP connections per acquirer, each signed on and echoed.

One `AcquirerLink` per configured connection performs what its sans-I/O state machine
(switch.routing.link_state.LinkState) decides: connect → sign-on (0800, 70=001) → up, an echo (0800,
70=301) when idle for echo_interval_ms; a failed connect, a lost connection or max_echo_failures
unanswered echoes mark it down and it reconnects after the machine's backoff. Requests
are matched to answers by switch.routing.matching (the link's own STANs); an answer nobody waits for is
counted and logged, never delivered. Tasks: a reader and a writer per link connection, never one per
request. Answers read in one receive are handed to the core in one call, so their ledger work batches.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from switch.codec.framing import FramingError
from switch.codec.keys import SecretKey
from switch.codec.wire import MacFn, Wire, WireError, make_mac_fn
from switch.config import AcquirerConfig
from switch.netio import SocketReads
from switch.routing.link_state import (
    Connect,
    Decision,
    LinkPhase,
    LinkState,
    MarkDown,
    SendEcho,
    SendSignOn,
)
from switch.routing.matching import LinkFullError, LinkMatcher, Matched, MatchingError, Pending
from switch.server import stagetrace
from switch.server.limits import LimitLog
from switch.server.metrics import Metrics
from switch.server.stagetrace import StageTrace

log = logging.getLogger(__name__)

#: A TCP connect that takes longer than this counts as a failed attempt (then backoff).
CONNECT_TIMEOUT_MS = 5_000
#: Longest sleep of the echo timer; it wakes earlier when the state machine has something due.
TICK_MS = 1_000

NETWORK = "network"  # context of sign-on / echo requests


class LinkOwner(Protocol):
    """What a link needs from the core (switch.server.core.SwitchCore)."""

    def now_ms(self) -> int: ...

    def on_link_answers(self, link: AcquirerLink, answers: Sequence[tuple[Pending[Any], dict]]) -> None: ...

    def on_link_lost(self, link: AcquirerLink, pending: Sequence[Pending[Any]]) -> None: ...

    def on_link_state(self, link: AcquirerLink) -> None: ...


_tt_cache: list = [-1, ""]  # (UTC second, field 7 text): strftime once a second, not per request


def _transmission_time() -> str:
    now = int(time.time())
    if now != _tt_cache[0]:
        _tt_cache[0], _tt_cache[1] = now, time.strftime("%m%d%H%M%S", time.gmtime(now))
    return _tt_cache[1]


class AcquirerLink:
    """One persistent connection to an acquirer, with its matcher, outbox and state."""

    def __init__(
        self,
        config: AcquirerConfig,
        index: int,
        owner: LinkOwner,
        metrics: Metrics,
        rng: random.Random | None = None,
        mac_key: SecretKey | None = None,
    ) -> None:
        """`mac_key`: the link MAC key opened from config.mac_key_sealed_hex (None: not MACed)."""
        self.config = config
        self.index = index
        self.name = f"{config.name}#{index}"
        self.owner = owner
        self.metrics = metrics
        self.wire = Wire(config.profile, config.framing)
        self.mac_fn: MacFn | None = make_mac_fn(mac_key.value) if mac_key is not None else None
        # STAN ranges per link start apart so a log reader can tell links apart.
        self.matcher: LinkMatcher[Any] = LinkMatcher.from_config(config, stan_start=1 + index * 100_000)
        self.ls = LinkState.from_config(config, index, rng or random.Random())
        self.state = self.ls.phase.value
        self._outbox: list[bytes] = []
        self._wake = trio.Event()
        self._down_reason = ""
        self._down_log = LimitLog(log, f"acquirer link {self.name}", "reconnect")
        self._bad_log = LimitLog(log, f"acquirer link {self.name}", "bad answers")
        self._scope: trio.CancelScope | None = None
        self.unmatched_log = LimitLog(log, f"acquirer link {self.name}", "unmatched answers")
        self._latency = metrics.acquirer_latency.labels(config.name)
        self._unmatched = metrics.unmatched.labels(config.name)
        #: Stage trace (diagnostics, switch.server.stagetrace); set by the core's owner when on.
        self.trace: StageTrace | None = None
        self._outbox_ctx: list[Any] = []
        #: Requests queued and not yet handed to `write_now` (the core's list of links to write).
        self.dirty = False
        self._writing = False  # the writer task is in send_all: no direct writes (byte order)
        self._fd = -1  # the connection's socket while a session runs

    @property
    def up(self) -> bool:
        return self.state == "up"

    # --- sending (synchronous, called by the core) --------------------------------------------------
    def send_request(self, fields: dict[str, Any], context: Any, now_ms: int, timeout_ms: int) -> None:
        """Give the request this link's STAN, register it, queue it for `write_now` (the caller's end
        of pass). Raises MatchingError if full."""
        stan = self.matcher.next_stan()
        fields["11"] = stan
        fields.setdefault("7", _transmission_time())
        try:
            payload = self.wire.encode(fields, self.mac_fn)
        except Exception:
            self.matcher.cancel_stan(stan)
            raise
        self.matcher.register(fields, now_ms, context, timeout_ms)
        self._outbox.append(self.wire.frame(payload))
        if self.trace is not None:
            self._outbox_ctx.append(context)

    def write_now(self) -> None:
        """Hand everything queued to the kernel in one write from the trio thread (no writer-task
        round, as switch.server.terminal); what the kernel does not take now is left to the writer."""
        self.dirty = False
        out = self._outbox
        if not out or self._writing or self._fd < 0:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            n = os.write(self._fd, data)
        except OSError:  # full (BlockingIOError) or broken: the writer task's send_all takes over
            n = 0
        if n == len(data):
            self._outbox = []
            if self.trace is not None:
                ctxs, self._outbox_ctx = self._outbox_ctx, []
                self.trace.marker(ctxs, stagetrace.LINK_WRITTEN)()
        else:
            self._outbox = [data[n:]]
            self._wake.set()

    # --- the connection loop (driven by switch.routing.link_state) ------------------------------------
    async def run(self) -> None:
        cfg = self.config
        st = self.ls
        while True:
            now = self.owner.now_ms()
            due = st.next_due_ms()
            if due is not None and due > now:
                await trio.sleep((due - now) / 1000.0)
                continue
            for decision in st.poll(self.owner.now_ms()):
                if not isinstance(decision, Connect):
                    continue
                self._sync_state()
                try:
                    with trio.fail_after(CONNECT_TIMEOUT_MS / 1000.0):
                        stream = await trio.open_tcp_stream(cfg.host, cfg.port)
                except (OSError, trio.TooSlowError) as exc:
                    reason = f"connect to {cfg.host}:{cfg.port} failed: {exc or 'timeout'}"
                    self._down_log.hit(reason)
                    st.connect_failed(self.owner.now_ms(), reason)
                    self._sync_state()
                    continue
                reason = "connection lost"
                try:
                    reason = await self._session(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    reason = f"connection lost: {exc}"
                finally:
                    st.connection_lost(self.owner.now_ms(), reason)
                    self._outbox.clear()
                    self._outbox_ctx.clear()
                    self._sync_state()
                    log.warning("acquirer link %s down: %s", self.name, st.last_down_reason or reason)
                    lost = [p for p in self.matcher.drain() if not _is_network(p.context)]
                    self.owner.on_link_lost(self, lost)
                    with trio.CancelScope(shield=True):
                        await stream.aclose()

    async def _session(self, stream: trio.SocketStream) -> str:
        """Run one connection until it closes or the state machine marks it down; returns why."""
        self._down_reason = "connection lost"
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer, stream)
                nursery.start_soon(self._reader, stream)
                self._fd = stream.socket.fileno()
                self._apply(self.ls.connected(self.owner.now_ms()))
                nursery.start_soon(self._ticker)
        finally:
            self._fd = -1  # before the socket closes: its number may be reused
            self._scope = None
        return self._down_reason

    def _apply(self, decisions: Sequence[Decision]) -> None:
        """Perform the state machine's decisions for the current connection."""
        for d in decisions:
            if isinstance(d, SendSignOn):
                self._send_network("001")
            elif isinstance(d, SendEcho):
                self._send_network("301")
            elif isinstance(d, MarkDown):
                self._down_reason = d.reason
                if self._scope is not None:
                    self._scope.cancel()
        self._sync_state()

    async def _ticker(self) -> None:
        """Echo timing: poll the state machine when it has something due."""
        st = self.ls
        while True:
            now = self.owner.now_ms()
            due = st.next_due_ms()
            wait_ms = TICK_MS if due is None else max(0, min(due - now, TICK_MS))
            await trio.sleep(wait_ms / 1000.0)
            self._apply(st.poll(self.owner.now_ms()))

    def _send_network(self, code: str) -> None:
        fields = {"t": "0800", "70": code}
        try:
            self.send_request(fields, (NETWORK, code), self.owner.now_ms(), self.config.request_timeout_ms)
        except MatchingError as exc:
            log.warning("acquirer link %s: cannot send network message %s: %s", self.name, code, exc)
        self.write_now()

    async def _writer(self, stream: trio.SocketStream) -> None:
        """What `write_now` could not write at once (a full socket buffer)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._outbox:
                out = self._outbox
                self._outbox = []
                self._writing = True
                try:
                    await stream.send_all(out[0] if len(out) == 1 else b"".join(out))
                finally:
                    self._writing = False
                if self.trace is not None:
                    ctxs, self._outbox_ctx = self._outbox_ctx, []
                    self.trace.marker(ctxs, stagetrace.LINK_WRITTEN)()

    async def _reader(self, stream: trio.SocketStream) -> None:
        """Reads straight from the socket (switch.netio): a read that finds data is processed at once."""
        reader = self.wire.reader(self.config.max_frame_bytes)
        reads = SocketReads(stream.socket)
        while True:
            data = await reads.read()
            if not data:
                self._apply([MarkDown("closed by the acquirer")])
                return
            try:
                frames = reader.feed(data)
            except FramingError as exc:
                self.metrics.framing_errors.labels("acquirer").inc()
                self._apply([MarkDown(f"bad frame: {exc}")])
                return
            now_ms = self.owner.now_ms()
            read_at = time.perf_counter()
            answers: list[tuple[Pending[Any], dict]] = []
            for frame in frames:
                payload = _payload(frame)
                try:
                    fields = self.wire.decode(payload)
                except WireError as exc:
                    self.metrics.decode_errors.labels("acquirer").inc()
                    self._bad_log.hit(f"undecodable answer dropped: {exc}")
                    continue
                if self.mac_fn is not None and not self.wire.verify(payload, self.mac_fn):
                    self.metrics.mac_failures.labels("acquirer").inc()
                    self._bad_log.hit(
                        f"answer MTI {fields.get('t')} STAN {fields.get('11')} failed its MAC; dropped"
                    )
                    continue
                result = self.matcher.match(fields, now_ms)
                if not isinstance(result, Matched):
                    self._unmatched.inc()
                    self.unmatched_log.hit(
                        f"{result.reason} answer MTI {result.mti} STAN {result.stan} (counted, not delivered)"
                    )
                    continue
                self.ls.traffic(now_ms)
                ctx = result.pending.context
                if isinstance(ctx, tuple) and ctx and ctx[0] == NETWORK:
                    self._network_answer(ctx[1], fields, now_ms)
                    continue
                self._latency.observe(result.elapsed_ms / 1000.0)
                answers.append((result.pending, fields))
                if self.trace is not None:
                    self.trace.mark(ctx, stagetrace.ANSWER_READ, read_at)
            if answers:
                self.owner.on_link_answers(self, answers)

    def _network_answer(self, code: str, fields: dict[str, Any], now_ms: int) -> None:
        ok = fields.get("39") == "00"
        st = self.ls
        if code == "001" and st.phase is LinkPhase.SIGNING_ON:
            if ok:
                self._apply(st.sign_on_ok(now_ms))
            else:
                self._apply(st.sign_on_failed(now_ms, f"sign-on refused (39={fields.get('39')})"))
        elif code == "301":
            self._apply(st.echo_ok(now_ms) if ok else st.echo_failed(now_ms))

    def expire(self, now_ms: int) -> list[Pending[Any]]:
        """Requests past their deadline; the link's own sign-on/echo expiries go to its state machine."""
        out = []
        st = self.ls
        for p in self.matcher.expire(now_ms):
            ctx = p.context
            if isinstance(ctx, tuple) and ctx and ctx[0] == NETWORK:
                if ctx[1] == "001" and st.phase is LinkPhase.SIGNING_ON:
                    self._apply(st.sign_on_failed(now_ms, "sign-on unanswered"))
                elif ctx[1] == "301":
                    self._apply(st.echo_failed(now_ms))
                continue
            out.append(p)
        return out

    def _sync_state(self) -> None:
        state = self.ls.phase.value
        if state != self.state:
            if state == "up" or self.state == "up":
                log.info("acquirer link %s: %s -> %s", self.name, self.state, state)
            self.state = state
            self.owner.on_link_state(self)


def _is_network(ctx: Any) -> bool:
    return isinstance(ctx, tuple) and bool(ctx) and ctx[0] == NETWORK


def _payload(frame: Any) -> bytes:
    """The message bytes of a frame from FrameReader (bytes, or an object/tuple carrying them)."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return bytes(frame)
    payload = getattr(frame, "payload", None)
    if payload is not None:
        return bytes(payload)
    return bytes(frame[0])


class AcquirerGroup:
    """All links of one acquirer: picks an up link with room, round robin."""

    def __init__(self, config: AcquirerConfig, links: list[AcquirerLink]) -> None:
        self.config = config
        self.links = links
        self._next = 0

    @property
    def up(self) -> bool:
        return any(link.up for link in self.links)

    def pick(self) -> AcquirerLink | None:
        n = len(self.links)
        for i in range(n):
            link = self.links[(self._next + i) % n]
            if link.up and not link.matcher.full:
                self._next = (self._next + i + 1) % n
                return link
        return None

    def send(self, fields: dict[str, Any], context: Any, now_ms: int, timeout_ms: int) -> AcquirerLink | None:
        """Queue on some up link; that link (the caller calls its `write_now` at the end of its pass),
        or None if no link is up or all are full."""
        for _ in range(len(self.links)):
            link = self.pick()
            if link is None:
                return None
            try:
                link.send_request(dict(fields), context, now_ms, timeout_ms)
                return link
            except LinkFullError:
                continue
        return None


StateListener = Callable[[AcquirerLink], None]
