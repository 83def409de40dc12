"""Read side of the ledger: balances, entries by RRN, refundable remainders, merchant totals, open
holds, and the rebuild check. Every entry read back is decoded from its hashed body and re-checked
(postings balance per currency, indexed columns equal the body) -- the "after" side of the asserts the
writer makes before it writes.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from switch.ledger.backend import EntryRowT, LedgerBackend
from switch.ledger.codec import decode_draft
from switch.ledger.model import Entry, EntryDraft, EntryKind, Side
from switch.ledger.rules import Book, LedgerCorrupt, family_rows


class MerchantTotal(msgspec.Struct, frozen=True):
    kind: str
    currency: str
    count: int
    amount_minor: int


class OpenHold(msgspec.Struct, frozen=True):
    seq: int
    rrn: str
    merchant_id: str
    amount_minor: int
    currency: str
    at_ms: int


class RebuildReport(msgspec.Struct, frozen=True):
    """Result of refolding the whole log; `problems` is empty when everything agrees."""

    entries: int
    accounts: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def row_problem(row: EntryRowT, draft: EntryDraft) -> str:
    """Why a stored row disagrees with its own body ('' when it does not)."""
    for column, value in (
        ("idempotency_key", draft.idempotency_key),
        ("kind", draft.kind.value),
        ("rrn", draft.rrn),
        ("original_rrn", draft.original_rrn),
        ("at_ms", draft.at_ms),
        ("merchant_id", draft.merchant_id),
        ("amount_minor", draft.amount_minor),
        ("currency", draft.currency),
    ):
        if getattr(row, column) != value:
            return f"column {column} differs from the hashed body"
    net: dict[str, int] = {}
    for p in draft.postings:
        if p.amount_minor <= 0:
            return "a posting has a non-positive amount"
        net[p.currency] = net.get(p.currency, 0) + (
            p.amount_minor if p.side is Side.DEBIT else -p.amount_minor
        )
    if any(net.values()):
        return f"postings do not balance: {net}"
    return ""


def read_entry(row: EntryRowT) -> Entry:
    """Decode and re-check one stored row; LedgerCorrupt if it does not hold up."""
    try:
        draft = decode_draft(row.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LedgerCorrupt(f"entry {row.seq}: body is not an entry ({exc})") from None
    problem = row_problem(row, draft)
    if problem:
        raise LedgerCorrupt(f"entry {row.seq}: {problem}")
    return Entry(seq=row.seq, draft=draft)


def signed_effects(draft: EntryDraft) -> Iterator[tuple[tuple[str, str], int]]:
    for p in draft.postings:
        yield (p.account, p.currency), (p.amount_minor if p.side is Side.DEBIT else -p.amount_minor)


class LedgerReader:
    """Queries over one backend (use a backend of its own, not the writer's)."""

    def __init__(self, backend: LedgerBackend) -> None:
        self.backend = backend

    def close(self) -> None:
        self.backend.close()

    def entries_by_rrn(self, rrn: str) -> list[Entry]:
        return [read_entry(r) for r in self.backend.entries_by_rrn(rrn)]

    def entry(self, seq: int) -> Entry | None:
        rows = self.backend.entry_rows(seq, seq + 1)
        return read_entry(rows[0]) if rows else None

    def balance(self, account: str, currency: str, through_seq: int | None = None) -> int:
        """Debits minus credits of `account` in `currency` after all entries (or after entry
        `through_seq`, inclusive). Cost: two indexed lookups, plus decoding at most one batch."""
        b = self.backend
        if through_seq is None:
            row = b.balance_at_or_before(account, currency, None)
            return 0 if row is None else row.balance_minor
        if through_seq < 0:
            return 0
        prev = b.balance_at_or_before(account, currency, through_seq)
        base, after = (0, -1) if prev is None else (prev.balance_minor, prev.seq)
        nxt = b.balance_after(account, currency, after)
        if nxt is None or nxt.first_seq > through_seq:
            return base
        # through_seq falls inside the batch that `nxt` summarises: fold that part of it.
        for row in b.entry_rows(nxt.first_seq, through_seq + 1):
            for key, amount in signed_effects(read_entry(row).draft):
                if key == (account, currency):
                    base += amount
        return base

    def refundable_remainder(self, rrn: str) -> int:
        """What can still be refunded of the sale `rrn` (0 once voided or reversed)."""
        book = Book()
        book.replay(family_rows(self.backend.txn_rows, {rrn}))
        book.check()
        left = book.refundable_minor(rrn)
        sale = book.find(rrn, frozenset({EntryKind.PURCHASE, EntryKind.STAND_IN, EntryKind.CAPTURE}), True)
        if sale is None or not 0 <= left <= sale.amount_minor:
            raise LedgerCorrupt(f"refundable remainder of {rrn!r} out of range: {left}")
        return left

    def merchant_totals(self, merchant_id: str, from_ms: int, to_ms: int) -> list[MerchantTotal]:
        """Count and sum per (kind, currency) of the merchant's entries with from_ms <= at_ms < to_ms
        (declines excluded)."""
        return [MerchantTotal(*r) for r in self.backend.merchant_totals(merchant_id, from_ms, to_ms)]

    def open_holds(self, placed_before_ms: int | None = None) -> list[OpenHold]:
        return [OpenHold(*r) for r in self.backend.open_holds(placed_before_ms)]

    def rebuild_check(self) -> RebuildReport:
        """Fold the whole log: balances must equal every balance_history row at its seq and the
        current balances; every entry must pass the hold/refund rules; the key and merchant index
        tables must hold exactly the entries below the watermark. Memory: one dict entry per
        account and per transaction."""
        problems: list[str] = []
        folded: dict[tuple[str, str], int] = {}
        history = self.backend.balance_rows_by_seq()
        pending = next(history, None)
        book = Book()
        count = 0
        for row in self.backend.iter_entry_rows():
            entry = read_entry(row)
            d = entry.draft
            try:
                book.apply(row.seq, d.kind, d.rrn, d.original_rrn, d.amount_minor, d.currency)
            except ValueError as exc:
                problems.append(f"entry {row.seq} breaks a ledger rule: {exc}")
            for key, amount in signed_effects(d):
                folded[key] = folded.get(key, 0) + amount
            while pending is not None and pending.seq <= row.seq:
                if pending.seq == row.seq:
                    got = folded.get((pending.account, pending.currency), 0)
                    if got != pending.balance_minor:
                        problems.append(
                            f"balance of {pending.account} {pending.currency} after entry {row.seq}: "
                            f"stored {pending.balance_minor}, fold of the log {got}"
                        )
                else:
                    problems.append(f"balance row at seq {pending.seq} names no entry")
                pending = next(history, None)
            count += 1
        if pending is not None:
            problems.append(f"balance rows after the last entry (seq {pending.seq})")
        try:
            book.check()
        except LedgerCorrupt as exc:
            problems.append(str(exc))
        problems.extend(self.backend.index_problems())
        latest = {(r.account, r.currency): r.balance_minor for r in self.backend.latest_balances()}
        for key in sorted(set(latest) | set(folded)):
            if latest.get(key, 0) != folded.get(key, 0):
                problems.append(
                    f"current balance of {key[0]} {key[1]}: "
                    f"stored {latest.get(key, 0)}, fold {folded.get(key, 0)}"
                )
        return RebuildReport(entries=count, accounts=len(folded), problems=problems)
