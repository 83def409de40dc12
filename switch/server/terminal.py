"""Terminal-facing TCP listeners: accept, read in batches, hand frames to the core, write answers together.

Shape (DESIGN.md "what costs what"): one reader and one writer task per CONNECTION, never a task per
request. The reader takes everything the socket has, feeds the FrameReader, and hands all complete
frames to the core in one synchronous call (decode, MAC check, processor, one ledger submit). Answers
come back whenever their entries are durable (any order) and are queued; at the end of the core's pass
(`write_now`) everything queued goes to the kernel in ONE write, straight from the trio thread. Only
what the kernel does not take at once waits for the writer task (`send_all`).

Why the socket's own calls instead of trio's stream methods on the hot path: a trio `receive_some` that
finds data still yields to the scheduler before returning it, and a wake-up of the writer task is a
task switch plus a whole scheduling round; measured with the stage trace (switch.server.stagetrace) at
2,400 purchases/s, each such hop cost a median of 3-15 ms, a purchase passing four of them. Here a read
that finds data is processed at once, a read that finds none waits in `trio.lowlevel.wait_readable`
(one yield), and every few reads in a row yield anyway (fairness, cancellation): switch.netio.

Limits from ListenerConfig, each with one clear log line when hit (switch.server.limits):

- max_connections: a connection beyond it is closed at once;
- max_inflight_per_connection: the reader stops taking frames (frames already read wait in a backlog,
  the socket is not read) until answers free the window, so TCP pushes back on the terminal;
- idle_timeout_ms: a connection with nothing in flight and no bytes for that long is closed (by one
  sweeper task per listener, not a deadline per read);
- max_frame_bytes: a frame header above it is a framing error; the connection is closed (the stream
  cannot be resynchronised).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from switch.codec.framing import FrameReader, FrameTooLongError, FramingError
from switch.config import ListenerConfig
from switch.netio import SocketReads
from switch.server import stagetrace
from switch.server.limits import LimitLog
from switch.server.metrics import Metrics

log = logging.getLogger(__name__)


_conn_ids = itertools.count(1)


class FrameHandler(Protocol):
    """What the listener needs from the core (switch.server.core.SwitchCore)."""

    def on_frames(self, conn: TerminalConnection, frames: Sequence[Any]) -> None: ...

    def on_closed(self, conn: TerminalConnection) -> None: ...


class TerminalConnection:
    """One terminal connection: its framing state, in-flight count and outbox.

    `terminal_id` is the last terminal seen on the connection (answers to undecodable messages are MACed
    with its key); `tpdu` the last TPDU received (answers carry it with source and destination swapped).
    """

    __slots__ = (
        "_backlog",
        "_capacity",
        "_closed",
        "_outbox",
        "_wake",
        "_writing",
        "config",
        "conn_id",
        "dirty",
        "fd",
        "inflight",
        "last_rx_s",
        "listener",
        "peer",
        "reader",
        "requests",
        "stream",
        "terminal_id",
        "tpdu",
        "traced",
    )

    def __init__(self, listener: TerminalListener, stream: trio.SocketStream) -> None:
        self.conn_id = next(_conn_ids)
        self.listener = listener
        self.config = listener.config
        self.stream = stream
        try:
            host, port = stream.socket.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:
            self.peer = "?"
        self.reader = FrameReader(
            self.config.framing, self.config.tpdu, self.config.max_frame_bytes, tpdu_id=None
        )
        self.inflight = 0
        self.last_rx_s = time.monotonic()
        #: The core's record of each request in flight, by (MTI class, STAN): dropped with the connection.
        self.requests: dict[tuple[str, str], Any] = {}
        self.terminal_id: str | None = None
        self.tpdu: bytes | None = None
        self._outbox: list[bytes] = []
        self._wake = trio.Event()
        self._capacity = trio.Event()
        self._backlog: deque[Any] = deque()
        self._closed = False
        self._writing = False  # the writer task is in send_all: no direct writes (byte order)
        #: Queued answers not yet handed to `write_now` (the core's list of connections to write).
        self.dirty = False
        self.fd = stream.socket.fileno()
        #: Stage-trace stamps of answers queued and not yet written (diagnostics; empty when off).
        self.traced: list[list[float]] = []

    # --- called by the core (synchronously, on the trio thread) ----------------------------------
    def request_started(self) -> None:
        self.inflight += 1

    def send(self, data: bytes, *, answers_request: bool = True) -> bool:
        """Queue one framed answer; `write_now` sends all queued answers in one write. True when
        queued (False: the connection is closing)."""
        if self._closed:
            return False
        self._outbox.append(data)
        if answers_request and self.inflight > 0:
            self.inflight -= 1
            if self.inflight < self.config.max_inflight_per_connection:
                self._capacity.set()
        return True

    def write_now(self) -> None:
        """Hand everything queued to the kernel in one write, from the caller (the trio thread, at the
        end of the core's pass); what the kernel does not take now is left to the writer task."""
        self.dirty = False
        out = self._outbox
        if not out or self._writing or self._closed:
            if out and not self._writing:
                self._wake.set()  # closing: the writer task flushes, then closes
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # reset by the peer: the writer task's send_all reports it and closes
            n = 0
        if n == len(data):
            self._outbox = []
            if self.traced:
                _stamp_written(self.traced)
                self.traced = []
        else:
            self._outbox = [data[n:]]
            self._wake.set()

    def close_soon(self) -> None:
        """Close after the answers already queued have been written (bad frame, bad message)."""
        self._closed = True
        self._wake.set()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- tasks -------------------------------------------------------------------------------------
    async def run(self, handler: FrameHandler) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, nursery.cancel_scope)
                await self._reader(handler)
                # Reader finished (EOF, idle, framing error): flush what is queued, then stop.
                self._closed = True
                self._wake.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closed = True
            handler.on_closed(self)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _reader(self, handler: FrameHandler) -> None:
        cfg = self.config
        lst = self.listener
        max_inflight = cfg.max_inflight_per_connection
        reads = SocketReads(self.stream.socket)
        while not self._closed:
            if self._backlog:
                room = max_inflight - self.inflight
                if room <= 0:
                    lst.inflight_limit.hit(f"{self.peer} has {self.inflight} requests in flight")
                    self._capacity = trio.Event()
                    await self._capacity.wait()
                    continue
                take = [self._backlog.popleft() for _ in range(min(room, len(self._backlog)))]
                handler.on_frames(self, take)
                continue
            # No deadline per receive (a cancel scope per read costs more than parsing a frame): the
            # listener's idle sweeper closes connections that stay quiet (TerminalListener._sweep_idle).
            try:
                data = await reads.read()
            except (trio.ClosedResourceError, OSError):
                return
            self.last_rx_s = time.monotonic()
            if not data:
                return
            try:
                frames = self.reader.feed(data)
            except FramingError as exc:
                lst.metrics.framing_errors.labels("terminal").inc()
                if isinstance(exc, FrameTooLongError):
                    lst.frame_limit.hit(f"{self.peer}: {exc}; closing")
                else:
                    log.warning("%s %s: bad frame: %s; closing", cfg.name, self.peer, exc)
                return
            if not frames:
                continue
            room = max_inflight - self.inflight
            if len(frames) > room:
                self._backlog.extend(frames[max(room, 0) :])
                frames = frames[: max(room, 0)]
            if frames:
                handler.on_frames(self, frames)

    async def _writer(self, scope: trio.CancelScope) -> None:
        """What `write_now` could not write at once (a full socket buffer), and the last answers of a
        closing connection."""
        stream = self.stream
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._outbox:
                out = self._outbox
                self._outbox = []
                self._writing = True
                try:
                    await stream.send_all(out[0] if len(out) == 1 else b"".join(out))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._closed = True
                    scope.cancel()
                    return
                finally:
                    self._writing = False
                if self.traced:
                    _stamp_written(self.traced)
                    self.traced = []
            if self._closed and not self._outbox:
                scope.cancel()
                return


def _stamp_written(traced: list[list[float]]) -> None:
    at = time.perf_counter()
    for stamps in traced:
        stamps[stagetrace.WRITTEN] = at


class TerminalListener:
    """One ListenerConfig: a TCP listener with a connection limit, serving TerminalConnections."""

    def __init__(self, config: ListenerConfig, handler: FrameHandler, metrics: Metrics) -> None:
        self.config = config
        self.handler = handler
        self.metrics = metrics
        self.connections: dict[int, TerminalConnection] = {}
        where = f"listener {config.name}"
        self.conn_limit = LimitLog(
            log, where, "max_connections", metrics.limit_hits.labels(config.name, "max_connections")
        )
        self.inflight_limit = LimitLog(
            log,
            where,
            "max_inflight_per_connection",
            metrics.limit_hits.labels(config.name, "max_inflight_per_connection"),
        )
        self.idle_limit = LimitLog(
            log, where, "idle_timeout_ms", metrics.limit_hits.labels(config.name, "idle_timeout_ms")
        )
        self.frame_limit = LimitLog(
            log, where, "max_frame_bytes", metrics.limit_hits.labels(config.name, "max_frame_bytes")
        )
        self._open_gauge = metrics.open_connections.labels(config.name)
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host, backlog=1024)
        self.port = listeners[0].socket.getsockname()[1]
        log.info(
            "listener %s (%s, %s%s) on %s:%d",
            cfg.name,
            cfg.profile,
            cfg.framing,
            "+tpdu" if cfg.tpdu else "",
            cfg.host,
            self.port,
        )
        async with trio.open_nursery() as nursery:
            for ln in listeners:
                nursery.start_soon(self._accept_loop, ln, nursery)
            nursery.start_soon(self._sweep_idle)
            task_status.started(self.port)

    async def _sweep_idle(self) -> None:
        """Close connections with nothing in flight that sent nothing for idle_timeout_ms (checked a few
        times per timeout, at most once a second: a connection is closed at most 25% late)."""
        idle_s = self.config.idle_timeout_ms / 1000.0
        interval_s = min(1.0, idle_s / 4)
        while True:
            await trio.sleep(interval_s)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.inflight == 0 and not conn._backlog and now - conn.last_rx_s >= idle_s:
                    if not conn.closed:
                        self.idle_limit.hit(
                            f"{conn.peer} sent nothing for {self.config.idle_timeout_ms} ms; closing"
                        )
                    conn.close_soon()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off instead of spinning
                    log.warning("listener %s: accept failed: %s", self.config.name, exc)
                    await trio.sleep(0.1)
                    continue
                if len(self.connections) >= self.config.max_connections:
                    self.conn_limit.hit(f"{len(self.connections)} connections open; refusing a new one")
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    continue
                conn = TerminalConnection(self, stream)
                self.connections[conn.conn_id] = conn
                self._open_gauge.inc()
                nursery.start_soon(self._run_connection, conn)

    async def _run_connection(self, conn: TerminalConnection) -> None:
        started = time.monotonic()
        try:
            await conn.run(self.handler)
        finally:
            self.connections.pop(conn.conn_id, None)
            self._open_gauge.dec()
            log.debug("connection %s closed after %.1f s", conn.peer, time.monotonic() - started)
