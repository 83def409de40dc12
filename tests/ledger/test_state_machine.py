"""A hypothesis state machine posts holds, captures, voids, refunds and reversals -- with idempotent
retries, conflicting reuse of keys and whole batches of submissions -- against a simple in-memory model.
After every step balances (now and as of earlier seqs), refundable remainders and idempotency agree."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from switch.config import LedgerConfig
from switch.ledger.model import EntryDraft, EntryKind, IdempotencyConflict, Side
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import LedgerRejected
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter

from .conftest import TEST_SEED, LedgerDb
from .drafts import CUR, draft

K = EntryKind
AMOUNTS = st.integers(1, 500)
#: Examples per backend: every step is a durable commit, and a server round trip costs more.
EXAMPLES = {"sqlite": 40, "postgres": 10}


@dataclass
class Txn:
    kind: EntryKind
    amount: int
    closed: bool = False
    refunded: int = 0
    parent: str = ""  # for refunds: the sale's rrn
    capture: str = ""  # for holds: the capture's rrn


@dataclass
class Model:
    """What a ledger should do, written plainly: one dict of transactions by rrn."""

    txns: dict[str, Txn] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)

    def accepts(self, d: EntryDraft) -> bool:
        t = self.txns.get(d.original_rrn)
        a = d.amount_minor
        if d.kind in (K.HOLD, K.PURCHASE):
            return d.rrn not in self.txns
        if d.kind is K.CAPTURE:
            return t is not None and t.kind is K.HOLD and not t.closed and 0 < a <= t.amount
        if d.kind is K.HOLD_VOID:
            return t is not None and t.kind is K.HOLD and not t.closed and a == t.amount
        if t is not None and t.kind is K.HOLD and t.capture and d.kind is not K.REVERSAL:
            t = self.txns[t.capture]  # a refund or void naming a captured hold acts on its capture
        sale = t is not None and t.kind in (K.PURCHASE, K.CAPTURE)
        if d.kind is K.VOID:
            return sale and not t.closed and t.refunded == 0 and a == t.amount  # type: ignore[union-attr]
        if d.kind is K.REFUND:
            return sale and not t.closed and a <= t.amount - t.refunded  # type: ignore[union-attr]
        if d.kind is K.REVERSAL:
            return t is not None and not t.closed and a == t.amount - t.refunded
        raise AssertionError(d.kind)

    def apply(self, d: EntryDraft) -> None:
        t = self.txns.get(d.original_rrn)
        if t is not None and t.kind is K.HOLD and t.capture and d.kind in (K.VOID, K.REFUND):
            t = self.txns[t.capture]
        if d.kind in (K.HOLD, K.PURCHASE):
            self.txns[d.rrn] = Txn(d.kind, d.amount_minor)
        elif d.kind is K.CAPTURE:
            t.closed, t.capture = True, d.rrn  # type: ignore[union-attr]
            self.txns[d.rrn] = Txn(K.CAPTURE, d.amount_minor)
        elif d.kind in (K.HOLD_VOID, K.VOID, K.REVERSAL):
            t.closed = True  # type: ignore[union-attr]
            if t.kind is K.REFUND:  # type: ignore[union-attr]
                self.txns[t.parent].refunded -= t.amount  # type: ignore[union-attr]
        elif d.kind is K.REFUND:
            t.refunded += d.amount_minor  # type: ignore[union-attr]
            self.txns[d.rrn] = Txn(K.REFUND, d.amount_minor, parent=d.original_rrn if t is self.txns.get(
                d.original_rrn) else self.txns[d.original_rrn].capture)  # type: ignore[union-attr]  # fmt: skip
        for p in d.postings:
            self.balances[p.account] = self.balances.get(p.account, 0) + (
                p.amount_minor if p.side is Side.DEBIT else -p.amount_minor
            )

    def remainder(self, rrn: str) -> int:
        t = self.txns[rrn]
        if t.kind is K.HOLD:
            t = self.txns[t.capture]
        return 0 if t.closed else t.amount - t.refunded


class LedgerMachine(RuleBasedStateMachine):
    db_factory: Any = None  # set per backend by the test function

    def __init__(self) -> None:
        super().__init__()
        self.db: LedgerDb = type(self).db_factory()
        self.key = Ed25519PrivateKey.from_private_bytes(TEST_SEED)
        self.cfg = LedgerConfig(batch_window_ms=0, checkpoint_every_entries=7)
        self.writer = LedgerWriter(self.db.open(), signing_key=self.key, config=self.cfg)
        self.reader = LedgerReader(self.db.open())
        self.model = Model()
        self.n = 0
        self.posted: dict[str, tuple[EntryDraft, int]] = {}  # key -> (draft, seq)
        self.history: list[tuple[int, dict[str, int]]] = []  # (last seq, balances after it)

    def teardown(self) -> None:
        self.writer.close()
        self.reader.close()

    # --- helpers -----------------------------------------------------------------------------------
    def _rrns(self, *kinds: EntryKind) -> list[str]:
        return sorted(r for r, t in self.model.txns.items() if t.kind in kinds)

    def _new(self, kind: EntryKind, amount: int, original: str = "") -> EntryDraft:
        self.n += 1
        return draft(f"key{self.n}", kind, f"RRN{self.n:06d}", amount, original, at_ms=1_000 + self.n)

    def _post(self, d: EntryDraft) -> None:
        expected = self.model.accepts(d)
        try:
            (entry,) = self.writer.append([d])
        except LedgerRejected:
            assert not expected, f"ledger refused {d.kind} {d.amount_minor} the model accepts"
            return
        assert expected, f"ledger accepted {d.kind} {d.amount_minor} the model refuses"
        self.model.apply(d)
        self.posted[d.idempotency_key] = (d, entry.seq)
        self.history.append((entry.seq, dict(self.model.balances)))

    def _pick(self, data: st.DataObject, rrns: list[str]) -> str:
        return data.draw(st.sampled_from(rrns)) if rrns else "NO-SUCH-RRN"

    # --- rules -------------------------------------------------------------------------------------
    @rule(amount=AMOUNTS)
    def hold(self, amount: int) -> None:
        self._post(self._new(K.HOLD, amount))

    @rule(amount=AMOUNTS)
    def purchase(self, amount: int) -> None:
        self._post(self._new(K.PURCHASE, amount))

    def _amount_near(self, data: st.DataObject, limit: int) -> int:
        """Edge amounts most of the time: the limit, one above it, one below it; else anything."""
        return data.draw(st.sampled_from([limit, limit + 1, max(1, limit - 1)]) | AMOUNTS)

    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        rrn = self._pick(data, self._rrns(K.HOLD))
        t = self.model.txns.get(rrn)
        self._post(self._new(K.CAPTURE, self._amount_near(data, t.amount if t else 1), rrn))

    @rule(data=st.data())
    def void_hold(self, data: st.DataObject) -> None:
        rrn = self._pick(data, self._rrns(K.HOLD))
        amount = self.model.txns[rrn].amount if rrn in self.model.txns else 1
        self._post(self._new(K.HOLD_VOID, amount, rrn))

    @rule(data=st.data(), exact=st.booleans())
    def void_sale(self, data: st.DataObject, exact: bool) -> None:
        rrn = self._pick(data, self._rrns(K.PURCHASE, K.CAPTURE))
        amount = self.model.txns[rrn].amount if rrn in self.model.txns else 1
        self._post(self._new(K.VOID, amount if exact else amount + 1, rrn))

    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        rrn = self._pick(data, self._rrns(K.PURCHASE, K.CAPTURE, K.HOLD))
        left = self.model.remainder(rrn) if rrn in self.model.txns and self._refundable(rrn) else 1
        self._post(self._new(K.REFUND, self._amount_near(data, max(left, 1)), rrn))

    def _refundable(self, rrn: str) -> bool:
        t = self.model.txns[rrn]
        return t.kind is not K.HOLD or bool(t.capture)

    @rule(data=st.data())
    def reversal(self, data: st.DataObject) -> None:
        rrn = self._pick(data, sorted(self.model.txns))
        t = self.model.txns.get(rrn)
        amount = max(1, t.amount - t.refunded) if t else 1
        self._post(self._new(K.REVERSAL, amount, rrn))

    @precondition(lambda self: self.posted)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.posted)))
        d, seq = self.posted[key]
        assert [e.seq for e in self.writer.append([d])] == [seq]

    @precondition(lambda self: self.posted)
    @rule(data=st.data())
    def reuse_key_with_other_payload(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.posted)))
        d, _ = self.posted[key]
        other = draft(key, d.kind, d.rrn, d.amount_minor + 1, d.original_rrn, at_ms=d.at_ms)
        size = self.writer.size
        with pytest.raises(IdempotencyConflict):
            self.writer.append([other])
        assert self.writer.size == size

    @rule(data=st.data(), n=st.integers(2, 6))
    def batch(self, data: st.DataObject, n: int) -> None:
        """Several submissions in one group commit: each is judged on its own, in order."""
        subs: list[EntryDraft] = []
        for _ in range(n):
            kind = data.draw(st.sampled_from([K.PURCHASE, K.REFUND, K.CAPTURE, K.HOLD]))
            targets = {K.REFUND: self._rrns(K.PURCHASE, K.CAPTURE), K.CAPTURE: self._rrns(K.HOLD)}.get(kind)
            subs.append(
                self._new(kind, data.draw(AMOUNTS), self._pick(data, targets) if targets is not None else "")
            )
        results: dict[int, tuple[Any, Any]] = {}
        done = threading.Semaphore(0)
        for i, d in enumerate(subs):
            self.writer.submit([d], lambda e, err, i=i: (results.__setitem__(i, (e, err)), done.release()))
        for _ in subs:
            assert done.acquire(timeout=30)
        for i, d in enumerate(subs):
            entries, error = results[i]
            expected = self.model.accepts(d)
            assert (error is None) == expected, (d.kind, d.amount_minor, error)
            if error is None:
                self.model.apply(d)
                self.posted[d.idempotency_key] = (d, entries[0].seq)
                self.history.append((entries[0].seq, dict(self.model.balances)))
            else:
                assert isinstance(error, LedgerRejected)

    @rule()
    def restart(self) -> None:
        self.writer.close()
        self.writer = LedgerWriter(self.db.open(), signing_key=self.key, config=self.cfg)

    # --- invariants ---------------------------------------------------------------------------------
    @invariant()
    def balances_agree(self) -> None:
        for account, balance in self.model.balances.items():
            assert self.reader.balance(account, CUR) == balance, account
        if self.history:
            seq, then = self.history[len(self.history) // 2]
            for account, balance in then.items():
                assert self.reader.balance(account, CUR, through_seq=seq) == balance

    @invariant()
    def remainders_agree(self) -> None:
        for rrn, t in self.model.txns.items():
            if t.kind in (K.PURCHASE, K.CAPTURE) or (t.kind is K.HOLD and t.capture):
                assert self.reader.refundable_remainder(rrn) == self.model.remainder(rrn), rrn

    @invariant()
    def open_holds_agree(self) -> None:
        got = {h.rrn for h in self.reader.open_holds()}
        assert got == {r for r, t in self.model.txns.items() if t.kind is K.HOLD and not t.closed}


def test_ledger_agrees_with_the_model(ledger_backend: LedgerDb) -> None:
    made: list[LedgerDb] = []

    def fresh_db() -> LedgerDb:
        # one database per hypothesis example: a copy of the empty ledger is a fresh one
        made.append(ledger_backend.tampered_copy([]))
        return made[-1]

    ledger_backend.open().close()  # create the empty schema once
    LedgerMachine.db_factory = staticmethod(fresh_db)
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=EXAMPLES.get(ledger_backend.name, 10), stateful_step_count=30, deadline=None
        ),
    )
    # the last example's ledger verifies end to end: hashes, tree heads, checkpoints, balances, rules
    backend = made[-1].open()
    try:
        report = verify_ledger(backend, Ed25519PrivateKey.from_private_bytes(TEST_SEED).public_key())
        assert report.ok, report.problem
    finally:
        backend.close()
