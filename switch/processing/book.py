"""The core's memory: transactions by RRN and by terminal key, open holds, and per-terminal batch
totals, all derived from durable ledger entries by one function, `Book.apply`.

Why one fold: the live path (LedgerCommitted), the restart path (Recovered) and the cold path (an
original fetched from the ledger, OriginalFound) must agree on what a transaction's state is; if they
shared no code they would drift. Memory is bounded (ProcessingConfig.max_remembered_keys and
max_cached_originals): the oldest finished records are forgotten first and fetched from the ledger again
when a later void, refund or reversal names them. Forgotten terminal keys are still protected by the
ledger's idempotency keys (a reused key fails with a conflict and the terminal hears 94).

What is kept of a finished transaction is a `Done` (switch.processing.record): about 850 bytes with its
strings and map slots instead of ~2,400 for the live `Txn` it was, and not tracked by the cyclic GC, so
the switch's full collection (switch.server.gcpolicy) does not walk the up to a million kept
(bench/memory.py). `retire` swaps it in when the terminal has been answered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import msgspec

from switch.ledger.model import EntryDraft, EntryKind
from switch.processing import codes
from switch.processing.record import (
    FEE_SUFFIX,
    Done,
    Hold,
    Record,
    Stage,
    Status,
    Txn,
    done,
    key_role,
    key_terminal_key,
    parse_memo,
)
from switch.processing.request import Flow

__all__ = ["FEE_SUFFIX", "Book", "Line", "Totals"]

DEBIT_FLOWS = frozenset({Flow.PURCHASE, Flow.COMPLETION})
_intern = sys.intern

_KIND_FLOW = {
    EntryKind.PURCHASE: Flow.PURCHASE,
    EntryKind.STAND_IN: Flow.PURCHASE,
    EntryKind.HOLD: Flow.PREAUTH,
    EntryKind.CAPTURE: Flow.COMPLETION,
    EntryKind.VOID: Flow.VOID,
    EntryKind.REFUND: Flow.REFUND,
    EntryKind.SETTLEMENT: Flow.SETTLEMENT,
}


class Line(msgspec.Struct):
    count: int = 0
    amount_minor: int = 0

    def add(self, amount_minor: int) -> None:
        self.count += 1
        self.amount_minor += amount_minor


class Totals(msgspec.Struct):
    """One terminal's open batch in one currency, as the ledger shows it (docs/flows.md, 0500)."""

    debits: Line = msgspec.field(default_factory=Line)
    debit_reversals: Line = msgspec.field(default_factory=Line)
    credits: Line = msgspec.field(default_factory=Line)
    credit_reversals: Line = msgspec.field(default_factory=Line)


class Book:
    def __init__(self, max_keys: int, max_originals: int) -> None:
        self.max_keys = max_keys
        self.max_originals = max_originals
        #: live transactions (`Txn`) and finished ones (`Done`, see `retire`)
        self.by_key: dict[str, Record] = {}
        self.by_rrn: dict[str, Record] = {}
        self.open_holds: dict[str, Record] = {}
        #: terminal id -> currency -> totals of the open batch
        self.totals: dict[str, dict[str, Totals]] = {}
        #: when each terminal's open batch began (balanced 0500), and when the business day began
        self.batch_start_ms: dict[str, int] = {}
        self.day_start_ms = 0

    # --- indexes -----------------------------------------------------------------------------------
    def remember_key(self, key: str, txn: Record) -> None:
        self.by_key[key] = txn
        if len(self.by_key) > self.max_keys:
            oldest = next(iter(self.by_key))
            if self.by_key[oldest].stage is Stage.DONE:
                del self.by_key[oldest]

    def remember_rrn(self, txn: Record) -> None:
        self.by_rrn[txn.rrn] = txn
        if len(self.by_rrn) > self.max_originals:
            oldest = next(iter(self.by_rrn))
            if self.by_rrn[oldest].stage is Stage.DONE:
                del self.by_rrn[oldest]

    def find_rrn(self, rrn: str) -> Record | None:
        return self.by_rrn.get(rrn) or self.open_holds.get(rrn)

    def retire(self, txn: Txn) -> Done | None:
        """`txn` was answered: keep its compact `Done` record wherever the book holds it (None: it held
        it nowhere). Live transactions acting on an original hold originals already done (voids,
        refunds and completions need a durable outcome; a reversal of an original still waiting is
        answered in the same step); the processor re-points any other (`Txn.is_original`)."""
        rrn, key = txn.rrn, txn.key
        in_rrn = bool(rrn) and self.by_rrn.get(rrn) is txn
        in_key = bool(key) and self.by_key.get(key) is txn
        in_holds = bool(rrn) and self.open_holds.get(rrn) is txn
        if not (in_rrn or in_key or in_holds):
            return None
        rec = done(txn)
        if in_rrn:
            self.by_rrn[rrn] = rec  # an existing key keeps its place in the eviction order
        if in_key:
            self.by_key[key] = rec
        if in_holds:
            self.open_holds[rrn] = rec
        return rec

    def _record(self, rrn: str) -> Record:
        txn = self.find_rrn(rrn)
        if txn is None:
            txn = Done(flow=Flow.PURCHASE, rrn=rrn)
            self.remember_rrn(txn)
        return txn

    def terminal_totals(self, terminal_id: str, currency: str) -> Totals:
        per = self.totals.setdefault(terminal_id, {})
        t = per.get(currency)
        if t is None:
            t = per[currency] = Totals()
        return t

    def close_batch(self, terminal_id: str | None, at_ms: int) -> None:
        """Balanced settlement of one terminal, or the daily cutover (None: every terminal)."""
        if terminal_id is None:
            self.totals.clear()
            self.batch_start_ms.clear()
            self.day_start_ms = max(self.day_start_ms, at_ms)
        else:
            self.totals.pop(terminal_id, None)
            self.batch_start_ms[terminal_id] = at_ms

    def batch_start(self, terminal_id: str) -> int:
        """Transactions before this time are settled: no void may touch them."""
        return max(self.day_start_ms, self.batch_start_ms.get(terminal_id, 0))

    # --- the fold ----------------------------------------------------------------------------------
    def apply_all(self, drafts: Iterable[EntryDraft], count_totals: bool) -> None:
        for d in drafts:
            self.apply(d, count_totals)

    def apply(self, d: EntryDraft, count_totals: bool) -> None:
        """Move the book by one durable entry. `count_totals` is False for entries fetched from the
        ledger on demand (they were counted, or belong to a closed batch)."""
        kind = d.kind
        if (
            kind is EntryKind.FEE
            or kind is EntryKind.FEE_REFUND
            or (kind is EntryKind.REVERSAL and d.original_rrn.endswith(FEE_SUFFIX))
        ):
            self._fee(d)
            return
        role = key_role(d.idempotency_key)
        if role == "out":
            self._outcome(d, count_totals)
        elif role == "rev":
            self._reversal(d, count_totals)
        elif role == "late":
            self._record(d.rrn).late_approved = True
        elif role == "expiry":
            txn = self._record(d.rrn)
            txn.hold = Hold.EXPIRED
            txn.busy = False
            self.open_holds.pop(d.rrn, None)

    def _fee(self, d: EntryDraft) -> None:
        """Merchant fee entries (switch.merchant.drafts): FEE `<sale>/fee` naming the sale, FEE_REFUND
        `<refund>/fee` naming `<sale>/fee`, and REVERSALs of either. They never count in terminal
        totals; they only tell later refunds and reversals what is left of the fee."""
        if d.kind is EntryKind.FEE:
            sale = self.find_rrn(d.original_rrn)
            if sale is not None:
                sale.fee = d
                sale.fee_closed = False
            return
        if d.kind is EntryKind.FEE_REFUND:
            refund = self.find_rrn(d.rrn.removesuffix(FEE_SUFFIX))
            if refund is not None:
                refund.fee_back_minor = d.amount_minor
            sale = self.find_rrn(d.original_rrn.removesuffix(FEE_SUFFIX))
            if sale is not None:
                sale.fee_returned_minor += d.amount_minor
            return
        target = self.find_rrn(d.original_rrn.removesuffix(FEE_SUFFIX))  # a REVERSAL of a fee entry
        if target is None:
            return
        if target.flow is Flow.REFUND:  # the refund's fee return is undone: the fee is owed again
            target.fee_back_minor = 0
            sale = self.find_rrn(target.original_rrn) if target.original_rrn else None
            if sale is not None:
                sale.fee_returned_minor -= d.amount_minor
        else:
            target.fee_closed = True

    def _outcome(self, d: EntryDraft, count_totals: bool) -> None:
        if d.kind is EntryKind.SETTLEMENT:
            if count_totals:
                self.close_batch(d.terminal_id, d.at_ms)
            return
        txn = self._record(d.rrn)
        if isinstance(txn, Done) and not txn.key:  # a record rebuilt from the ledger (`_record`)
            memo = parse_memo(d.memo)
            txn.flow = Flow(memo["flow"]) if "flow" in memo else _KIND_FLOW.get(d.kind, Flow.PURCHASE)
            txn.key = key_terminal_key(d.idempotency_key)
            txn.terminal_id, txn.merchant_id = _intern(d.terminal_id), _intern(d.merchant_id)
            txn.at_ms, txn.amount_minor, txn.currency = d.at_ms, d.amount_minor, _intern(d.currency)
            txn.original_rrn = d.original_rrn
            txn.repack(  # one string built, not four
                pan_masked=d.pan_masked,
                pan_hash=d.pan_hash,
                auth_code=memo.get("auth", ""),
                acq_stan=memo.get("stan", ""),
            )
            txn.acquirer = _intern(memo.get("acq", ""))
            txn.acq_datetime = _intern(memo.get("dt", ""))  # one per second: shared by many
            txn.processing_code = _intern(memo.get("pc", ""))
            txn.stand_in = memo.get("si") == "1"
            txn.reversal_queued = memo.get("rq") == "1"
            if txn.key:
                self.remember_key(txn.key, txn)
        txn.response_code = _intern(d.response_code)
        if d.kind is EntryKind.DECLINE:
            txn.status = Status.TIMED_OUT if d.response_code == codes.TIMEOUT else Status.DECLINED
            return
        txn.status = Status.APPROVED
        kind = d.kind
        if kind is EntryKind.HOLD:
            txn.hold = Hold.OPEN
            self.open_holds[txn.rrn] = txn
            return
        original = self.find_rrn(d.original_rrn) if d.original_rrn else None
        if kind is EntryKind.VOID and original is not None:
            original.status = Status.VOIDED
            original.busy = False
        elif kind is EntryKind.REFUND and original is not None:
            original.refunded_minor += d.amount_minor
        elif kind is EntryKind.CAPTURE and original is not None:
            original.hold = Hold.CAPTURED
            original.busy = False
            self.open_holds.pop(original.rrn, None)
        if count_totals:
            t = self.terminal_totals(d.terminal_id, d.currency)
            if kind in (EntryKind.PURCHASE, EntryKind.CAPTURE, EntryKind.STAND_IN):
                t.debits.add(d.amount_minor)
            elif kind is EntryKind.VOID:
                t.debit_reversals.add(d.amount_minor)
            elif kind is EntryKind.REFUND:
                t.credits.add(d.amount_minor)

    def _reversal(self, d: EntryDraft, count_totals: bool) -> None:
        target = self._record(d.original_rrn or d.rrn)
        target.busy = False
        if d.kind is EntryKind.HOLD_VOID:
            target.hold = Hold.VOIDED
            target.status = Status.REVERSED
            self.open_holds.pop(target.rrn, None)
            return
        visible = codes.is_approval(target.response_code) and target.status is Status.APPROVED
        if count_totals and visible:
            t = self.terminal_totals(d.terminal_id, d.currency)
            if target.flow is Flow.REFUND:
                t.credit_reversals.add(d.amount_minor)
            else:
                t.debit_reversals.add(d.amount_minor)
        if target.flow is Flow.REFUND and target.status is Status.APPROVED and target.original_rrn:
            original = self.find_rrn(target.original_rrn)
            if original is not None:
                original.refunded_minor -= d.amount_minor
        if target.status is not Status.TIMED_OUT:
            target.status = Status.REVERSED
