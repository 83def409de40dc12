"""The ledger writer in a process of its own, behind the writer's own interface (submit / append / size /
close), so the switch uses both cores.

Why: the ledger writer (switch.ledger.writer) is a thread that spends most of a batch in Python (rules,
hashing, Merkle frontier, row building) and in SQLite calls that drop and retake the GIL per statement
step. In the switch's process it competes with the trio thread for the one GIL: measured on the 2-core
VM, its group commits took 20-80 ms (waiting for the GIL at every retake, a GIL switch interval each)
where the disk needed 0.2-5 ms, and its Python work was ~10% of the trio thread's budget. In a child
process it runs on the other core with a GIL to itself.

Protocol (msgspec msgpack in multiprocessing.connection frames over a socketpair): the switch sends
`Submit` batches -- one per flush of the core, each holding every outcome of that batch (`submit_many`)
-- and the child hands each submission to a real LedgerWriter (same batching, rules, idempotency,
durability) and sends each batch's completions back as one `Results` from the writer's thread (the
armed store's from its thread), no sender thread in between. A submission's answer is durable before it
is sent, exactly as with the in-process writer; the switch (its trio thread via `attach_pump`/`pump`, or
its results thread) calls each `on_done` with rebuilt `Entry` objects (the child sends sequence
numbers, and drafts only when the ledger returned different ones, i.e. originals of an idempotent
repeat) or with the error rebuilt as its ledger class (IdempotencyConflict, LedgerRejected subclasses,
LedgerBusy...).

The child also keeps the armed-reversal store (switch.server.armed): the core's arms and releases ride
in the same message as its ledger posts (`arm`, `release`, then `flush`); the child's reading thread
writes them in group commits (every message already read: one fsync per group, in order) right after
handing the messages' posts to the writer, and answers them itself.
So the switch's process does no armed-reversal I/O, sealing or thread hand-off at all; it only reads
the store at start-up (recovery), before the child writes.

Failure: if the child dies, every pending submission fails with LedgerUnavailable and so does every
later one (the processor answers 96; nothing is reported durable that was not). The child stops, after
committing what it has, when the switch closes it or when its pipe reaches end of file (the switch died).
The child is a fresh interpreter (`python -m switch.server.ledger_process <fd>`, its end of a socketpair
passed as that fd; the config comes as the first message): the switch has threads, so fork would copy
their locks, and multiprocessing's spawn would re-import the embedding program's main module.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from switch.config import ServerConfig, SwitchConfig
from switch.ledger import backend as ledger_backend
from switch.ledger import model as ledger_model
from switch.ledger import rules as ledger_rules
from switch.ledger import writer as ledger_writer
from switch.ledger.model import Entry, EntryDraft

log = logging.getLogger(__name__)

OnDone = Callable[[list[Entry] | None, BaseException | None], None]
#: An arm job's callback: (error or None, None) -- switch.server.durable's shape.
ArmDone = Callable[[BaseException | None, Any], None]

#: Longest wait for the child to open the ledger and report its size.
START_TIMEOUT_S = 60.0
#: Completions the child puts in one message at most.
MAX_RESULTS_PER_MESSAGE = 4_096
#: Messages the child takes in one round (their arms are one commit) at most.
MAX_MESSAGES_PER_ROUND = 64
#: How often the results thread looks whether it should hand reading over (`attach_pump`).
READER_POLL_S = 0.05
#: Bytes asked of the socket per read when pumped.
PUMP_RECEIVE_BYTES = 262_144
_LEN = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")


# --- messages ---------------------------------------------------------------------------------------------
class Submit(msgspec.Struct, tag="s", array_like=True):
    items: list[tuple[int, list[EntryDraft]]]
    #: Armed reversals to store durably before answering `arm_id`: (acquirer, rrn, fields, now_ms).
    arms: list[tuple[str, str, dict[str, Any], int]] = []
    arm_id: int = 0
    #: Armed reversals to delete (after `arms`, in the same transaction).
    releases: list[tuple[str, str]] = []


class Close(msgspec.Struct, tag="c", array_like=True):
    timeout_s: float | None


class Result(msgspec.Struct, array_like=True):
    sub_id: int
    seqs: list[int]
    #: The committed drafts when they are not the submitted ones (idempotent repeat); else None.
    drafts: list[EntryDraft] | None = None
    error_type: str = ""
    error: str = ""


class Results(msgspec.Struct, tag="r", array_like=True):
    done: list[Result]
    size: int
    #: Arm jobs finished: (arm_id, error text or "").
    armed: list[tuple[int, str]] = []


class Ready(msgspec.Struct, tag="ready", array_like=True):
    size: int


class Failed(msgspec.Struct, tag="fail", array_like=True):
    reason: str


class Closed(msgspec.Struct, tag="closed", array_like=True):
    size: int


_to_child = msgspec.msgpack.Decoder(Submit | Close)
_to_parent = msgspec.msgpack.Decoder(Results | Ready | Failed | Closed)
_encoder = msgspec.msgpack.Encoder()

#: Error classes rebuilt on the switch's side by name (anything else arrives as LedgerUnavailable).
_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        ledger_model.IdempotencyConflict,
        ledger_model.UnbalancedEntry,
        ledger_rules.LedgerRejected,
        ledger_rules.OriginalNotFound,
        ledger_rules.HoldAlreadyResolved,
        ledger_rules.RefundExceedsOriginal,
        ledger_rules.DuplicateTransaction,
        ledger_rules.RuleViolation,
        ledger_rules.LedgerCorrupt,
        ledger_backend.LedgerStorageError,
        ledger_writer.LedgerBusy,
        ledger_writer.LedgerUnavailable,
        ValueError,
    )
}


def _rebuild_error(name: str, text: str) -> BaseException:
    cls = _ERRORS.get(name)
    if cls is None:
        return ledger_writer.LedgerUnavailable(f"{name}: {text}")
    try:
        return cls(text)
    except Exception:
        return ledger_writer.LedgerUnavailable(f"{name}: {text}")


# --- the switch's side ------------------------------------------------------------------------------------
def _raise_priority(pid: int, steps: int) -> bool:
    """Set process `pid`'s nice value `steps` below ours (a higher CPU priority). False, and an info
    line, when this process may not (an unprivileged user can only lower priorities)."""
    if steps <= 0:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) - steps)
    except OSError as exc:
        log.info(
            "ledger writer process keeps the switch's CPU priority (raising it by %d needs CAP_SYS_NICE "
            "or RLIMIT_NICE): %s",
            steps,
            exc.strerror,
        )
        return False
    return True


class RemoteLedgerWriter:
    """A LedgerWriter running in a child process. Thread-safe; `submit_many` sends one message."""

    def __init__(
        self,
        config: SwitchConfig,
        *,
        environ: Mapping[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.max_pending_arms = config.server.max_pending_durable_items
        self._arms_in_flight = 0
        ours, theirs = socket.socketpair()
        # The child opens the armed-reversal store under the KEK: hand it the one variable it reads
        # when the switch was given its own environment (tests); otherwise it inherits ours.
        env = dict(os.environ)
        kek_env = config.keys.kek_env
        if environ is not None and kek_env in environ:
            env[kek_env] = environ[kek_env]
        try:
            self._proc = _Proc(
                subprocess.Popen(
                    [sys.executable, "-m", "switch.server.ledger_process", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            )
        finally:
            theirs.close()
        # Right after exec, before the child starts its threads: they inherit its priority (on Linux a
        # priority is per thread).
        self.priority_raised = _raise_priority(self._proc.pid, config.server.ledger_process_priority_steps)
        self._conn = Connection(ours.detach())
        self._conn.send_bytes(msgspec.msgpack.encode(config))
        atexit.register(self._at_exit)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Sequence[EntryDraft], OnDone]] = {}
        self._arm_pending: dict[int, ArmDone] = {}
        # Queued for the next message (flush): submissions, arms (one job), releases.
        self._out_items: list[tuple[int, list[EntryDraft]]] = []
        self._out_arms: list[tuple[str, str, dict[str, Any], int]] = []
        self._out_arm_done: list[ArmDone] = []
        self._out_releases: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._failure: str | None = None
        self._closed = threading.Event()
        self._size = 0
        try:
            if not self._conn.poll(start_timeout_s):
                raise ledger_writer.LedgerUnavailable(
                    f"ledger writer process did not start within {start_timeout_s:.0f} s"
                )
            first = _to_parent.decode(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self._proc.join(5)
            raise ledger_writer.LedgerUnavailable(
                f"ledger writer process exited at start (code {self._proc.exitcode}): {exc}"
            ) from None
        except BaseException:
            self._kill()
            raise
        if isinstance(first, Failed):
            self._proc.join(5)
            raise ledger_writer.LedgerUnavailable(f"ledger writer process: {first.reason}")
        assert isinstance(first, Ready)
        self._size = first.size
        # Results are read by a thread of ours until an event loop takes them over (attach_pump).
        self._stop_reader = False
        self._pump_sock: socket.socket | None = None
        self._pump_buf = bytearray()
        self._pump_lock = threading.Lock()
        self._pump_thread = 0
        self._reader = threading.Thread(target=self._read_loop, name="ledger-results", daemon=True)
        self._reader.start()

    # --- LedgerWriter's interface ------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Entries committed so far (as last reported by the child)."""
        return self._size

    def submit(self, drafts: Sequence[EntryDraft], on_done: OnDone) -> None:
        self.submit_many([(drafts, on_done)])
        self.flush()

    def submit_many(self, subs: Sequence[tuple[Sequence[EntryDraft], OnDone]]) -> None:
        """Queue several outcomes for the next `flush` (one message); each `on_done` is called from the
        reader thread once its entries are durable (or failed). Raises LedgerUnavailable once the child
        is gone."""
        with self._lock:
            if self._failure is not None:
                raise ledger_writer.LedgerUnavailable(self._failure)
            for drafts, on_done in subs:
                if not drafts:
                    raise ValueError("submit needs at least one draft")
                sub_id = next(self._ids)
                self._pending[sub_id] = (drafts, on_done)
                self._out_items.append((sub_id, list(drafts)))

    # --- armed reversals (switch.server.durable's arm/release, kept in this process's child) -------
    def arm(
        self, items: Sequence[tuple[str, str, Mapping[str, Any] | None]], now_ms: int, on_done: ArmDone
    ) -> None:
        """Queue armed reversals for the next `flush`; `on_done(error, None)` once they are durable.
        All arms of one flush are one job (one fsync in the child). Past `max_pending_arms` arms not
        yet durable, raises LedgerBusy (the request is then not sent)."""
        rows = [(acq, rrn, dict(f), now_ms) for acq, rrn, f in items if f is not None]
        with self._lock:
            if self._failure is not None:
                raise ledger_writer.LedgerUnavailable(self._failure)
            if self._arms_in_flight + len(rows) > self.max_pending_arms:
                raise ledger_writer.LedgerBusy(
                    f"{self._arms_in_flight} armed reversals not yet durable "
                    f"(server.max_pending_durable_items={self.max_pending_arms})"
                )
            self._arms_in_flight += len(rows)
            self._out_arms.extend(rows)
            self._out_arm_done.append(_Counted(self, len(rows), on_done))

    def release(self, items: Sequence[tuple[str, str]]) -> None:
        """Queue deletions of armed reversals for the next `flush` (no answer: a lost release leaves a
        spurious armed row that start-up recovery resolves against the ledger)."""
        with self._lock:
            if self._failure is None:
                self._out_releases.extend((acq, rrn) for acq, rrn in items)

    def flush(self) -> None:
        """Send everything queued since the last flush as one message."""
        with self._send_lock:
            with self._lock:
                if not (self._out_items or self._out_arm_done or self._out_releases):
                    return
                arm_id = 0
                if self._out_arm_done:
                    arm_id = next(self._ids)
                    done = self._out_arm_done
                    self._arm_pending[arm_id] = done[0] if len(done) == 1 else _all_of(done)
                msg = Submit(self._out_items, self._out_arms, arm_id, self._out_releases)
                self._out_items, self._out_arms, self._out_arm_done, self._out_releases = [], [], [], []
                failure = self._failure
            if failure is None:
                try:
                    self._conn.send_bytes(_encoder.encode(msg))
                    return
                except (OSError, ValueError) as exc:
                    failure = f"ledger writer process unreachable: {exc}"
        self._fail(failure)

    def append(self, drafts: Sequence[EntryDraft], timeout_s: float | None = None) -> list[Entry]:
        """Blocking submit: the committed entries, or the error (LedgerTimeout after `timeout_s`)."""
        done = threading.Event()
        box: list[tuple[list[Entry] | None, BaseException | None]] = []

        def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
            box.append((entries, error))
            done.set()

        self.submit(drafts, on_done)
        if self._pump_thread == threading.get_ident():  # we are the reader: read until answered
            self._pump_until(done, timeout_s)
        if not done.wait(timeout_s):
            raise ledger_writer.LedgerTimeout(f"ledger append not answered within {timeout_s} s")
        entries, error = box[0]
        if error is not None:
            raise error
        return entries or []

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Let the child commit what it has and write its final checkpoint, then stop it."""
        self.flush()
        if self._proc.is_alive() and self._failure is None:
            try:
                with self._send_lock:
                    self._conn.send_bytes(_encoder.encode(Close(timeout_s)))
            except (OSError, ValueError):
                pass
            wait_s = None if timeout_s is None else timeout_s + 5
            if self._pump_sock is not None:  # nobody else reads now: read until Closed
                self._pump_until(self._closed, wait_s)
            self._closed.wait(wait_s)
        self._proc.join(10)
        if self._proc.is_alive():
            log.error("ledger writer process did not stop; terminating it")
            self._kill()
        self._fail("ledger writer is closed")
        self._conn.close()
        if self._pump_sock is not None:
            self._pump_sock.close()
        atexit.unregister(self._at_exit)

    # --- internals -----------------------------------------------------------------------------------
    def _kill(self) -> None:
        self._proc.kill()  # the child ignores SIGTERM (see child_main)
        self._proc.join(5)

    def _at_exit(self) -> None:
        """Interpreter exit without close(): end of file tells the child to commit what it has and stop
        (it ignores SIGTERM), and we wait for that rather than leave it behind."""
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._kill()

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = reason
            pending, self._pending = self._pending, {}
            arms, self._arm_pending = self._arm_pending, {}
        error = ledger_writer.LedgerUnavailable(reason)
        for _drafts, on_done in pending.values():
            _call(on_done, None, error)
        for arm_done in arms.values():
            try:
                arm_done(error, None)
            except Exception:
                log.exception("arm completion callback failed")

    # --- reading the child's messages: a thread, or the event loop (attach_pump / pump) -------------
    def attach_pump(self) -> socket.socket:
        """Stop the results thread and let the caller read the child's messages: it waits until the
        returned socket is readable, then calls `pump()` (the trio core does, on the trio thread).

        Why: with a thread, every result had to win the GIL from the busy trio thread (up to a switch
        interval, 5 ms) and then wake the event loop again through `run_sync_soon`; measured with the
        stage trace at 2,400 purchases/s, each of the two hops of a purchase cost a median of 3.6 ms.
        Read by the loop itself, a result is handled in the scheduling round that sees it arrive.
        Callbacks then run on the caller's thread; a blocking `append` from that thread reads itself."""
        self._stop_reader = True
        self._reader.join()
        with self._pump_lock:
            if self._pump_sock is None:
                self._pump_sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._pump_thread = threading.get_ident()
        return self._pump_sock

    def pump(self) -> bool:
        """Read what the child has sent, without blocking, and handle every complete message. False
        once the child is gone (its results failed, as with the thread)."""
        sock = self._pump_sock
        if sock is None:
            return False
        with self._pump_lock:
            buf = self._pump_buf
            eof = False
            while True:
                try:
                    chunk = sock.recv(PUMP_RECEIVE_BYTES, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    eof = True
                    break
                buf += chunk
                if len(chunk) < PUMP_RECEIVE_BYTES:
                    break
            msgs: list[Any] = []
            pos = 0
            with memoryview(buf) as view:
                while len(buf) - pos >= 4:
                    (n,) = _LEN.unpack_from(buf, pos)
                    head = 4
                    if n == -1:  # multiprocessing.connection's header of a message above 2 GiB
                        if len(buf) - pos < 12:
                            break
                        (n,) = _LEN64.unpack_from(buf, pos + 4)
                        head = 12
                    if len(buf) - pos - head < n:
                        break
                    try:
                        msgs.append(_to_parent.decode(view[pos + head : pos + head + n]))
                    except msgspec.DecodeError as exc:
                        msgs.append(exc)
                    pos += head + n
            del buf[:pos]
        for msg in msgs:
            self._handle(msg)
        if eof:
            self._gone()
            return False
        return True

    def _pump_until(self, done: threading.Event, timeout_s: float | None) -> None:
        """Read on this thread (the pump's owner, blocked in a call) until `done` is set."""
        sock = self._pump_sock
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while sock is not None and not done.is_set():
            left = READER_POLL_S if deadline is None else min(READER_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return
            try:
                ready, _, _ = select.select([sock], [], [], left)
            except (OSError, ValueError):
                return
            if ready and not self.pump():
                return

    def _read_loop(self) -> None:
        conn = self._conn
        while not self._stop_reader:
            try:
                if not conn.poll(READER_POLL_S):
                    continue
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                self._gone()
                return
            try:
                msg: Any = _to_parent.decode(raw)
            except msgspec.DecodeError as exc:
                msg = exc
            self._handle(msg)

    def _gone(self) -> None:
        """End of file from the child: everything pending fails."""
        if not self._closed.is_set():
            log.critical("ledger writer process exited (code %s)", self._proc.exitcode)
        self._fail(f"ledger writer process exited (code {self._proc.exitcode})")
        self._closed.set()

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, msgspec.DecodeError):
            log.critical("ledger writer process sent an unreadable message: %s", msg)
            self._fail("ledger writer process sent an unreadable message")
        elif isinstance(msg, Results):
            self._size = max(self._size, msg.size)
            if msg.armed:
                self._deliver_armed(msg.armed)
            self._deliver(msg.done)
        elif isinstance(msg, Closed):
            self._size = max(self._size, msg.size)
            self._closed.set()

    def _deliver_armed(self, armed: list[tuple[int, str]]) -> None:
        with self._lock:
            found = [(self._arm_pending.pop(arm_id, None), error) for arm_id, error in armed]
        for arm_done, error in found:
            if arm_done is None:
                continue
            try:
                arm_done(RuntimeError(error) if error else None, None)
            except Exception:
                log.exception("arm completion callback failed")

    def _deliver(self, done: list[Result]) -> None:
        with self._lock:
            found = [(r, self._pending.pop(r.sub_id, None)) for r in done]
        for r, sub in found:
            if sub is None:
                continue
            drafts, on_done = sub
            if r.error_type:
                _call(on_done, None, _rebuild_error(r.error_type, r.error))
            else:
                ds = r.drafts if r.drafts is not None else drafts
                _call(on_done, [Entry(seq=s, draft=d) for s, d in zip(r.seqs, ds)], None)


class _Counted:
    """An arm job's callback that also returns its arms to the in-flight budget."""

    __slots__ = ("n", "on_done", "owner")

    def __init__(self, owner: RemoteLedgerWriter, n: int, on_done: ArmDone) -> None:
        self.owner = owner
        self.n = n
        self.on_done = on_done

    def __call__(self, error: BaseException | None, value: Any) -> None:
        with self.owner._lock:
            self.owner._arms_in_flight -= self.n
        self.on_done(error, value)


def _all_of(callbacks: list[ArmDone]) -> ArmDone:
    def call(error: BaseException | None, value: Any) -> None:
        for cb in callbacks:
            cb(error, value)

    return call


def _call(on_done: OnDone, entries: list[Entry] | None, error: BaseException | None) -> None:
    try:
        on_done(entries, error)
    except Exception:
        log.exception("ledger completion callback failed")


# --- the child process ------------------------------------------------------------------------------------
class _Proc:
    """The child as the rest of this module sees it (Popen with a multiprocessing.Process-like face)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout_s: float | None = None) -> None:
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()


def ledger_gc_policy(config: SwitchConfig) -> ServerConfig:
    """The collector settings of the ledger's process (switch.server.gcpolicy): the server's freezing,
    the ledger's young threshold (LedgerConfig.gc_young_threshold says why it differs)."""
    return msgspec.structs.replace(config.server, gc_young_threshold=config.ledger.gc_young_threshold)


def child_main(conn: Any, config_bytes: bytes, environ: dict[str, str] | None = None) -> None:
    """Entry point of the ledger process: open the writer and the armed-reversal store, serve
    submissions until Close or EOF."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s ledger-process %(message)s")
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the switch shuts down in
    # order and closes this process (Close, or end of file if it died), which commits what is queued
    # and writes the final checkpoint. Dying on the signal itself would skip both.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from switch.codec import keys as keymod
        from switch.ledger.factory import open_writer
        from switch.server.armed import ArmedStore

        config = msgspec.msgpack.decode(config_bytes, type=SwitchConfig)
        armed = ArmedStore(
            config.server.armed_path,
            kek=keymod.load_kek(config.keys, environ),
            slot_bytes=config.server.armed_slot_bytes,
        )
        writer = open_writer(config.ledger)
        armed.take_over()  # this process writes it; the switch's process only reads it at start-up
    except BaseException as exc:  # report why, so the switch's start-up error says it
        conn.send_bytes(_encoder.encode(Failed(f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(_encoder.encode(Ready(writer.size)))
    # This process is the ledger's alone: no long collector pauses in the middle of a group commit.
    from switch.server import gcpolicy

    policy = ledger_gc_policy(config)
    gcpolicy.apply_thresholds(policy)
    stop_gc = threading.Event()
    gcpolicy.run_in_thread(policy, stop_gc)
    try:
        _Child(conn, writer, armed).serve()
    finally:
        stop_gc.set()
        armed.close()


class _Child:
    def __init__(self, conn: Any, writer: ledger_writer.LedgerWriter, armed: Any) -> None:
        self.conn = conn
        self.writer = writer
        self.armed = armed
        self._send_lock = threading.Lock()
        self._gone = False  # the switch's end of the socket is closed

    def serve(self) -> None:
        """Read messages; per wake-up, every message already here is taken: their outcomes go to the
        writer first (its window starts), then all their arms and releases are written by THIS thread in
        one transaction (one fsync when it holds an arm) and answered.

        Why no armed-store thread: a hand-off per round to a thread that must then win the GIL from the
        writer's thread (busy in Python for a batch, up to a switch interval) cost more than the arm's
        own commit (~0.7 ms, an fsync); and messages that arrive while an arm commits are grouped into the
        next one, so the arms' group commit adapts to load by itself."""
        conn = self.conn
        timeout_s: float | None = 60.0
        closing = False
        while not closing:
            msgs: list[Submit | Close] = []
            try:
                msgs.append(_to_child.decode(conn.recv_bytes()))
                while len(msgs) < MAX_MESSAGES_PER_ROUND and conn.poll(0):
                    msgs.append(_to_child.decode(conn.recv_bytes()))
            except (EOFError, OSError):
                closing = True  # the switch is gone: commit what was read and queued, then stop
            jobs: list[Submit] = []
            for msg in msgs:
                if isinstance(msg, Close):
                    timeout_s = msg.timeout_s
                    closing = True
                    break
                if msg.items:
                    self._submit(msg.items)
                if msg.arm_id or msg.releases:
                    jobs.append(msg)
            if jobs:
                self._apply_arms(jobs)
        self.writer.close(timeout_s)  # its last batches' results are sent from its thread meanwhile
        try:
            with self._send_lock:
                self.conn.send_bytes(_encoder.encode(Closed(self.writer.size)))
        except (OSError, ValueError):
            pass

    def _apply_arms(self, jobs: list[Submit]) -> None:
        """Armed reversals and releases of `jobs`, in order, in one transaction; answer the arm jobs."""
        ops: list[tuple[bool, Any]] = []
        for job in jobs:
            ops.extend((True, arm) for arm in job.arms)
            ops.extend((False, rel) for rel in job.releases)
        error = ""
        try:
            self.armed.apply(ops)
        except Exception as exc:  # ArmedStoreError: these arms are not durable
            error = f"{type(exc).__name__}: {exc}"
            log.error("armed reversals not written: %s", error)
        done = [(job.arm_id, error) for job in jobs if job.arm_id]
        if done:
            self._send_now([], done)

    def _submit(self, items: list[tuple[int, list[EntryDraft]]]) -> None:
        """One message's outcomes in one submit_many: one lock round and, per ledger batch, one
        callback that queues all their Results at once (tokens are (sub_id, drafts))."""
        try:
            refused = self.writer.submit_many([((sub_id, ds), ds) for sub_id, ds in items], self._on_batch)
        except Exception as exc:  # LedgerUnavailable: the writer stopped or is closing
            self._put_all([Result(sub_id, [], None, type(exc).__name__, str(exc)) for sub_id, _ in items])
            return
        if refused:  # LedgerBusy, malformed or unbalanced drafts
            self._put_all(
                [Result(tok[0], [], None, type(exc).__name__, str(exc)) for tok, exc in refused]  # type: ignore[index]
            )

    def _on_batch(self, results: ledger_writer.BatchResult) -> None:
        out: list[Result] = []
        for token, entries, error in results:
            sub_id, drafts = token  # type: ignore[misc]
            if error is not None:
                out.append(Result(sub_id, [], None, type(error).__name__, str(error)))
                continue
            ents = entries or []
            same = len(ents) == len(drafts) and all(
                e.draft is d or e.draft == d for e, d in zip(ents, drafts)
            )
            out.append(Result(sub_id, [e.seq for e in ents], None if same else [e.draft for e in ents]))
        self._put_all(out)

    def _send_now(self, out: list[Result], armed: list[tuple[int, str]]) -> None:
        """Send results from the calling thread (the writer's once a batch is durable, the reading
        thread's once its arms are): a hand-off to a sender thread was one more wake-up per result,
        which on a loaded machine waits for a CPU (bench/ledger_hop.py, 6 alternating pairs at load
        3-3.5: post p99 38-132 ms against 62-265 ms with the sender thread, better in 5 of 6; medians
        equal)."""
        if self._gone:
            return
        for i in range(0, max(len(out), 1), MAX_RESULTS_PER_MESSAGE):
            try:
                msg = Results(out[i : i + MAX_RESULTS_PER_MESSAGE], self.writer.size, armed)
                with self._send_lock:
                    self.conn.send_bytes(_encoder.encode(msg))
            except (OSError, ValueError):
                self._gone = True  # the switch is gone; the writer still commits what it has
                return
            armed = []

    def _put_all(self, results: list[Result]) -> None:
        if results:
            self._send_now(results, [])


def _main(argv: list[str]) -> int:
    """`python -m switch.server.ledger_process <fd>`: the child's command line (started by the switch)."""
    conn = Connection(int(argv[1]))
    child_main(conn, conn.recv_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
