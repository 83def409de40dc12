"""The ledger writer in a process of its own, behind the writer's own interface (submit / append / size /
close), so the switch uses both cores.

Why: the ledger writer (switch.ledger.writer) is a thread that spends most of a batch in Python (rules,
hashing, Merkle frontier, row building) and in SQLite calls that drop and retake the GIL per statement
step. In the switch's process it competes with the trio thread for the one GIL: measured on the 2-core
VM, its group commits took 20-80 ms (waiting for the GIL at every retake, a GIL switch interval each)
where the disk needed 0.2-5 ms, and its Python work was ~10% of the trio thread's budget. In a child
process it runs on the other core with a GIL to itself.

Protocol (msgspec msgpack over a multiprocessing Pipe): the switch sends `Submit` batches -- one per
flush of the core, each holding every outcome of that batch (`submit_many`) -- and the child hands each
submission to a real LedgerWriter (same batching, rules, idempotency, durability), gathers completions
as the writer reports them and sends them back as `Results`, several per message. A submission's answer
is durable before it is sent, exactly as with the in-process writer; the switch's reader thread calls
each `on_done` with rebuilt `Entry` objects (the child sends sequence numbers, and drafts only when the
ledger returned different ones, i.e. originals of an idempotent repeat) or with the error rebuilt as
its ledger class (IdempotencyConflict, LedgerRejected subclasses, LedgerBusy...).

Failure: if the child dies, every pending submission fails with LedgerUnavailable and so does every
later one (the processor answers 96; nothing is reported durable that was not). The child stops, after
committing what it has, when the switch closes it or when its pipe reaches end of file (the switch died).
The child is started with the "spawn" method: the switch has threads, and fork would copy their locks.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from switch.config import SwitchConfig
from switch.ledger import backend as ledger_backend
from switch.ledger import model as ledger_model
from switch.ledger import rules as ledger_rules
from switch.ledger import writer as ledger_writer
from switch.ledger.model import Entry, EntryDraft

log = logging.getLogger(__name__)

OnDone = Callable[[list[Entry] | None, BaseException | None], None]

#: Longest wait for the child to open the ledger and report its size.
START_TIMEOUT_S = 60.0
#: Completions the child's sender puts in one message at most.
MAX_RESULTS_PER_MESSAGE = 4_096


# --- messages ---------------------------------------------------------------------------------------------
class Submit(msgspec.Struct, tag="s", array_like=True):
    items: list[tuple[int, list[EntryDraft]]]


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
class RemoteLedgerWriter:
    """A LedgerWriter running in a child process. Thread-safe; `submit_many` sends one message."""

    def __init__(self, config: SwitchConfig, *, start_timeout_s: float = START_TIMEOUT_S) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=child_main,
            args=(child_conn, msgspec.msgpack.encode(config)),
            name="ledger-writer",
            daemon=True,
        )
        self._proc.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Sequence[EntryDraft], OnDone]] = {}
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
        self._reader = threading.Thread(target=self._read_loop, name="ledger-results", daemon=True)
        self._reader.start()

    # --- LedgerWriter's interface ------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Entries committed so far (as last reported by the child)."""
        return self._size

    def submit(self, drafts: Sequence[EntryDraft], on_done: OnDone) -> None:
        self.submit_many([(drafts, on_done)])

    def submit_many(self, subs: Sequence[tuple[Sequence[EntryDraft], OnDone]]) -> None:
        """Queue several outcomes in one message; each `on_done` is called from the reader thread once
        its entries are durable (or failed). Raises LedgerUnavailable once the child is gone."""
        if not subs:
            return
        items: list[tuple[int, list[EntryDraft]]] = []
        with self._lock:
            if self._failure is not None:
                raise ledger_writer.LedgerUnavailable(self._failure)
            for drafts, on_done in subs:
                if not drafts:
                    raise ValueError("submit needs at least one draft")
                sub_id = next(self._ids)
                self._pending[sub_id] = (drafts, on_done)
                items.append((sub_id, list(drafts)))
        data = _encoder.encode(Submit(items))
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            self._fail(f"ledger writer process unreachable: {exc}")

    def append(self, drafts: Sequence[EntryDraft], timeout_s: float | None = None) -> list[Entry]:
        """Blocking submit: the committed entries, or the error (LedgerTimeout after `timeout_s`)."""
        done = threading.Event()
        box: list[tuple[list[Entry] | None, BaseException | None]] = []

        def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
            box.append((entries, error))
            done.set()

        self.submit(drafts, on_done)
        if not done.wait(timeout_s):
            raise ledger_writer.LedgerTimeout(f"ledger append not answered within {timeout_s} s")
        entries, error = box[0]
        if error is not None:
            raise error
        return entries or []

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Let the child commit what it has and write its final checkpoint, then stop it."""
        if self._proc.is_alive() and self._failure is None:
            try:
                with self._send_lock:
                    self._conn.send_bytes(_encoder.encode(Close(timeout_s)))
            except (OSError, ValueError):
                pass
            self._closed.wait(None if timeout_s is None else timeout_s + 5)
        self._proc.join(10)
        if self._proc.is_alive():
            log.error("ledger writer process did not stop; terminating it")
            self._kill()
        self._fail("ledger writer is closed")
        self._conn.close()

    # --- internals -----------------------------------------------------------------------------------
    def _kill(self) -> None:
        self._proc.terminate()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = reason
            pending, self._pending = self._pending, {}
        error = ledger_writer.LedgerUnavailable(reason)
        for _drafts, on_done in pending.values():
            _call(on_done, None, error)

    def _read_loop(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = _to_parent.decode(conn.recv_bytes())
            except (EOFError, OSError):
                if not self._closed.is_set():
                    log.critical("ledger writer process exited (code %s)", self._proc.exitcode)
                self._fail(f"ledger writer process exited (code {self._proc.exitcode})")
                self._closed.set()
                return
            except msgspec.DecodeError as exc:
                log.critical("ledger writer process sent an unreadable message: %s", exc)
                self._fail("ledger writer process sent an unreadable message")
                continue
            if isinstance(msg, Results):
                self._size = max(self._size, msg.size)
                self._deliver(msg.done)
            elif isinstance(msg, Closed):
                self._size = max(self._size, msg.size)
                self._closed.set()

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


def _call(on_done: OnDone, entries: list[Entry] | None, error: BaseException | None) -> None:
    try:
        on_done(entries, error)
    except Exception:
        log.exception("ledger completion callback failed")


# --- the child process ------------------------------------------------------------------------------------
def child_main(conn: Any, config_bytes: bytes) -> None:
    """Entry point of the ledger process: open the writer, serve submissions until Close or EOF."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s ledger-process %(message)s")
    try:
        from switch.ledger.factory import open_writer

        config = msgspec.msgpack.decode(config_bytes, type=SwitchConfig)
        writer = open_writer(config.ledger)
    except BaseException as exc:  # report why, so the switch's start-up error says it
        conn.send_bytes(_encoder.encode(Failed(f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(_encoder.encode(Ready(writer.size)))
    _Child(conn, writer).serve()


class _Child:
    def __init__(self, conn: Any, writer: ledger_writer.LedgerWriter) -> None:
        self.conn = conn
        self.writer = writer
        self._cond = threading.Condition()
        self._out: list[Result] = []
        self._stop = False
        self._send_lock = threading.Lock()
        self._sender = threading.Thread(target=self._send_loop, name="ledger-results", daemon=True)

    def serve(self) -> None:
        self._sender.start()
        timeout_s: float | None = 60.0
        while True:
            try:
                msg = _to_child.decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                break  # the switch is gone: commit what is queued, then stop
            if isinstance(msg, Close):
                timeout_s = msg.timeout_s
                break
            for sub_id, drafts in msg.items:
                try:
                    self.writer.submit(drafts, self._on_done(sub_id, drafts))
                except Exception as exc:  # LedgerBusy, malformed or unbalanced drafts
                    self._put(Result(sub_id, [], None, type(exc).__name__, str(exc)))
        self.writer.close(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._sender.join()
        try:
            with self._send_lock:
                self.conn.send_bytes(_encoder.encode(Closed(self.writer.size)))
        except (OSError, ValueError):
            pass

    def _on_done(self, sub_id: int, drafts: list[EntryDraft]) -> ledger_writer.OnDone:
        def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
            if error is not None:
                self._put(Result(sub_id, [], None, type(error).__name__, str(error)))
                return
            ents = entries or []
            same = len(ents) == len(drafts) and all(
                e.draft is d or e.draft == d for e, d in zip(ents, drafts)
            )
            self._put(Result(sub_id, [e.seq for e in ents], None if same else [e.draft for e in ents]))

        return on_done

    def _put(self, result: Result) -> None:
        with self._cond:
            self._out.append(result)
            if len(self._out) == 1:
                self._cond.notify()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._out and not self._stop:
                    self._cond.wait()
                if not self._out and self._stop:
                    return
                out = self._out[:MAX_RESULTS_PER_MESSAGE]
                del self._out[:MAX_RESULTS_PER_MESSAGE]
            try:
                with self._send_lock:
                    self.conn.send_bytes(_encoder.encode(Results(out, self.writer.size)))
            except (OSError, ValueError):
                return  # the switch is gone; the writer still commits what it has
