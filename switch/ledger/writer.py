"""The ledger's single writer: one thread, group commit, callbacks once durable.

Why one thread: sequence numbers, the Merkle right edge and the hold/refund rules are then plain
single-threaded state, and batching is what makes durability cheap (one fsync per batch instead of per
entry). Callers `submit` a list of drafts (one outcome: all of them are written or none) with a
callback; the writer collects submissions for at most `batch_window_ms` (default 0: whatever arrived
while it was busy with the batch before) or until `max_batch_entries`, checks them, writes the batch
in one transaction and calls every callback from its own thread:
`on_done(entries, None)` once the batch is durable, `on_done(None, error)` otherwise.
`submit_many` queues many outcomes under one lock and answers each caller once per batch
(`on_batch`): per outcome, a callback and a lock round cost more than its share of the commit.

What can fail, and for whom:
- a draft that is malformed or unbalanced: `submit` raises at once (InvalidDraft, UnbalancedEntry);
- a draft that breaks a rule (hold resolved twice, refund above the remainder, idempotency conflict):
  only its submission fails, with that error; the rest of the batch is written;
- the commit itself: EVERY submission of the batch fails with LedgerStorageError (nobody gets a false
  success); the writer re-reads its state from the database before the next batch and stops
  (LedgerUnavailable for everyone after) if it cannot.
The queue is bounded by `max_queue_entries`: past it `submit` raises LedgerBusy instead of waiting.

Index runs (switch.ledger.backend, "Why index runs"): `entries` has no index on idempotency keys or
merchants; once `index_run_entries` entries are past the watermark, a run copies them into the index
tables in one sorted transaction. Runs happen OFF the commit path, on an indexer thread with its own
connection (`open_indexer`): a run took 140-450 ms, and done by the writer between batches it held up
every purchase behind it (commit p99 57-100 ms vs 19.8 ms without runs). The writer hands the
indexer [watermark, size) -- durable entries only -- and keeps committing; SQLite keeps the index
tables in a file of their own so the run's write lock is not the entries file's (switch.ledger.sqlite),
PostgreSQL's MVCC lets both write at once. Until a run has committed, its keys stay in memory:
`_indexing` (the run's) and `_tail` (newer), key -> (seq, body), reloaded from storage by
`_load_state`; so a batch's idempotency check is the in-memory maps plus one indexed lookup: exact at
every moment and across restarts. The writer learns of the run's end between batches (it polls), and
only then drops `_indexing` (its next lookup sees the committed run). A failed run changes nothing
(its transaction rolls back), its keys go back to `_tail`, and it is retried after the next batch;
past MAX_TAIL_RUNS runs' worth of unindexed entries the writer stops rather than grow without bound.
A backend without `open_indexer` (an in-memory SQLite) runs them in line, as does `_load_state`
(a backlog found at start, e.g. just after an upgrade, is indexed before the first batch).

Pipeline: the commit of batch k (SQLite steps and fsync, or PostgreSQL's COPY and COMMIT, all with the
GIL released) runs on a committer thread while the writer thread checks and builds batch k+1 in
Python, so a batch costs max(Python, storage) instead of their sum. At most one batch is in flight.
Batch k+1 is built on top of batch k as if k were durable: its lookups go to a second (read)
connection, which sees every batch before k; k's own keys are in `_tail` and its transaction rows in
an overlay, its balances in the cache, its leaves in the frontier. Batch k+1 is handed to the
committer only after k is durable, so nothing is ever acknowledged before everything it was checked
against is durable. If k fails, its callers fail, the writer reloads its state from storage and
checks batch k+1 again from scratch (its callers are not failed for k's fault). Index runs, the
final checkpoint and reloads happen only with nothing in flight. Only batches of at least
`LedgerConfig.pipeline_min_batch_entries` go to the committer: under light load batches are small,
the next one is rarely waiting, and a thread hand-off per batch costs the CPU the overlap was to save
(batch k+1 committed in line first waits for k, so callers are still answered in batch order).
`commit_pipeline = False` commits every batch in line; so does a backend without `open_reader` (or
an in-memory SQLite).
Why a hand-off can wait for the committer to take the batch: a thread that wakes up needs the GIL,
and the writer thread, busy checking the next batch in Python, lets go of it only after a switch
interval (5 ms) or when it blocks. Traced (1,000-entry batches): the commit of batch k started only
when the writer had finished checking k+1 and waited for k, so nothing overlapped (a 19 ms cycle:
check 4.6 ms, GIL wait, write 8.5, answers, next submissions). With a backend that commits with the
GIL released once it has copied the rows out (`writes_without_gil()`: SQLite's C batch writer,
switch.ledger.sqlite), the writer waits on a condition right after handing the batch over (letting
go of the GIL), the committer takes it and starts, and the check of k+1 then runs beside the commit.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger import fast
from switch.ledger.backend import NODE_MIN_LEVEL, BatchRows, LedgerBackend, TxnRow
from switch.ledger.codec import ENTRY_FORMAT
from switch.ledger.keyfilter import LedgerFilters
from switch.ledger.keys import sign_checkpoint
from switch.ledger.merkle import Frontier
from switch.ledger.model import Entry, EntryDraft, IdempotencyConflict, Side
from switch.ledger.rules import STARTING_KINDS, Book, LedgerCorrupt, LedgerRejected, family_rows
from switch.ledger.tree import StoredTree

log = logging.getLogger(__name__)

OnDone = Callable[[list[Entry] | None, BaseException | None], None]
#: One batch's answers to one `submit_many` caller: (token, entries or None, error or None) each.
BatchResult = list[tuple[object, list[Entry] | None, BaseException | None]]
OnBatch = Callable[[BatchResult], None]

_HEADER = struct.Struct(">BQ")
#: Current balances kept in memory by the writer (cleared, then reloaded on demand, past this).
MAX_CACHED_BALANCES = 1_000_000
#: Unindexed entries allowed, in runs (index runs failing again and again): past it the writer stops.
MAX_TAIL_RUNS = 8
_sha256 = hashlib.sha256
_DEBIT = Side.DEBIT


class LedgerBusy(RuntimeError):
    """The writer's queue is full (max_queue_entries); retry later or answer 91/96."""


class LedgerUnavailable(RuntimeError):
    """The writer is closed or stopped after a failure it could not recover from."""


class LedgerTimeout(TimeoutError):
    """append() waited longer than its timeout; the entries may still be committed."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Submission:
    """One outcome in the queue. Answered through `on_done` (submit) or, with the other submissions
    of its caller in the same batch, through `on_batch` with its `token` (submit_many)."""

    __slots__ = ("answered", "bodies", "drafts", "entries", "error", "on_batch", "on_done", "token")

    def __init__(
        self,
        drafts: Sequence[EntryDraft],
        bodies: list[bytes],
        on_done: OnDone | None,
        on_batch: OnBatch | None = None,
        token: object = None,
    ) -> None:
        self.drafts = drafts
        self.bodies = bodies
        self.on_done = on_done
        self.on_batch = on_batch
        self.token = token
        self.entries: list[Entry] | None = None
        self.error: BaseException | None = None
        self.answered = False


class _JobThread:
    """A thread that runs one job at a time for the writer: the pipeline's committer (commit a batch,
    answer its callers) and the indexer (one index run). `submit` hands a job over (never while one is
    in flight); `result` takes its outcome, once."""

    def __init__(
        self,
        run: Callable[[Any], None],
        name: str,
        on_close: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._on_close = on_close
        self._on_end = on_end  # called on the thread after each job has ended (its outcome is set)
        self._cond = threading.Condition()
        self._job: Any = None
        self._busy = False
        self._taken = False  # the thread has taken the job in flight
        self._result: tuple[Any, BaseException | None] | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, job: Any, wait_taken: bool = False) -> None:
        """`wait_taken`: return only once the thread has taken the job (see "Pipeline": the
        caller then lets go of the GIL until the thread runs)."""
        with self._cond:
            if self._busy:
                raise RuntimeError(f"{self.thread.name}: a job is already in flight")
            self._job, self._busy, self._result, self._taken = job, True, None, False
            self._cond.notify_all()
            while wait_taken and self._busy and not self._taken:
                self._cond.wait()

    def result(self, wait: bool) -> tuple[Any, BaseException | None] | None:
        """The finished job and its error (None: it succeeded), once; None while one is in flight
        (and `wait` is false) or when none ended since the last call."""
        with self._cond:
            while wait and self._busy:
                self._cond.wait()
            if self._busy:
                return None
            result, self._result = self._result, None
            return result

    def error(self) -> BaseException | None:
        """Wait until nothing is in flight; the error of the job that was, if it failed."""
        result = self.result(wait=True)
        return None if result is None else result[1]

    def close(self) -> None:
        """Stop once the job in flight (if any) has ended; then `on_close`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.thread.join()
        if self._on_close is not None:
            self._on_close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                job = self._job
                self._taken = True
                self._cond.notify_all()
            error: BaseException | None = None
            try:
                self._run(job)
            except BaseException as exc:  # the writer decides what a failed job means
                error = exc
            finally:
                with self._cond:
                    self._job, self._busy, self._result = None, False, (job, error)
                    self._cond.notify_all()
                if self._on_end is not None:
                    self._on_end()


def _committer(backend: LedgerBackend, name: str, on_end: Callable[[], None]) -> _JobThread:
    """The pipeline's commit thread (see "Pipeline"): a job is one batch's rows; it commits them (a
    failure is the job's error). The writer thread answers the batch's callers once it has seen the
    job end (`LedgerWriter._settle`)."""

    def commit(rows: BatchRows) -> None:
        backend.write_batch(rows)  # looked up per batch (a wrapper set later is honoured)

    return _JobThread(commit, name, on_end=on_end)


def _indexer(backend: LedgerBackend, name: str) -> _JobThread:
    """The index-run thread (see "Index runs") on its own backend: a job is (from_seq, to_seq, at_ms).
    Closing it closes that backend."""

    def index_run(job: tuple[int, int, int]) -> None:
        backend.write_index_run(*job)

    def close_backend() -> None:
        try:
            backend.close()
        except Exception:
            log.exception("closing the ledger indexer's backend failed")

    return _JobThread(index_run, name, close_backend)


class LedgerWriter:
    """Owns `backend` (closes it on close()). Use as a context manager or call close()."""

    def __init__(
        self,
        backend: LedgerBackend,
        *,
        signing_key: Ed25519PrivateKey | None,
        config: LedgerConfig | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        name: str = "ledger-writer",
    ) -> None:
        cfg = config or LedgerConfig()
        if cfg.max_batch_entries < 1 or cfg.max_queue_entries < cfg.max_batch_entries:
            raise ValueError("ledger: need 1 <= max_batch_entries <= max_queue_entries")
        if cfg.batch_window_ms < 0 or cfg.checkpoint_every_entries < 1:
            raise ValueError("ledger: batch_window_ms must be >= 0 and checkpoint_every_entries >= 1")
        if cfg.index_run_entries < 1:
            raise ValueError("ledger: index_run_entries must be >= 1")
        self._backend = backend
        self._key = signing_key
        self._clock_ms = clock_ms
        self._window_s = cfg.batch_window_ms / 1000.0
        self._max_batch = cfg.max_batch_entries
        self._max_queue = cfg.max_queue_entries
        self._checkpoint_every = cfg.checkpoint_every_entries
        self._run_entries = cfg.index_run_entries
        self._pipeline_min = cfg.pipeline_min_batch_entries
        self._watermark = 0
        self._tail: dict[str, tuple[int, bytes]] = {}
        #: Keys of the run in flight on the indexer (seq in [_watermark, _run_to)).
        self._indexing: dict[str, tuple[int, bytes]] = {}
        self._indexer: _JobThread | None = None
        self._cond = threading.Condition()
        self._queue: deque[_Submission] = deque()
        self._queued_entries = 0
        self._closing = False
        self._failure: BaseException | None = None
        self._frontier = Frontier(NODE_MIN_LEVEL)
        self._checkpointed_size = 0
        self._balances: dict[tuple[str, str], int] = {}
        #: Every key and every rrn / original_rrn ever committed, as Bloom filters built in the
        #: background at start (switch.ledger.keyfilter): a batch asks storage only for keys and
        #: transaction families that may exist (a fresh purchase's never do).
        self._filters: LedgerFilters | None = None
        self._load_state()
        open_reader = getattr(backend, "open_reader", None) if cfg.commit_pipeline else None
        #: Lookups while a batch is in flight (None: no pipeline, commits in line).
        self._reader: LedgerBackend | None = None
        self._committer: _JobThread | None = None
        #: Hand-offs wait until the committer has taken the batch (backends that commit with the
        #: GIL released: see "Pipeline").
        self._handoff_waits = False
        self._overlay: list[tuple[int, EntryDraft, bytes]] = []  # the in-flight batch's accepted drafts
        #: The callers of the batch in flight on the committer, and of the last one that ended and is
        #: not answered yet (answered right after the next hand-off: see "Pipeline").
        self._inflight: list[_Submission] = []
        self._due: list[_Submission] = []
        self._window_ends = 0.0  # monotonic end of the batch window being waited out (0: none)
        try:
            self._reader = open_reader() if open_reader is not None else None
            if self._reader is not None:
                self._committer = _committer(backend, f"{name}-committer", self._wake)
                writes_without_gil = getattr(backend, "writes_without_gil", None)
                self._handoff_waits = writes_without_gil is not None and writes_without_gil()
            open_indexer = getattr(backend, "open_indexer", None)
            indexer_backend = open_indexer() if open_indexer is not None else None
            if indexer_backend is not None:
                self._indexer = _indexer(indexer_backend, f"{name}-indexer")
        except BaseException:
            # E.g. PostgreSQL refused the indexer's connection: leave no thread or connection behind.
            if self._filters is not None:
                self._filters.close()
            if self._committer is not None:
                self._committer.close()
            if self._reader is not None:
                self._reader.close()
            raise
        start_checkpoints = getattr(backend, "start_background_checkpoints", None)
        if start_checkpoints is not None:  # SQLite: WAL checkpoints off the commit path
            start_checkpoints()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- public API --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Entries committed so far (the next seq)."""
        return self._frontier.size

    def root(self) -> bytes:
        return self._frontier.root()

    def submit(self, drafts: Sequence[EntryDraft], on_done: OnDone) -> None:
        """Queue one outcome's drafts; `on_done` is called from the writer thread once they are durable
        (or failed). Raises at once for malformed/unbalanced drafts, LedgerBusy, LedgerUnavailable."""
        sub = self._validated(drafts, on_done, None, None)
        with self._cond:
            self._check_open()
            queued = self._queued_entries
            n = len(sub.drafts)
            if queued + n > self._max_queue:
                raise LedgerBusy(
                    f"ledger queue full ({queued} entries queued, max_queue_entries={self._max_queue})"
                )
            self._queue.append(sub)
            self._queued_entries = queued + n
            if queued == 0 or queued + n >= self._max_batch:
                self._cond.notify()

    def submit_many(
        self, items: Sequence[tuple[object, Sequence[EntryDraft]]], on_batch: OnBatch
    ) -> list[tuple[object, BaseException]]:
        """Queue several outcomes (token, drafts) under one lock; `on_batch` is called from the writer
        thread ONCE per batch with the answers of this call's outcomes in that batch, each
        (token, entries, None) once durable or (token, None, error). Outcomes refused at once
        (malformed, unbalanced, LedgerBusy) are returned as (token, error) and never reach `on_batch`;
        LedgerUnavailable is raised for all of them. Why: per outcome, a callback and a lock round
        cost more than the outcome's share of the commit."""
        refused: list[tuple[object, BaseException]] = []
        subs: list[_Submission] = []
        for token, drafts in items:
            try:
                subs.append(self._validated(drafts, None, on_batch, token))
            except (ValueError, TypeError) as exc:  # InvalidDraft, UnbalancedEntry, sizes
                refused.append((token, exc))
        if not subs:
            return refused
        with self._cond:
            self._check_open()
            queued = start = self._queued_entries
            queue, max_queue = self._queue, self._max_queue
            for sub in subs:
                n = len(sub.drafts)
                if queued + n > max_queue:
                    refused.append((sub.token, LedgerBusy(
                        f"ledger queue full ({queued} entries queued, max_queue_entries={max_queue})"
                    )))  # fmt: skip
                    continue
                queue.append(sub)
                queued += n
            self._queued_entries = queued
            if queued > start and (start == 0 or queued >= self._max_batch):
                self._cond.notify()
        return refused

    def _validated(
        self,
        drafts: Sequence[EntryDraft],
        on_done: OnDone | None,
        on_batch: OnBatch | None,
        token: object,
    ) -> _Submission:
        n = len(drafts)
        if n == 0:
            raise ValueError("submit needs at least one draft")
        if n > self._max_batch:
            raise ValueError(f"{n} drafts in one submission exceed max_batch_entries={self._max_batch}")
        held, bodies = fast.prepare_all(drafts)
        return _Submission(held, bodies, on_done, on_batch, token)

    def _check_open(self) -> None:
        """Under self._cond: raise LedgerUnavailable once stopped or closing."""
        if self._failure is not None:
            raise LedgerUnavailable(f"ledger writer stopped: {self._failure}")
        if self._closing:
            raise LedgerUnavailable("ledger writer is closed")

    def append(self, drafts: Sequence[EntryDraft], timeout_s: float | None = None) -> list[Entry]:
        """Blocking submit: the committed entries (originals for idempotent repeats), or the error."""
        done = threading.Event()
        box: list[tuple[list[Entry] | None, BaseException | None]] = []

        def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
            box.append((entries, error))
            done.set()

        self.submit(drafts, on_done)
        if not done.wait(timeout_s):
            raise LedgerTimeout(f"ledger did not answer within {timeout_s} s")
        entries, error = box[0]
        if error is not None:
            raise error
        assert entries is not None
        return entries

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Stop taking submissions, commit what is queued, write a final checkpoint, close the backend."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- state ------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        """Rebuild the Merkle right edge from storage and check it against the last tree head."""
        b = self._backend
        size = b.entry_count()
        frontier = StoredTree(b, size).frontier()
        head = b.last_tree_head()
        if head is None and size:
            raise LedgerCorrupt(f"{size} entries but no tree head; run `switch ledger verify`")
        if head is not None and (head[0] != size or head[1] != frontier.root()):
            raise LedgerCorrupt(
                f"stored tree head (size {head[0]}) does not match the entries (size {size}); "
                "run `switch ledger verify`"
            )
        self._frontier = frontier
        self._checkpointed_size = b.last_checkpoint_size()
        self._balances = {}
        if self._indexer is not None:
            self._indexer.result(wait=True)  # settled either way: the watermark is re-read below
        self._indexing = {}
        self._watermark = b.index_watermark()
        if self._watermark > size:
            # The index claims entries this ledger does not have: its file belongs to another copy
            # (an entries file restored from an older backup beside a newer index). Trusting it would
            # hide new entries from the idempotency lookup (double postings after a restart).
            raise LedgerCorrupt(
                f"the ledger's index covers {self._watermark} entries but the ledger holds {size}: "
                "the index does not belong to these entries; move the index away (SQLite: the "
                "'<db>.index' file) and restart, it is rebuilt from the entries"
            )
        if size - self._watermark >= self._run_entries:  # e.g. a ledger upgraded from schema 1
            self._index_run()
        self._tail = {key: (seq, body) for key, seq, body in b.tail_keys(self._watermark)}
        if self._filters is None:  # once: afterwards every committed key is added as it commits
            open_reader = getattr(b, "open_reader", None)
            try:
                source = open_reader() if open_reader is not None else None
            except Exception as exc:  # e.g. PostgreSQL at its connection limit: exact, only slower
                log.warning("ledger filters off (no connection to build them): %s", exc)
                self._filters = LedgerFilters(None, None, (), size)
            else:
                self._filters = LedgerFilters(source, b, self._tail, size)

    def _index_run(self) -> None:
        """Index the tail in one sorted run, in line (see the module docstring). Raises only past
        MAX_TAIL_RUNS."""
        size = self._frontier.size
        try:
            self._backend.write_index_run(self._watermark, size, self._clock_ms())
        except Exception as exc:
            if not self._run_committed_anyway(size):
                self._run_failed(size, exc)
                return
        self._watermark = size
        self._tail = {}

    def _run_committed_anyway(self, to_seq: int) -> bool:
        """A run that raised may still have committed (PostgreSQL: the connection dropped after COMMIT
        was sent). Its retry would then never start at the stored watermark and the writer would stop
        once MAX_TAIL_RUNS runs' worth waited: so ask storage where the watermark is."""
        reader = self._reader if self._reader is not None else self._backend
        try:
            return reader.index_watermark() == to_seq
        except Exception:
            return False

    def _run_failed(self, to_seq: int, exc: BaseException) -> None:
        log.error("ledger index run %d..%d failed (retried after the next batch): %s",
                  self._watermark, to_seq, exc)  # fmt: skip
        if not isinstance(exc, Exception) or (
            self._frontier.size - self._watermark > MAX_TAIL_RUNS * self._run_entries
        ):
            raise exc

    def _start_index_run(self) -> None:
        """Hand [watermark, size) -- all durable -- to the indexer; its keys move to `_indexing`."""
        assert self._indexer is not None and not self._indexing
        self._indexing, self._tail = self._tail, {}
        self._indexer.submit((self._watermark, self._frontier.size, self._clock_ms()))

    def _finish_index_run(self, wait: bool) -> None:
        """Take the indexer's result if its run has ended: the watermark moves (its keys are now
        found by the indexed lookup), or its keys go back to the tail for the next try."""
        if self._indexer is None:
            return
        result = self._indexer.result(wait)
        if result is None:
            return
        (_, to_seq, _), error = result
        if error is None or self._run_committed_anyway(to_seq):
            self._watermark = to_seq
            self._indexing = {}
            return
        indexing, self._indexing = self._indexing, {}
        indexing.update(self._tail)
        self._tail = indexing
        self._run_failed(to_seq, error)

    # --- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        batch: list[_Submission] | None = None
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    break
                if not batch:  # nothing queued and the batch in flight has ended: answer it
                    self._drain()
                    continue
                self._process(batch)
                batch = None
            self._drain()
            if self._failure is None:
                self._final_checkpoint()
        except BaseException as exc:  # a bug: fail everyone rather than leave callers waiting forever
            log.exception("ledger writer stopped")
            self._answer_due()
            self._answer(self._settle()[0])  # the batch in flight, first
            if batch is not None:  # the batch being checked: whoever has not heard, hears now
                left = [sub for sub in batch if not sub.answered]
                for sub in left:
                    sub.entries = None
                    sub.error = LedgerUnavailable(f"ledger writer stopped: {exc}")
                self._answer(left)
            self._stop(exc)
        finally:
            if self._filters is not None:
                self._filters.close()
            if self._committer is not None:
                self._committer.close()
            if self._indexer is not None:
                self._indexer.close()  # waits for a run in flight: it commits or rolls back whole
            for backend in (self._backend, self._reader):
                try:
                    if backend is not None:
                        backend.close()
                except Exception:
                    log.exception("closing the ledger backend failed")

    def _settle(self) -> tuple[list[_Submission], BaseException | None]:
        """Wait until no batch is in flight; its callers (each with its error if the commit failed,
        not answered yet) and the commit's error."""
        if self._committer is None:
            return [], None
        error = self._committer.error()
        subs, self._inflight = self._inflight, []
        if error is not None:  # every caller of the batch must hear of it
            log.error("ledger batch of %d submissions failed: %s", len(subs), error)
            for sub in subs:
                if sub.error is None:
                    sub.entries = None
                    sub.error = error
        return subs, error

    def _answer_due(self) -> None:
        due, self._due = self._due, []
        if due:
            self._answer(due)

    def _drain(self, defer_answers: bool = False) -> bool:
        """Wait until no batch is in flight and answer its callers (`defer_answers`: only once the
        caller has called `_answer_due`, after its hand-off). False if it failed: its callers have
        been answered, the state is reloaded from storage (the writer stops if that fails too)."""
        if self._committer is None:
            return True
        subs, error = self._settle()
        self._overlay = []
        if error is None:
            if defer_answers:
                self._due = subs
            elif subs:
                self._answer(subs)
            return True
        self._answer(subs)
        try:
            self._load_state()
        except BaseException as reload_exc:
            log.error("ledger writer cannot recover its state: %s", reload_exc)
            self._stop(reload_exc)
        return False

    def _after_failed_drain(self, subs: list[_Submission]) -> None:
        """The in-flight batch failed while `subs` were checked against it: check them again from the
        reloaded state, or refuse them if the writer has stopped."""
        if self._failure is None:
            self._process(subs)
            return
        for sub in subs:
            sub.entries = None
            sub.error = LedgerUnavailable(f"ledger writer stopped: {self._failure}")
        self._answer(subs)

    def _txn_rows(self, rrns: set[str]) -> list[TxnRow]:
        """Stored transaction rows of `rrns` (read connection) plus the in-flight batch's."""
        reader = self._reader if self._reader is not None else self._backend
        assert self._filters is not None
        maybe = self._filters.rrns_maybe_stored(list(rrns))
        rows = reader.txn_rows(maybe) if maybe else []
        for seq, d, _ in self._overlay:  # rows made only for the few drafts asked about
            if d.rrn in rrns or (d.original_rrn and d.original_rrn in rrns):
                rows.append(TxnRow(seq, d.kind, d.rrn, d.original_rrn, d.amount_minor, d.currency))
        return rows

    def _wake(self) -> None:
        """The committer's batch has ended: an idle writer answers its callers (`_take_batch`)."""
        with self._cond:
            self._cond.notify()

    def _take_batch(self) -> list[_Submission] | None:
        """The next batch; None when the writer is to stop; [] when nothing is queued and the batch
        in flight has ended (its callers wait for the writer to answer them)."""
        committer = self._committer
        with self._cond:
            while not self._queue and not self._closing and self._failure is None:
                if self._inflight and committer is not None and not committer.busy:
                    return []
                self._cond.wait()
            if not self._queue or self._failure is not None:
                return None
            if self._window_s > 0 and self._queued_entries < self._max_batch and not self._closing:
                # The window goes on where it was if the batch in flight ended meanwhile: its
                # callers are answered first (returning []), not after the window.
                deadline = self._window_ends or time.monotonic() + self._window_s
                self._window_ends = deadline
                while self._queued_entries < self._max_batch and not self._closing:
                    if self._inflight and committer is not None and not committer.busy:
                        return []
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            # A batch is taken: the next one has a window of its own (even when this one filled up
            # without its window being waited out, after an interrupted window).
            self._window_ends = 0.0
            batch: list[_Submission] = []
            n = 0
            queue = self._queue
            while queue and n + len(queue[0].drafts) <= self._max_batch:
                sub = queue.popleft()
                n += len(sub.drafts)
                batch.append(sub)
            self._queued_entries -= n
            return batch

    def _process(self, subs: list[_Submission]) -> None:
        b = self._reader if self._reader is not None else self._backend
        filters = self._filters
        assert filters is not None
        filters.poll()
        try:
            tail = self._tail
            indexing = self._indexing
            existing: dict[str, tuple[int, bytes]] = {}
            unknown: list[str] = []
            for s in subs:
                for d in s.drafts:
                    hit = tail.get(d.idempotency_key)
                    if hit is None and indexing:
                        hit = indexing.get(d.idempotency_key)
                    if hit is None:
                        unknown.append(d.idempotency_key)
                    else:
                        existing[d.idempotency_key] = hit
            if unknown:
                unknown = filters.keys_maybe_indexed(unknown)  # ~1% of fresh keys, every repeat
                if unknown:
                    existing.update(b.find_idempotency_indexed(unknown))
            rrns: set[str] = set()
            for s in subs:
                for d in s.drafts:
                    if d.original_rrn:
                        rrns.add(d.original_rrn)
                    if d.kind in STARTING_KINDS:
                        rrns.add(d.rrn)
            book = Book()
            book.replay(family_rows(self._txn_rows, rrns))
        except BaseException as exc:
            if not self._drain():  # the state it was checked against is gone
                self._after_failed_drain(subs)
                return
            self._fail_batch(subs, exc)
            return

        new: list[tuple[int, EntryDraft, bytes]] = []
        # Keys seen: the stored ones, then this batch's (a repeat inside one batch returns the first).
        accept(subs, existing, book, self._frontier.size, new)

        rows: BatchRows | None = None
        if new:
            frontier = self._frontier.copy()
            try:
                rows, balances, keyed, rrns = self._rows(frontier, new)
            except BaseException as exc:
                if not self._drain():
                    self._after_failed_drain(subs)
                    return
                self._fail_batch(subs, exc)
                return
        if not self._drain(defer_answers=True):  # batch k failed: this one was checked against it
            self._after_failed_drain(subs)
            return
        # Batch k is durable; its callers are answered after k+1 is handed over (below), else now.
        committer = self._committer if len(new) >= self._pipeline_min else None
        if rows is None:  # repeats and refusals: answered in order, after k
            self._answer_due()
            self._answer(subs)
            return
        if committer is None:
            self._answer_due()
            try:
                self._backend.write_batch(rows)
            except BaseException as exc:
                self._fail_batch(subs, exc)
                return
        # Durable (in line) or in flight: the state moves on either way; a failure reloads it.
        self._frontier = frontier
        self._tail.update(keyed)
        assert self._filters is not None  # before any index run or lookup can need them:
        self._filters.add(keyed, rrns)
        if len(self._balances) + len(balances) > MAX_CACHED_BALANCES:
            self._balances.clear()
        self._balances.update(balances)
        if rows.checkpoint is not None:
            self._checkpointed_size = rows.checkpoint[0]
        if committer is None:
            self._answer(subs)
        else:
            self._overlay = new
            self._inflight = subs
            committer.submit(rows, wait_taken=self._handoff_waits)
            self._answer_due()
        self._maybe_index()

    def _maybe_index(self) -> None:
        """Between batches: settle a finished run; start the next when a run's worth is unindexed."""
        indexer = self._indexer
        if indexer is None:
            if self._frontier.size - self._watermark >= self._run_entries and self._drain():
                self._index_run()
            return
        if indexer.busy:
            return
        self._finish_index_run(wait=False)
        if self._frontier.size - self._watermark >= self._run_entries and self._drain():
            self._start_index_run()

    def _rows(
        self, frontier: Frontier, new: list[tuple[int, EntryDraft, bytes]]
    ) -> tuple[BatchRows, dict[tuple[str, str], int], dict[str, tuple[int, bytes]], list[str]]:
        """Entry, node and balance rows of the accepted drafts; the new balances; their keys as the
        tail holds them; their rrns (for the filter). Advances `frontier`. Touches no writer state,
        so a failed commit leaves nothing to undo."""
        nodes: list[tuple[int, int, bytes]] = []
        entries: list[tuple[object, ...]] = []
        keyed: dict[str, tuple[int, bytes]] = {}
        rrns: list[str] = []
        running: dict[tuple[str, str], int] = {}
        first_seq: dict[tuple[str, str], int] = {}
        last_seq: dict[tuple[str, str], int] = {}
        build = fast.build_rows_ext() or _build_rows_py
        build(frontier, new, entries, nodes, keyed, rrns, running, first_seq, last_seq, self._balances,
              self._stored_balance)  # fmt: skip
        size = frontier.size
        root = frontier.root()
        now_ms = self._clock_ms()
        checkpoint = None
        if self._key is not None and size - self._checkpointed_size >= self._checkpoint_every:
            checkpoint = sign_checkpoint(self._key, size, root, now_ms)
        rows = BatchRows(
            entries=entries,
            nodes=nodes,
            balances=[(a, c, last_seq[(a, c)], first_seq[(a, c)], v) for (a, c), v in running.items()],
            tree_head=(size, root, now_ms),
            checkpoint=checkpoint,
        )
        return rows, running, keyed, rrns

    def _stored_balance(self, account: str, currency: str) -> int:
        # Accounts the in-flight batch touched are in the cache (cleared only with nothing in flight).
        reader = self._reader if self._reader is not None else self._backend
        row = reader.balance_at_or_before(account, currency, None)
        return 0 if row is None else row.balance_minor

    def _answer(self, subs: list[_Submission]) -> None:
        """Call each submission's on_done, and each submit_many caller's on_batch once."""
        batches: dict[int, tuple[OnBatch, BatchResult]] = {}
        for sub in subs:
            sub.answered = True
            if sub.on_done is not None:
                try:
                    sub.on_done(sub.entries, sub.error)
                except Exception:
                    log.exception("ledger on_done callback raised; ignored")
                continue
            assert sub.on_batch is not None
            group = batches.get(id(sub.on_batch))
            if group is None:
                group = batches[id(sub.on_batch)] = (sub.on_batch, [])
            group[1].append((sub.token, sub.entries, sub.error))
        for on_batch, results in batches.values():
            try:
                on_batch(results)
            except Exception:
                log.exception("ledger on_batch callback raised; ignored")

    def _fail_batch(self, subs: list[_Submission], exc: BaseException) -> None:
        """The batch is not (known to be) durable: fail every caller that has no rule error of its own,
        then re-read the state; if that fails too, stop."""
        log.error("ledger batch of %d submissions failed: %s", len(subs), exc)
        for sub in subs:
            if sub.error is None:
                sub.entries = None
                sub.error = exc
        self._answer(subs)
        try:
            self._load_state()
        except BaseException as reload_exc:
            log.error("ledger writer cannot recover its state: %s", reload_exc)
            self._stop(reload_exc)

    def _stop(self, exc: BaseException) -> None:
        """Refuse what is queued and everything after. Callers are answered from this thread only:
        a batch still in flight on the committer is waited for first."""
        self._answer_due()
        self._answer(self._settle()[0])
        with self._cond:
            self._failure = exc
            pending = list(self._queue)
            self._queue.clear()
            self._queued_entries = 0
        for sub in pending:
            sub.error = LedgerUnavailable(f"ledger writer stopped: {exc}")
        self._answer(pending)

    def _final_checkpoint(self) -> None:
        size = self._frontier.size
        if self._key is None or size == 0 or size == self._checkpointed_size:
            return
        self._backend.write_checkpoint(
            sign_checkpoint(self._key, size, self._frontier.root(), self._clock_ms())
        )
        self._checkpointed_size = size


def _build_rows_py(
    frontier: Frontier,
    new: list[tuple[int, EntryDraft, bytes]],
    entries: list[tuple[object, ...]],
    nodes: list[tuple[int, int, bytes]],
    keyed: dict[str, tuple[int, bytes]],
    rrns: list[str],
    running: dict[tuple[str, str], int],
    first_seq: dict[tuple[str, str], int],
    last_seq: dict[tuple[str, str], int],
    cache: dict[tuple[str, str], int],
    load_balance: Callable[[str, str], int],
) -> None:
    """The reference of switch._speedups.ledger.build_rows: for each (seq, draft, body) append its
    entries row, append its leaf to `frontier` (closed subtrees at level >= min_level go to `nodes`),
    map its key to (seq, body) in `keyed`, append its rrn and original_rrn (when set) to `rrns`, and
    fold its postings into `running` (starting from `cache`, else the stored balance)."""
    header = _HEADER.pack
    sha = _sha256
    append_leaf = frontier.append
    for seq, d, body in new:
        if seq != frontier.size:
            raise ValueError(f"entry seq {seq} is not the next leaf index {frontier.size}")
        leaf = sha(b"\x00" + header(ENTRY_FORMAT, seq) + body).digest()
        append_leaf(leaf, nodes)
        entries.append(
            (seq, d.idempotency_key, d.kind.value, d.rrn, d.original_rrn, d.at_ms, d.merchant_id,
             d.amount_minor, d.currency, body, leaf)
        )  # fmt: skip
        keyed[d.idempotency_key] = (seq, body)
        rrns.extend(r for r in (d.rrn, d.original_rrn) if r)
        for p in d.postings:
            k = (p.account, p.currency)
            bal = running.get(k)
            if bal is None:
                bal = cache.get(k)
                if bal is None:
                    bal = load_balance(p.account, p.currency)
                first_seq[k] = seq
            running[k] = bal + (p.amount_minor if p.side is _DEBIT else -p.amount_minor)
            last_seq[k] = seq


def accept(
    subs: list[_Submission],
    batch_keys: dict[str, tuple[int, bytes]],
    book: Book,
    seq: int,
    new: list[tuple[int, EntryDraft, bytes]],
) -> int:
    """Check each submission against `book` and the keys seen (`batch_keys`: stored ones, then this
    batch's; a repeat returns the original); set its entries or its error; append the accepted
    drafts to `new` as (seq, draft, body); return the next seq. A one-draft submission needs no
    undo journal: Book.apply raises before it changes anything, so a refused draft leaves the book
    as it was."""
    apply = book.apply
    for sub in subs:
        # A submission checked again after the in-flight batch failed (_after_failed_drain) must
        # not keep the first check's outcome: an old refusal next to new entries would tell the
        # caller "refused" for a posting that is written.
        sub.entries = sub.error = None
        drafts = sub.drafts
        if len(drafts) != 1:
            seq = accept_several(sub, batch_keys, book, seq, new)
            continue
        d = drafts[0]
        body = sub.bodies[0]
        key = d.idempotency_key
        hit = batch_keys.get(key)
        if hit is not None:
            if hit[1] != body:
                sub.error = _conflict(key, hit[0])
            else:
                sub.entries = [Entry(seq=hit[0], draft=d)]
            continue
        try:
            apply(seq, d.kind, d.rrn, d.original_rrn, d.amount_minor, d.currency)
        except LedgerRejected as exc:
            sub.error = exc
            continue
        batch_keys[key] = (seq, body)
        sub.entries = [Entry(seq=seq, draft=d)]
        new.append((seq, d, body))
        seq += 1
    return seq


def _conflict(key: str, seq: int) -> IdempotencyConflict:
    return IdempotencyConflict(f"idempotency key {key!r} was used for a different entry (seq {seq})")


def accept_several(
    sub: _Submission,
    batch_keys: dict[str, tuple[int, bytes]],
    book: Book,
    seq: int,
    new: list[tuple[int, EntryDraft, bytes]],
) -> int:
    """`accept` for a submission of several drafts: all of them or none (the book's undo journal)."""
    start_seq, start_new = seq, len(new)
    added: list[str] = []
    out: list[Entry] = []
    apply = book.apply
    book.begin()
    try:
        for d, body in zip(sub.drafts, sub.bodies):
            key = d.idempotency_key
            hit = batch_keys.get(key)
            if hit is not None:
                if hit[1] != body:
                    raise _conflict(key, hit[0])
                out.append(Entry(seq=hit[0], draft=d))
                continue
            apply(seq, d.kind, d.rrn, d.original_rrn, d.amount_minor, d.currency)
            batch_keys[key] = (seq, body)
            added.append(key)
            out.append(Entry(seq=seq, draft=d))
            new.append((seq, d, body))
            seq += 1
    except (LedgerRejected, IdempotencyConflict) as exc:
        book.rollback()
        del new[start_new:]
        for key in added:
            del batch_keys[key]
        sub.error = exc
        return start_seq
    book.commit()
    sub.entries = out
    return seq
