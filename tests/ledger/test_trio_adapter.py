"""switch.server.ledger_async under trio: many tasks share group commits, errors arrive as exceptions,
and a cancelled caller still gets the ledger's true answer (the cancel lands at its next checkpoint)."""

from __future__ import annotations

import threading

import pytest
import trio

from switch.config import LedgerConfig
from switch.ledger.model import EntryKind
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import RefundExceedsOriginal
from switch.ledger.writer import LedgerBusy, LedgerWriter
from switch.server.ledger_async import append

from .conftest import LedgerDb
from .drafts import draft


def test_concurrent_tasks_share_batches_and_get_their_own_entries(
    ledger_backend: LedgerDb, signing_key
) -> None:
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key, config=LedgerConfig(batch_window_ms=5))
    got: dict[int, int] = {}

    async def one(i: int) -> None:
        (entry,) = await append(w, [draft(f"k{i}", EntryKind.PURCHASE, f"R{i}", 10 + i)])
        assert entry.draft.rrn == f"R{i}"
        got[i] = entry.seq

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        with pytest.raises(RefundExceedsOriginal):
            await append(w, [draft("r", EntryKind.REFUND, "F", 11, "R0")])

    try:
        trio.run(main)
    finally:
        w.close()
    assert sorted(got.values()) == list(range(200))
    heads = ledger_backend.open().tree_heads()
    assert len(heads) < 200  # group commit: fewer commits than entries


def test_busy_is_raised_at_once(ledger_backend: LedgerDb, signing_key) -> None:
    gate = threading.Event()
    backend = ledger_backend.open()
    real = backend.write_batch
    backend.write_batch = lambda batch: (gate.wait(10), real(batch))[1]  # type: ignore[method-assign]
    cfg = LedgerConfig(batch_window_ms=0, max_batch_entries=1, max_queue_entries=1)
    w = LedgerWriter(backend, signing_key=signing_key, config=cfg)

    async def main() -> None:
        w.submit([draft("a", EntryKind.PURCHASE, "A", 1)], lambda *_: None)
        while w._queued_entries:  # the writer took it and is stuck in write_batch
            await trio.sleep(0.001)
        w.submit([draft("b", EntryKind.PURCHASE, "B", 1)], lambda *_: None)  # fills the queue
        with pytest.raises(LedgerBusy):
            await append(w, [draft("c", EntryKind.PURCHASE, "C", 1)])

    try:
        trio.run(main)
    finally:
        gate.set()
        w.close()


def test_cancelled_caller_still_gets_the_answer_then_the_cancel(
    ledger_backend: LedgerDb, signing_key
) -> None:
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key, config=LedgerConfig(batch_window_ms=50))
    answers = []

    async def main() -> None:
        with trio.move_on_after(0.001) as scope:
            answers.append(await append(w, [draft("k", EntryKind.PURCHASE, "R", 5)]))
            await trio.sleep(0)  # the deferred cancel lands at the next checkpoint
            answers.append("not reached")
        assert scope.cancelled_caught

    try:
        trio.run(main)
    finally:
        w.close()
    assert [[e.seq for e in answers[0]]] == [[0]] and len(answers) == 1
    reader = LedgerReader(ledger_backend.open())
    try:
        assert [e.seq for e in reader.entries_by_rrn("R")] == [0]  # committed although the caller gave up
    finally:
        reader.close()
