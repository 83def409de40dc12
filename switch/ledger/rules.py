"""Money rules that span entries: holds resolve once, refunds never exceed what is left, voids and
reversals act once. A pure fold (`Book`) over the entries of one family of transactions.

Why a fold and not a mutable state table: the log is the truth. The writer loads, per batch, only the
entries of the transaction families its drafts touch (`family_rows`), replays them into a `Book`, then
applies the new drafts; queries (refundable remainder) use the same fold, and replaying stored entries
that break a rule raises `LedgerCorrupt` -- the invariants are asserted on both sides of the write.

Rules (by EntryKind; `original_rrn` names the transaction acted on):
- hold, purchase, stand_in, fee, deposit, subscription: start a transaction (amount > 0); a second
  entry of the same kind with the same rrn is a DuplicateTransaction.
- capture: closes an open hold; 0 < amount <= hold amount (partial capture releases the rest); the
  capture itself is a sale that can be refunded, voided or reversed.
- hold_void, hold_expiry: close an open hold; amount == hold amount.
- void: cancels a sale (purchase, stand_in, capture) with no refunds; amount == sale amount.
- refund / fee_refund / deposit_refund / subscription_refund: against a sale / fee / deposit /
  subscription that is not closed; amount <= original - earlier refunds (reversed refunds give their
  amount back). A refund naming a captured hold's rrn acts on its capture.
- reversal: undoes the latest open transaction of original_rrn (any kind above, refunds included);
  amount == what is left of it (full reversal; partial reversals are not modelled). A reversed refund
  returns its amount to its original's refundable remainder.
- decline, settlement, adjustment: no cross-entry rules.
Currencies must match the original's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from switch.ledger.backend import TxnRow
from switch.ledger.model import EntryKind

K = EntryKind
SALE_KINDS = frozenset({K.PURCHASE, K.STAND_IN, K.CAPTURE})
STARTING_KINDS = frozenset(
    {K.HOLD, K.PURCHASE, K.STAND_IN, K.CAPTURE, K.REFUND, K.FEE, K.FEE_REFUND, K.DEPOSIT,
     K.DEPOSIT_REFUND, K.SUBSCRIPTION, K.SUBSCRIPTION_REFUND}
)  # fmt: skip
HOLD_ACTIONS = frozenset({K.CAPTURE, K.HOLD_VOID, K.HOLD_EXPIRY})
REFUND_OF: dict[EntryKind, frozenset[EntryKind]] = {
    K.REFUND: SALE_KINDS,
    K.FEE_REFUND: frozenset({K.FEE}),
    K.DEPOSIT_REFUND: frozenset({K.DEPOSIT}),
    K.SUBSCRIPTION_REFUND: frozenset({K.SUBSCRIPTION}),
}
NEEDS_ORIGINAL = HOLD_ACTIONS | REFUND_OF.keys() | {K.VOID, K.REVERSAL}
#: Kinds that start a transaction without naming an original (hold, purchase, fee...): the common case,
#: which `Book.apply` handles first and without the general dispatch.
PLAIN_STARTING_KINDS = STARTING_KINDS - NEEDS_ORIGINAL

#: Rounds of family expansion when loading (sale -> refund -> refund reversal is 3).
MAX_FAMILY_ROUNDS = 8


class LedgerRejected(ValueError):
    """A draft that breaks a money rule; only that draft's submission is refused."""


class OriginalNotFound(LedgerRejected):
    pass


class HoldAlreadyResolved(LedgerRejected):
    pass


class RefundExceedsOriginal(LedgerRejected):
    pass


class DuplicateTransaction(LedgerRejected):
    pass


class RuleViolation(LedgerRejected):
    pass


class LedgerCorrupt(RuntimeError):
    """Stored entries break a rule the writer enforces: the log was altered or a bug let it through."""


class Txn:
    """One transaction started by an entry: what is left of it and what closed it."""

    __slots__ = ("amount_minor", "captured_by", "closed", "currency", "kind", "parent", "refunded_minor",
                 "rrn", "seq")  # fmt: skip

    def __init__(self, seq: int, kind: EntryKind, rrn: str, amount_minor: int, currency: str) -> None:
        self.seq = seq
        self.kind = kind
        self.rrn = rrn
        self.amount_minor = amount_minor
        self.currency = currency
        self.closed = ""  # kind of the entry that closed it, "" while open
        self.refunded_minor = 0
        self.parent: Txn | None = None  # the original a refund acts on
        self.captured_by: Txn | None = None  # the capture of a hold

    @property
    def remainder_minor(self) -> int:
        return 0 if self.closed else self.amount_minor - self.refunded_minor


class Book:
    """Transactions by rrn; `apply` enforces the rules. `begin`/`rollback` undo a submission."""

    def __init__(self) -> None:
        self.by_rrn: dict[str, list[Txn]] = {}
        self._undo: list[Callable[[], None]] | None = None

    # --- undo journal ----------------------------------------------------------------------------
    def begin(self) -> None:
        self._undo = []

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        undo, self._undo = self._undo or [], None
        for fn in reversed(undo):
            fn()

    def _set(self, txn: Txn, attr: str, value: object) -> None:
        if self._undo is not None:
            old = getattr(txn, attr)
            self._undo.append(lambda: setattr(txn, attr, old))
        setattr(txn, attr, value)

    def _add(self, txn: Txn) -> None:
        lst = self.by_rrn.setdefault(txn.rrn, [])
        lst.append(txn)
        if self._undo is not None:
            self._undo.append(lst.pop)

    # --- lookups ---------------------------------------------------------------------------------
    def find(self, rrn: str, kinds: frozenset[EntryKind], follow_capture: bool = False) -> Txn | None:
        txns = self.by_rrn.get(rrn, ())
        for t in reversed(txns):
            if t.kind in kinds:
                return t
        if follow_capture:
            for t in reversed(txns):
                if t.kind is K.HOLD and t.captured_by is not None:
                    return t.captured_by
        return None

    def refundable_minor(self, rrn: str) -> int:
        sale = self.find(rrn, SALE_KINDS, follow_capture=True)
        if sale is None:
            raise OriginalNotFound(f"no sale with rrn {rrn!r}")
        return sale.remainder_minor

    def open_holds(self) -> list[Txn]:
        return [t for ts in self.by_rrn.values() for t in ts if t.kind is K.HOLD and not t.closed]

    def check(self) -> None:
        """Assert the invariants over everything loaded."""
        for ts in self.by_rrn.values():
            for t in ts:
                if not 0 <= t.refunded_minor <= t.amount_minor:
                    raise LedgerCorrupt(
                        f"{t.kind} rrn {t.rrn!r} (seq {t.seq}): "
                        f"refunded {t.refunded_minor} of {t.amount_minor}"
                    )

    # --- the rules -------------------------------------------------------------------------------
    def apply(
        self, seq: int, kind: EntryKind, rrn: str, original_rrn: str, amount: int, currency: str
    ) -> None:
        """Apply one entry, or raise LedgerRejected having changed NOTHING: every check comes before
        the first change (the writer accepts one-draft submissions without an undo journal on this;
        tests/ledger/test_rules_atomic.py holds it)."""
        if kind in PLAIN_STARTING_KINDS:  # the general path below, for these kinds only
            if amount <= 0:
                raise RuleViolation(f"a {kind} entry needs a positive amount")
            txns = self.by_rrn.get(rrn)
            if txns is None:
                txns = self.by_rrn[rrn] = []
            elif any(t.kind is kind for t in txns):
                raise DuplicateTransaction(f"rrn {rrn!r} already has a {kind} entry")
            txns.append(Txn(seq, kind, rrn, amount, currency))
            if self._undo is not None:
                self._undo.append(txns.pop)
            return
        if kind not in STARTING_KINDS and kind not in NEEDS_ORIGINAL:
            return
        if kind in NEEDS_ORIGINAL and not original_rrn:
            raise RuleViolation(f"a {kind} entry must name its original_rrn")
        if kind in STARTING_KINDS:
            if amount <= 0:
                raise RuleViolation(f"a {kind} entry needs a positive amount")
            if any(t.kind is kind for t in self.by_rrn.get(rrn, ())):
                raise DuplicateTransaction(f"rrn {rrn!r} already has a {kind} entry")
        if kind in HOLD_ACTIONS:
            hold = self.find(original_rrn, frozenset({K.HOLD}))
            if hold is None:
                raise OriginalNotFound(f"{kind}: no hold with rrn {original_rrn!r}")
            if hold.closed:
                raise HoldAlreadyResolved(f"{kind}: hold {original_rrn!r} already resolved by {hold.closed}")
            _same_currency(kind, hold, currency)
            if kind is K.CAPTURE:
                if not 0 < amount <= hold.amount_minor:
                    raise RuleViolation(
                        f"capture of {amount} outside 1..{hold.amount_minor} of hold {original_rrn!r}"
                    )
            elif amount != hold.amount_minor:
                raise RuleViolation(f"{kind} amount {amount} != hold amount {hold.amount_minor}")
            self._set(hold, "closed", str(kind))
            if kind is K.CAPTURE:
                sale = Txn(seq, kind, rrn, amount, currency)
                self._add(sale)
                self._set(hold, "captured_by", sale)
        elif kind is K.VOID:
            sale = self.find(original_rrn, SALE_KINDS, follow_capture=True)
            if sale is None:
                raise OriginalNotFound(f"void: no sale with rrn {original_rrn!r}")
            if sale.closed:
                raise RuleViolation(f"void: {sale.kind} {original_rrn!r} already closed by {sale.closed}")
            if sale.refunded_minor:
                raise RuleViolation(f"void: {sale.kind} {original_rrn!r} has refunds")
            _same_currency(kind, sale, currency)
            if amount != sale.amount_minor:
                raise RuleViolation(f"void amount {amount} != {sale.kind} amount {sale.amount_minor}")
            self._set(sale, "closed", str(kind))
        elif kind in REFUND_OF:
            parent = self.find(original_rrn, REFUND_OF[kind], follow_capture=kind is K.REFUND)
            if parent is None:
                raise OriginalNotFound(f"{kind}: no original with rrn {original_rrn!r}")
            if parent.closed:
                raise RuleViolation(
                    f"{kind}: {parent.kind} {original_rrn!r} already closed by {parent.closed}"
                )
            _same_currency(kind, parent, currency)
            left = parent.amount_minor - parent.refunded_minor
            if amount > left:
                raise RefundExceedsOriginal(
                    f"{kind} of {amount} exceeds what is left of {parent.kind} {original_rrn!r} ({left})"
                )
            self._set(parent, "refunded_minor", parent.refunded_minor + amount)
            refund = Txn(seq, kind, rrn, amount, currency)
            refund.parent = parent
            self._add(refund)
        elif kind is K.REVERSAL:
            txns = self.by_rrn.get(original_rrn, ())
            target = next((t for t in reversed(txns) if not t.closed), None)
            if target is None:
                if not txns:
                    raise OriginalNotFound(f"reversal: nothing with rrn {original_rrn!r}")
                last = txns[-1]
                error = HoldAlreadyResolved if last.kind is K.HOLD else RuleViolation
                raise error(f"reversal: {last.kind} {original_rrn!r} already closed by {last.closed}")
            _same_currency(kind, target, currency)
            left = target.amount_minor - target.refunded_minor
            if amount != left or left <= 0:
                raise RuleViolation(f"reversal amount {amount} != what is left of {target.kind} ({left})")
            self._set(target, "closed", str(kind))
            if target.parent is not None:
                self._set(target.parent, "refunded_minor", target.parent.refunded_minor - target.amount_minor)
        else:  # a plain starting kind
            self._add(Txn(seq, kind, rrn, amount, currency))

    def replay(self, rows: Iterable[TxnRow]) -> None:
        """Fold stored entries (in seq order); a stored entry that breaks a rule is corruption."""
        for r in rows:
            try:
                self.apply(r.seq, EntryKind(r.kind), r.rrn, r.original_rrn, r.amount_minor, r.currency)
            except LedgerRejected as exc:
                raise LedgerCorrupt(f"stored entry {r.seq} breaks a ledger rule: {exc}") from None


def _same_currency(kind: EntryKind, original: Txn, currency: str) -> None:
    if currency != original.currency:
        raise RuleViolation(f"{kind} currency {currency!r} != original currency {original.currency!r}")


def family_rows(txn_rows: Callable[[Iterable[str]], list[TxnRow]], rrns: Iterable[str]) -> list[TxnRow]:
    """All stored entries of the transaction families touching `rrns` (by rrn or original_rrn, followed
    transitively: hold -> capture -> refund -> reversal), in seq order."""
    loaded: set[str] = set()
    todo = {r for r in rrns if r}
    rows: dict[int, TxnRow] = {}
    for _ in range(MAX_FAMILY_ROUNDS):
        if not todo:
            break
        loaded |= todo
        for row in txn_rows(todo):
            rows[row.seq] = row
        todo = {x for row in rows.values() for x in (row.rrn, row.original_rrn) if x and x not in loaded}
    else:
        if todo:
            raise LedgerCorrupt(f"transaction family deeper than {MAX_FAMILY_ROUNDS} links")
    return [rows[s] for s in sorted(rows)]
