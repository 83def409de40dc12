"""Book.apply is all-or-nothing: a refused entry leaves the book exactly as it was. The writer relies on
it to accept one-draft submissions without an undo journal (switch.ledger.writer.accept)."""

from __future__ import annotations

import random

import pytest

from switch.ledger.model import EntryKind
from switch.ledger.rules import Book, LedgerRejected

K = EntryKind


def _snapshot(book: Book) -> dict[str, list[tuple[object, ...]]]:
    return {
        rrn: [
            (
                t.seq,
                t.kind,
                t.amount_minor,
                t.currency,
                t.closed,
                t.refunded_minor,
                None if t.parent is None else t.parent.seq,
                None if t.captured_by is None else t.captured_by.seq,
            )
            for t in txns
        ]
        for rrn, txns in book.by_rrn.items()
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_refused_entry_changes_nothing(seed: int) -> None:
    rnd = random.Random(seed)
    book = Book()
    kinds = list(K)
    refused = accepted = 0
    for seq in range(4_000):
        kind = rnd.choice(kinds)
        rrn = f"R{rnd.randrange(60)}"
        original = rnd.choice(["", f"R{rnd.randrange(60)}"])
        amount = rnd.choice([0, -5, 100, 250, 1_000, rnd.randrange(1, 2_000)])
        currency = rnd.choice(["978", "978", "978", "840"])
        before = _snapshot(book)
        try:
            book.apply(seq, kind, rrn, original, amount, currency)
        except LedgerRejected:
            refused += 1
            assert _snapshot(book) == before, f"seed {seed} seq {seq}: a refused {kind} changed the book"
        else:
            accepted += 1
    assert refused > 500 and accepted > 500, "both paths were exercised many times"
