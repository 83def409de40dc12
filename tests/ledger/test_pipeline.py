"""The writer's pipeline (switch.ledger.writer, "Pipeline"): batch k+1 is checked while batch k
commits, against k as if it were durable -- and checked again if k fails. Each test holds batch k's
commit until batch k+1's lookups have run, so k+1 is really checked against the batch in flight."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger.backend import BatchRows, LedgerStorageError
from switch.ledger.model import Entry, EntryKind, IdempotencyConflict
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import OriginalNotFound
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerUnavailable, LedgerWriter
from tests.ledger.conftest import LedgerDb
from tests.ledger.drafts import draft

K = EntryKind
WAIT_S = 10


class Gate:
    """Holds the first write_batch until the writer has looked up the next batch; then lets it
    through, or fails it."""

    def __init__(self, writer: LedgerWriter, fail_first: bool) -> None:
        self.in_flight = threading.Event()  # the first batch is committing: submit the next one
        self.lookups_done = threading.Event()
        backend: Any = writer._backend
        real_write = backend.write_batch
        calls = [0]

        def write_batch(rows: BatchRows) -> None:
            calls[0] += 1
            if calls[0] == 1:
                self.in_flight.set()
                assert self.lookups_done.wait(WAIT_S), "the next batch was never checked"
                if fail_first:
                    raise LedgerStorageError("disk full")
            real_write(rows)

        backend.write_batch = write_batch
        reader: Any = writer._reader
        assert reader is not None, "this backend should pipeline"
        real_txn_rows = reader.txn_rows

        def txn_rows(rrns: Any) -> Any:
            out = real_txn_rows(rrns)
            if self.in_flight.is_set():
                self.lookups_done.set()
            return out

        reader.txn_rows = txn_rows


class Answer:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.entries: list[Entry] | None = None
        self.error: BaseException | None = None

    def __call__(self, entries: list[Entry] | None, error: BaseException | None) -> None:
        self.entries, self.error = entries, error
        self.done.set()

    def wait(self) -> Answer:
        assert self.done.wait(WAIT_S)
        return self


@pytest.fixture
def writer(ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey) -> Any:
    w = LedgerWriter(
        ledger_backend.open(),
        signing_key=signing_key,
        config=LedgerConfig(batch_window_ms=0, commit_pipeline=True, pipeline_min_batch_entries=1),
    )
    yield w
    w.close()


@pytest.mark.parametrize("fail_first", [False, True], ids=["k-durable", "k-fails"])
def test_a_small_batch_commits_in_line_after_the_large_one_in_flight(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey, fail_first: bool
) -> None:
    """Batches under pipeline_min_batch_entries commit on the writer's thread, but only after the
    batch in flight: answered after it, and checked again if it failed."""
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key,
                     config=LedgerConfig(batch_window_ms=0, commit_pipeline=True,
                                        pipeline_min_batch_entries=2))  # fmt: skip
    order: list[str] = []
    try:
        gate = Gate(w, fail_first=fail_first)
        sales, refund = Answer(), Answer()
        w.submit([draft("s1", K.PURCHASE, "R1", 1_000), draft("s2", K.PURCHASE, "R2", 50)],
                 lambda e, x: (order.append("sales"), sales(e, x)))  # fmt: skip
        assert gate.in_flight.wait(WAIT_S), "two entries: the pipelined path"
        w.submit([draft("r", K.REFUND, "F1", 400, "R1")], lambda e, x: (order.append("refund"), refund(e, x)))
        sales.wait()
        refund.wait()
        assert order == ["sales", "refund"]
        if fail_first:
            assert isinstance(sales.error, LedgerStorageError)
            assert isinstance(refund.error, OriginalNotFound), "checked again without the failed sale"
        else:
            assert sales.error is None and refund.error is None
            assert [e.seq for e in refund.entries or []] == [2]
    finally:
        w.close()
    be = ledger_backend.open()
    try:
        assert be.entry_count() == (0 if fail_first else 3)
    finally:
        be.close()


def test_a_refund_of_a_sale_still_committing_is_accepted(
    writer: LedgerWriter, ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    gate = Gate(writer, fail_first=False)
    sale, refund = Answer(), Answer()
    writer.submit([draft("s", K.PURCHASE, "R1", 1_000)], sale)
    assert gate.in_flight.wait(WAIT_S)
    writer.submit([draft("r", K.REFUND, "F1", 400, "R1")], refund)
    assert sale.wait().error is None and refund.wait().error is None
    assert [e.seq for e in sale.entries or []] == [0] and [e.seq for e in refund.entries or []] == [1]
    writer.close()
    be = ledger_backend.open()
    try:
        assert LedgerReader(be).refundable_remainder("R1") == 600
        assert verify_ledger(be, signing_key.public_key()).ok
    finally:
        be.close()


def test_a_repeat_of_an_entry_whose_commit_fails_is_posted_itself(
    writer: LedgerWriter, ledger_backend: LedgerDb
) -> None:
    gate = Gate(writer, fail_first=True)
    first, repeat = Answer(), Answer()
    writer.submit([draft("k", K.PURCHASE, "R1", 1_000)], first)
    assert gate.in_flight.wait(WAIT_S)
    writer.submit([draft("k", K.PURCHASE, "R1", 1_000), draft("k2", K.PURCHASE, "R2", 5)], repeat)
    assert isinstance(first.wait().error, LedgerStorageError)
    assert repeat.wait().error is None, "the failure of the batch before is not the repeat's"
    assert [e.seq for e in repeat.entries or []] == [0, 1]
    writer.close()
    be = ledger_backend.open()
    try:
        assert be.entry_count() == 2
        assert {k: v[0] for k, v in be.find_idempotency(["k", "k2"]).items()} == {"k": 0, "k2": 1}
    finally:
        be.close()


def test_a_refund_of_a_sale_whose_commit_fails_is_refused(
    writer: LedgerWriter, ledger_backend: LedgerDb
) -> None:
    gate = Gate(writer, fail_first=True)
    sale, refund = Answer(), Answer()
    writer.submit([draft("s", K.PURCHASE, "R1", 1_000)], sale)
    assert gate.in_flight.wait(WAIT_S)
    writer.submit([draft("r", K.REFUND, "F1", 400, "R1")], refund)
    assert isinstance(sale.wait().error, LedgerStorageError)
    assert isinstance(refund.wait().error, OriginalNotFound)
    assert writer.append([draft("s", K.PURCHASE, "R1", 1_000)])[0].seq == 0, "the writer goes on"
    with pytest.raises(IdempotencyConflict):
        writer.append([draft("s", K.PURCHASE, "R1", 999)])


def test_a_conflict_with_a_failed_batch_is_posted_and_answered_as_posted(
    writer: LedgerWriter, ledger_backend: LedgerDb
) -> None:
    """k+1 reuses k's key with another payload: refused while k is in flight. k fails, so k+1 is
    checked again and posted -- and its caller must hear the entries, not the first check's
    refusal (else a terminal hears 'refused' for money the ledger holds)."""
    gate = Gate(writer, fail_first=True)
    first, other = Answer(), Answer()
    writer.submit([draft("k", K.PURCHASE, "R1", 1_000)], first)
    assert gate.in_flight.wait(WAIT_S)
    writer.submit([draft("k", K.PURCHASE, "R1", 999)], other)
    assert isinstance(first.wait().error, LedgerStorageError)
    other.wait()
    assert other.error is None, f"posted, so not refused: {other.error!r}"
    assert [e.seq for e in other.entries or []] == [0]
    writer.close()
    be = ledger_backend.open()
    try:
        assert be.entry_count() == 1
    finally:
        be.close()


def test_a_writer_that_cannot_open_its_indexer_leaves_no_thread_or_connection(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    """PostgreSQL refusing the indexer's connection at start-up: the writer raises, and the committer
    and filter threads and the reader connections it had already opened are gone."""
    backend: Any = ledger_backend.open()
    readers: list[Any] = []
    real_open_reader = backend.open_reader

    closed: list[Any] = []

    def open_reader() -> Any:
        r = real_open_reader()
        real_close = r.close

        def close() -> None:
            closed.append(r)
            real_close()

        r.close = close
        readers.append(r)
        return r

    def open_indexer() -> Any:
        raise LedgerStorageError("too many connections")

    backend.open_reader, backend.open_indexer = open_reader, open_indexer
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(LedgerStorageError, match="too many connections"):
        LedgerWriter(backend, signing_key=signing_key,
                     config=LedgerConfig(commit_pipeline=True, pipeline_min_batch_entries=1))  # fmt: skip
    assert len(readers) == 2, "the pipeline's reader and the filters' builder"
    assert not [t for t in threading.enumerate() if t.name not in before and t.is_alive()]
    assert sorted(map(id, closed)) == sorted(map(id, readers)), "every reader connection was closed"
    backend.close()


def test_a_bug_while_a_batch_is_in_flight_answers_everyone_once_and_in_order(
    writer: LedgerWriter, ledger_backend: LedgerDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error escapes while batch k+1 is checked and k commits: k's caller hears k's
    outcome (from the committer), then k+1's caller hears 'stopped' -- nobody waits for ever, nobody
    is answered twice, and answers never come from two threads at once."""
    from switch.ledger import writer as writer_module

    real_accept = writer_module.accept
    calls = [0]

    def accept(*args: Any) -> int:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("a bug in the rules")
        return real_accept(*args)

    monkeypatch.setattr(writer_module, "accept", accept)
    gate = Gate(writer, fail_first=False)
    heard: list[tuple[str, object]] = []
    busy = threading.Lock()

    def answer(name: str, done: Answer) -> Any:
        def call(entries: list[Entry] | None, error: BaseException | None) -> None:
            assert busy.acquire(blocking=False), "two answers at once"
            heard.append((name, error))
            busy.release()
            done(entries, error)

        return call

    sale, refund = Answer(), Answer()
    writer.submit([draft("s", K.PURCHASE, "R1", 1_000)], answer("sale", sale))
    assert gate.in_flight.wait(WAIT_S)
    writer.submit([draft("r", K.REFUND, "F1", 400, "R1")], answer("refund", refund))
    assert sale.wait().error is None
    assert isinstance(refund.wait().error, LedgerUnavailable)
    assert [name for name, _ in heard] == ["sale", "refund"]
    with pytest.raises(LedgerUnavailable):
        writer.append([draft("t", K.PURCHASE, "R2", 5)])


def test_callers_of_a_committed_batch_do_not_wait_for_the_next_batch_window(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    """The writer answers a pipelined batch's callers (the committer only commits): while it waits out
    the next batch's window, a batch that has committed is still answered at once."""
    cfg = LedgerConfig(batch_window_ms=60_000, max_batch_entries=2, pipeline_min_batch_entries=1)
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key, config=cfg)
    try:
        first, second, third = Answer(), Answer(), Answer()
        w.submit([draft("a1", K.PURCHASE, "R1", 100), draft("a2", K.PURCHASE, "R2", 200)], first)  # full
        w.submit([draft("b", K.PURCHASE, "R3", 300)], second)  # waits for the window or a second entry
        assert first.wait().error is None, "answered while the next batch waits out its window"
        assert not second.done.is_set()
        w.submit([draft("c1", K.PURCHASE, "R4", 400), draft("c2", K.PURCHASE, "R5", 500)], third)
        assert second.wait().error is None and third.wait().error is None
        assert [e.seq for e in second.entries or []] == [2]
        assert [e.seq for e in third.entries or []] == [3, 4]
    finally:
        w.close()
