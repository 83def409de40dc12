"""The transaction-processing core: events in, decisions out, no I/O (h11's shape).

    proc = Processor(config, directory=..., router=..., pan_hasher=...)
    decisions = proc.handle(Recovered(now_ms=...))          # once, before traffic
    decisions = proc.handle(TerminalRequest(conn_id, profile, fields, now_ms))
    ...                                                       # carry decisions out in order, feed results

Every flow is a short chain of the same steps: parse and validate (30, 12), identify the terminal
(03), settle duplicates (94 / replay), check the card (14, 54, 13), the rules step (issue 6 hooks),
find the original when one is named (25, maybe via FindOriginal), route (15, backup, stand-in, 91),
wait for the acquirer (deadline -> 68 and a reversal), post the outcome, and answer only once the
ledger says it is durable. docs/flows.md draws the state machine and lists the postings per flow.

Failure ownership (h11): a malformed or inconsistent request is the terminal's fault and gets a
precise code; a failure of ours (ledger down, a limit, a bug caught by `handle`) gets 96, and any
approval already given by an acquirer behind it is reversed.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

from switch.codec.masking import mask_pan, scrub_text
from switch.config import AcquirerConfig, SwitchConfig
from switch.ledger.model import EntryDraft, EntryKind, accounts
from switch.processing import codes, fields, postings
from switch.processing.book import FEE_SUFFIX, Book
from switch.processing.decisions import (
    Decision,
    FindOriginal,
    Log,
    Post,
    QueueAdvice,
    QueueReversal,
    RecordLifecycle,
    ReleaseReversal,
    Reply,
    ReserveRrns,
    SendToAcquirer,
    SettlementLine,
    SettlementReport,
    SignOn,
)
from switch.processing.events import (
    AcquirerAnswered,
    AcquirerHealth,
    AcquirerUnavailable,
    Cutover,
    DeadlinePassed,
    Event,
    LedgerCommitted,
    LedgerFailed,
    OriginalFound,
    Recovered,
    RrnsReserved,
    StoreForwardCompleted,
    TerminalRequest,
    Tick,
)
from switch.processing.ports import (
    Directory,
    NoRules,
    PanHasher,
    Router,
    RuleContext,
    Rules,
    merchant_hooks,
)
from switch.processing.record import (
    Hold,
    Record,
    Stage,
    Status,
    Txn,
    clean_memo,
    key_role,
    outcome_key,
    rrn_key,
)
from switch.processing.request import CARD_FLOWS, Decline, Flow, Request, check_card, parse, terminal_key
from switch.processing.rrn import RrnAllocator

Out = list[Decision]

#: Flows whose durable approval is a lifecycle event of the terminal (activation, first live use).
LIFECYCLE_FLOWS = frozenset(
    {Flow.PURCHASE, Flow.PREAUTH, Flow.COMPLETION, Flow.REFUND, Flow.VOID, Flow.INQUIRY}
)


#: Longest decline reason kept in a DECLINE entry's memo (`why=`, shown by the status API).
MAX_REASON_CHARS = 240


def pan_prefix(pan: str) -> str:
    """Leading PAN digits for the card type (fees): at most 11, and at least 4 digits stay hidden."""
    return pan[: min(11, max(6, len(pan) - 4))] if pan else ""


#: Settlement total fields (ISO 8583:1987): line name -> (count field, amount field).
SETTLEMENT_FIELDS = {
    "credits": ("74", "86"),
    "credit_reversals": ("75", "87"),
    "debits": ("76", "88"),
    "debit_reversals": ("77", "89"),
}


class PostPlan:
    """What to do when a Post commits or fails. `txn` is answered on either outcome when `reply`."""

    __slots__ = ("after", "drafts", "fail_code", "on_commit", "on_fail", "reply", "txn", "undo")

    def __init__(
        self,
        txn: Txn | None,
        drafts: tuple[EntryDraft, ...],
        *,
        on_commit: Out | None = None,
        on_fail: Out | None = None,
        fail_code: str | None = codes.SYSTEM_MALFUNCTION,
        reply: bool = True,
        undo: Callable[[], Out | None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.txn = txn
        self.drafts = drafts
        self.on_commit = on_commit or []
        self.on_fail = on_fail or []
        self.fail_code = fail_code  # None: keep the decided code (declines stay declines)
        self.reply = reply
        self.undo = undo  # run when the post fails; may return more decisions (built lazily)
        self.after = after  # run once the post's outcome is known (committed or failed)


class Processor:
    """The sans-I/O core. Not thread-safe: one owner feeds it events in order."""

    def __init__(
        self,
        config: SwitchConfig,
        *,
        directory: Directory,
        router: Router,
        pan_hasher: PanHasher,
        rules: Rules | None = None,
    ) -> None:
        pc = config.processing
        self.config = pc
        self.acquirers: dict[str, AcquirerConfig] = {a.name: a for a in config.acquirers}
        self.health: dict[str, bool] = dict.fromkeys(self.acquirers, True)
        self.directory = directory
        self.router = router
        self.rules: Rules = rules or NoRules()
        #: Merchant services beyond the rules step (fees, lifecycle, balances) when `rules` has them.
        self.hooks = merchant_hooks(self.rules)
        self._now_ms = 0  # the latest now_ms seen (for hooks run where the event carries none)
        self._flagged: Out = []  # flag logs of the rules step, emitted with the decline
        self._hash = pan_hasher
        self.book = Book(pc.max_remembered_keys, pc.max_cached_originals)
        self.rrns = RrnAllocator(pc.rrn_block_size, pc.rrn_low_water)
        self.live: dict[int, Txn] = {}
        self.plans: dict[int, PostPlan] = {}
        #: Counters for metrics (the server exports them; names are stable).
        self.counters: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._current: Txn | None = None  # the transaction a TerminalRequest created (for _contain)
        #: late acquirer answers waiting for FindOriginal (bounded by max_open_transactions)
        self._late_lookups: dict[int, dict[str, Any]] = {}
        self._inst = pc.institution_id
        self._handlers: dict[type, Callable[[Any, Out], None]] = {
            TerminalRequest: self._on_request,
            AcquirerAnswered: self._on_answer,
            AcquirerUnavailable: self._on_unavailable,
            DeadlinePassed: self._on_deadline,
            LedgerCommitted: self._on_committed,
            LedgerFailed: self._on_failed,
            OriginalFound: self._on_original,
            AcquirerHealth: self._on_health,
            StoreForwardCompleted: self._on_saf_completed,
            RrnsReserved: self._on_rrns,
            Cutover: self._on_cutover,
            Tick: self._on_tick,
            Recovered: self._on_recovered,
        }

    # ================================================================================================
    # public API
    # ================================================================================================
    def handle(self, event: Event) -> list[Decision]:
        """Feed one event; get the decisions to carry out, in order."""
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"not a processing event: {type(event).__name__}")
        out: Out = []
        self._current = None
        now_ms = getattr(event, "now_ms", 0)
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        try:
            handler(event, out)
            if self._flagged:
                out.extend(self._flagged)
        except Exception as exc:  # a bug must cost one transaction a 96, never the switch
            self.counters["internal_errors"] += 1
            out.append(
                Log(
                    "error",
                    "internal_error",
                    scrub_text(f"{type(event).__name__}: {type(exc).__name__}: {exc}"),
                )
            )
            self._contain(event, out)
        self._flagged.clear()
        return out

    def find(self, rrn: str) -> Record | None:
        """A transaction known in memory by RRN (status API; the ledger has the rest)."""
        return self.book.find_rrn(rrn)

    @property
    def in_flight(self) -> int:
        return len(self.live)

    # ================================================================================================
    # terminal requests
    # ================================================================================================
    def _on_request(self, ev: TerminalRequest, out: Out) -> None:
        f = ev.fields
        mti = f.get("t")
        if not (isinstance(mti, str) and len(mti) == 4 and mti.isascii() and mti.isdigit()):
            self.counters["malformed_requests"] += 1
            out.append(Log("warning", "malformed_request", "request without a valid MTI dropped"))
            return
        if mti[2] not in "024":
            self.counters["unexpected_messages"] += 1
            out.append(Log("warning", "unexpected_message", f"MTI {mti} from a terminal is not a request"))
            return
        try:
            req = parse(f)
        except Decline as d:
            self._reply_now(ev.conn_id, mti, fields.reply_base(f), d.code, d.reason, out)
            return
        if req.flow is Flow.NETWORK:
            self._network(ev, req, out)
            return
        terminal = self.directory.terminal(req.terminal_id)
        merchant = self.directory.merchant(req.merchant_id)
        if terminal is None or merchant is None or terminal.merchant_id != merchant.id:
            self._reply_now(
                ev.conn_id,
                mti,
                fields.reply_base(f),
                codes.INVALID_MERCHANT,
                "unknown terminal or merchant, or terminal not registered to the merchant",
                out,
            )
            return
        key = req.terminal_key
        prev = self.book.by_key.get(key)
        if prev is not None:
            if req.is_repeat:
                if prev.stage is not Stage.DONE:
                    prev.conn_ids.append(ev.conn_id)
                    self.counters["repeats_in_flight"] += 1
                    return
                self.counters["repeats_replayed"] += 1
                out.append(
                    Reply(
                        ev.conn_id,
                        fields.answer(
                            mti,
                            fields.reply_base(f),
                            prev.response_code,
                            prev.rrn,
                            prev.auth_code if codes.is_approval(prev.response_code) else "",
                            prev.reply_extra,
                        ),
                        prev.txn_id,
                    )
                )
                return
            self.counters["duplicates"] += 1
            self._reply_now(
                ev.conn_id, mti, fields.reply_base(f), codes.DUPLICATE, "terminal key already used", out
            )
            return
        if len(self.live) >= self.config.max_open_transactions:
            self.counters["limit_open_transactions"] += 1
            self._reply_now(
                ev.conn_id,
                mti,
                fields.reply_base(f),
                codes.SYSTEM_MALFUNCTION,
                f"max_open_transactions={self.config.max_open_transactions} reached",
                out,
            )
            return
        txn = Txn(
            txn_id=next(self._ids),
            flow=req.flow,
            key=key,
            mti=mti,
            terminal_id=req.terminal_id,
            merchant_id=req.merchant_id,
            at_ms=ev.now_ms,
            received_ms=ev.now_ms,
            amount_minor=req.amount_minor,
            currency=req.currency or merchant.currency,
            processing_code=req.processing_code,
            stage=Stage.NEW,
            conn_ids=[ev.conn_id],
            reply_base=fields.reply_base(f),
            terminal_cfg=terminal,
            merchant_cfg=merchant,
        )
        if req.flow is not Flow.REVERSAL:
            rrn = self.rrns.allocate()
            self._want_rrns(out)
            if rrn is None:
                self.counters["rrn_exhausted"] += 1
                self._reply_now(
                    ev.conn_id,
                    mti,
                    txn.reply_base,
                    codes.SYSTEM_MALFUNCTION,
                    "no RRN reserved (waiting for RrnsReserved)",
                    out,
                )
                return
            txn.rrn = rrn
            self.book.remember_rrn(txn)
        self.live[txn.txn_id] = txn
        self._current = txn
        self.book.remember_key(key, txn)
        self.counters[f"requests_{req.flow}"] += 1
        if req.pan:
            txn.pan = req.pan
            txn.pan_masked = mask_pan(req.pan)
            txn.pan_hash = self._hash(req.pan)
            txn.expiry_yymm = req.expiry_yymm
            txn.pos_fields = {k: f[k] for k in fields.POS_FIELDS if k in f}
        try:
            if req.flow is Flow.SETTLEMENT:
                self._settle(txn, f, ev.now_ms, out)
                return
            if req.flow in CARD_FLOWS:
                check_card(req, ev.now_ms, self.config.max_amount_minor)
            elif req.amount_minor > self.config.max_amount_minor:
                raise Decline(codes.INVALID_AMOUNT, "amount above the limit")
            if req.original_rrn or req.original_key:
                self._resolve_original(txn, req, f, ev.now_ms, out)
                return
            self._check_rules(txn, ev.now_ms)
            self._route(txn, f, ev.now_ms, out)
        except Decline as d:
            self._decline(txn, d.code, d.reason, out)

    def _reply_now(
        self, conn_id: int, mti: str, base: dict[str, Any], code: str, reason: str, out: Out
    ) -> None:
        """An answer that needs nothing durable: format errors, unknown terminals, duplicates."""
        self.counters[f"rejected_{code}"] += 1
        out.append(Log("info", "rejected", f"{code} {codes.MEANINGS.get(code, '')}: {reason}"))
        out.append(Reply(conn_id, fields.answer(mti, base, code)))

    def _network(self, ev: TerminalRequest, req: Request, out: Out) -> None:
        f = ev.fields
        base = {k: f[k] for k in ("7", "11", "41", "42", "70") if k in f}
        code = req.network_code
        if code == "301":
            self.counters["echoes"] += 1
            out.append(Reply(ev.conn_id, fields.answer(req.mti, base, codes.APPROVED)))
        elif code in ("001", "101"):
            terminal = self.directory.terminal(req.terminal_id) if req.terminal_id else None
            merchant = self.directory.merchant(terminal.merchant_id) if terminal is not None else None
            if (
                terminal is None
                or merchant is None
                or (req.merchant_id and terminal.merchant_id != req.merchant_id)
            ):
                self._reply_now(
                    ev.conn_id, req.mti, base, codes.INVALID_MERCHANT, "sign-on from unknown terminal", out
                )
                return
            refusal = self.rules.check(
                RuleContext(
                    flow=str(Flow.NETWORK),
                    terminal=terminal,
                    merchant=merchant,
                    amount_minor=0,
                    currency=merchant.currency,
                    processing_code="",
                    now_ms=ev.now_ms,
                )
            )
            if refusal is not None:
                self.counters["sign_ons_refused"] += 1
                self._reply_now(ev.conn_id, req.mti, base, refusal.code, f"rule: {refusal.reason}", out)
                return
            if self.hooks.sign_on(terminal.id, ev.now_ms) is not None:
                out.append(RecordLifecycle(terminal.id, "sign_on", ev.now_ms, reason="first sign-on"))
            self.counters["sign_ons"] += 1
            out.append(
                SignOn(
                    ev.conn_id,
                    terminal.id,
                    terminal.merchant_id,
                    fields.answer(req.mti, base, codes.APPROVED),
                )
            )
        elif code == "002":
            out.append(Reply(ev.conn_id, fields.answer(req.mti, base, codes.APPROVED)))
        else:
            self._reply_now(
                ev.conn_id,
                req.mti,
                base,
                codes.INVALID_TRANSACTION,
                f"network management code {code} not supported",
                out,
            )

    # ================================================================================================
    # originals
    # ================================================================================================
    def _resolve_original(
        self, txn: Txn, req: Request, f: dict[str, Any] | None, now_ms: int, out: Out
    ) -> None:
        keys: list[str] = []
        if req.original_key:
            keys.append(req.original_key)
            if req.original_guessed:
                keys.append(
                    terminal_key(
                        req.terminal_id, req.merchant_id, req.stan, req.local_date + req.local_time, "0100"
                    )
                )
        original = self.book.find_rrn(req.original_rrn) if req.original_rrn else None
        if original is None:
            for k in keys:
                hit = self.book.by_key.get(k)
                if hit is not None and hit.flow not in (Flow.REVERSAL, Flow.SETTLEMENT) and hit is not txn:
                    original = hit
                    break
        if original is not None:
            self._with_original(txn, original, f, now_ms, out)
            return
        candidates = ([req.original_rrn] if req.original_rrn else []) + [outcome_key(k) for k in keys]
        txn.candidates = candidates
        txn.stage = Stage.LOOKUP
        self._ask_ledger(txn, out)

    def _ask_ledger(self, txn: Txn, out: Out) -> None:
        c = txn.candidates[0]
        self.counters["original_lookups"] += 1
        if c.startswith("tk:"):
            out.append(FindOriginal(txn.txn_id, idempotency_key=c))
        else:
            out.append(FindOriginal(txn.txn_id, rrn=c))

    def _on_original(self, ev: OriginalFound, out: Out) -> None:
        late = self._late_lookups.pop(ev.txn_id, None)
        if late is not None:
            if ev.drafts and self.book.find_rrn(late["37"]) is None:
                self.book.apply_all(ev.drafts, count_totals=False)
            self._late(late, out, looked_up=True)
            return
        txn = self.live.get(ev.txn_id)
        if txn is None or txn.stage is not Stage.LOOKUP or not txn.candidates:
            return
        wanted = txn.candidates.pop(0)
        original: Record | None = None
        if wanted.startswith("tk:"):
            rrn = next((d.rrn for d in ev.drafts if d.idempotency_key == wanted), None)
        else:
            rrn = wanted
        if rrn is not None:
            original = self.book.find_rrn(rrn)
            if original is None and ev.drafts:
                self.book.apply_all(ev.drafts, count_totals=False)
                original = self.book.find_rrn(rrn)
            if original is not None and not original.key and original.status is Status.PENDING:
                original = None  # only acting-on entries were found, not the original's outcome
        if original is None:
            if txn.candidates:
                self._ask_ledger(txn, out)
                return
            self._refuse(txn, codes.UNKNOWN_ORIGINAL, "original not found", out)
            return
        try:
            self._with_original(txn, original, None, ev.now_ms, out)
        except Decline as d:
            self._refuse(txn, d.code, d.reason, out)

    def _with_original(
        self, txn: Txn, original: Record, f: dict[str, Any] | None, now_ms: int, out: Out
    ) -> None:
        if original.merchant_id != txn.merchant_id:
            raise Decline(codes.UNKNOWN_ORIGINAL, "original belongs to another merchant")
        txn.original = original
        txn.original_rrn = original.rrn
        if isinstance(original, Txn):  # still live (a reversal of an original awaiting its answer)
            original.is_original = True
        flow = txn.flow
        if flow is Flow.REVERSAL:
            self._reverse(txn, original, now_ms, out)
        elif flow is Flow.VOID:
            self._void(txn, original, now_ms, out)
        elif flow is Flow.REFUND:
            self._refund(txn, original, f, now_ms, out)
        elif flow is Flow.COMPLETION:
            self._complete(txn, original, now_ms, out)
        else:  # pragma: no cover - parse() only names originals for the flows above
            raise Decline(codes.INVALID_TRANSACTION, f"{flow} cannot name an original")

    def _refuse(self, txn: Txn, code: str, reason: str, out: Out) -> None:
        """Decline; reversals are answered at once (nothing to post, no RRN of their own)."""
        if txn.flow is Flow.REVERSAL:
            self.counters[f"rejected_{code}"] += 1
            out.append(
                Log("info", "rejected", f"{code} {codes.MEANINGS.get(code, '')}: {reason}", txn.txn_id)
            )
            self._finish(txn, code, out)
        else:
            self._decline(txn, code, reason, out)

    # ================================================================================================
    # rules, routing, acquirer
    # ================================================================================================
    def _check_rules(self, txn: Txn, now_ms: int, original: Record | None = None) -> None:
        closed_by = ""
        if original is not None:
            if original.status is Status.VOIDED:
                closed_by = "void"
            elif original.status is Status.REVERSED:
                closed_by = "reversal"
        ctx = RuleContext(
            flow=str(txn.flow),
            terminal=txn.terminal_cfg,
            merchant=txn.merchant_cfg,
            amount_minor=txn.amount_minor,
            currency=txn.currency,
            processing_code=txn.processing_code,
            now_ms=now_ms,
            original_rrn=original.rrn if original is not None else "",
            original_amount_minor=original.amount_minor if original is not None else 0,
            original_at_ms=original.at_ms if original is not None else 0,
            refunded_minor=original.refunded_minor if original is not None else 0,
            mcc=str(txn.pos_fields.get("18", "")),
            pan_hash=txn.pan_hash,
            pan_prefix=pan_prefix(txn.pan),
            reserve_key=outcome_key(txn.key) if txn.flow is Flow.REFUND else "",
            original_closed_by=closed_by,
        )
        refusal = self.rules.check(ctx)
        if refusal is not None:
            flag = getattr(refusal, "flag", "")
            if flag:
                # flagged for operators: counted (metrics) and logged apart from ordinary declines
                self.counters[f"rule_flag_{flag}"] += 1
                self._flagged.append(
                    Log(
                        "warning", f"flag_{flag}", f"terminal {txn.terminal_id}: {refusal.reason}", txn.txn_id
                    )
                )
            raise Decline(refusal.code, f"rule{f'[{flag}]' if flag else ''}: {refusal.reason}")

    def _route(self, txn: Txn, f: dict[str, Any] | None, now_ms: int, out: Out, preferred: str = "") -> None:
        acquirer = preferred or self.router.acquirer_for(txn.pan, txn.currency, txn.processing_code)
        if acquirer is None:
            raise Decline(codes.NO_SUCH_ISSUER, "no route for this card")
        txn.acquirer = acquirer
        self._dispatch(txn, f, now_ms, out)

    def _dispatch(self, txn: Txn, f: dict[str, Any] | None, now_ms: int, out: Out) -> None:
        primary = txn.tried[0] if txn.tried else txn.acquirer
        chain = [primary]
        cfg = self.acquirers.get(primary)
        if cfg is not None and cfg.backup:
            chain.append(cfg.backup)
        for name in chain:
            if name in txn.tried or not self.health.get(name, True):
                continue
            if name != primary:
                self.counters["routed_to_backup"] += 1
            txn.tried.append(name)
            txn.acquirer = name
            self._send(txn, name, f, now_ms, out)
            return
        txn.acquirer = primary
        floor = cfg.stand_in_floor_minor if cfg is not None else 0
        if txn.flow is Flow.PURCHASE and txn.amount_minor < floor:
            self._stand_in(txn, primary, now_ms, out)
            return
        raise Decline(codes.ISSUER_UNAVAILABLE, f"acquirer {primary} unavailable and no backup up")

    def _send(self, txn: Txn, acquirer: str, f: dict[str, Any] | None, now_ms: int, out: Out) -> None:
        txn.acq_datetime = fields.transmission_time(now_ms)
        request = (
            fields.acquirer_request(f, txn, self._inst, now_ms)
            if f is not None
            else fields.rebuilt_request(txn, self._inst, now_ms)
        )
        reversal = None if txn.flow is Flow.INQUIRY else fields.reversal(txn, self._inst, now_ms)
        cfg = self.acquirers.get(acquirer)
        timeout_ms = cfg.request_timeout_ms if cfg is not None else self.config.terminal_deadline_ms
        deadline = min(txn.received_ms + self.config.terminal_deadline_ms, now_ms + timeout_ms)
        txn.deadline_ms = deadline
        txn.stage = Stage.AWAITING
        self.counters["sent_to_acquirer"] += 1
        out.append(SendToAcquirer(txn.txn_id, acquirer, request, deadline, reversal))

    def _stand_in(self, txn: Txn, acquirer: str, now_ms: int, out: Out) -> None:
        self.counters["stand_in_approvals"] += 1
        txn.stand_in = True
        txn.response_code = codes.APPROVED
        txn.auth_code = f"SI{txn.rrn[-4:]}"
        d = postings.draft(
            txn,
            key=outcome_key(txn.key),
            kind=EntryKind.STAND_IN,
            postings=postings.sale(acquirer, txn.merchant_id, txn.amount_minor, txn.currency),
        )
        advice = fields.advice(txn, self._inst, now_ms)
        self._post(txn, (d, *self._sale_fee(txn)), out, on_commit=[QueueAdvice(acquirer, txn.rrn, advice)])

    def _on_unavailable(self, ev: AcquirerUnavailable, out: Out) -> None:
        txn = self.live.get(ev.txn_id)
        if txn is None or txn.stage is not Stage.AWAITING:
            return
        self.counters["acquirer_unavailable"] += 1
        out.append(
            Log("warning", "acquirer_unavailable", f"{txn.acquirer}: {scrub_text(ev.reason)}", txn.txn_id)
        )
        if txn.flow is not Flow.INQUIRY:
            out.append(ReleaseReversal(txn.acquirer, txn.rrn))
        try:
            self._dispatch(txn, ev.fields or None, ev.now_ms, out)
        except Decline as d:
            self._decline(txn, d.code, d.reason, out)

    def _on_health(self, ev: AcquirerHealth, out: Out) -> None:
        if self.health.get(ev.acquirer) != ev.up:
            self.health[ev.acquirer] = ev.up
            out.append(
                Log(
                    "info" if ev.up else "warning",
                    "acquirer_health",
                    f"acquirer {ev.acquirer} {'up' if ev.up else 'down'}",
                )
            )

    def _on_answer(self, ev: AcquirerAnswered, out: Out) -> None:
        txn = self.live.get(ev.txn_id)
        if txn is None or txn.stage is not Stage.AWAITING:
            if len(self._late_lookups) < self.config.max_open_transactions:
                self._late(ev.fields, out)
            else:
                self._late(ev.fields, out, looked_up=True)
            return
        a = ev.fields
        rc = a.get("39")
        if not (isinstance(rc, str) and len(rc) == 2 and rc.isascii() and rc.isalnum()):
            self.counters["malformed_answers"] += 1
            out.append(
                Log(
                    "error",
                    "malformed_answer",
                    f"acquirer {txn.acquirer} answer without a valid field 39; outcome unknown, reversing",
                    txn.txn_id,
                )
            )
            self._give_up(txn, codes.SYSTEM_MALFUNCTION, ev.now_ms, out)
            return
        txn.acq_stan = str(a.get("11", ""))
        auth = a.get("38")
        txn.auth_code = auth.strip() if isinstance(auth, str) else ""
        if "54" in a:
            txn.reply_extra = {"54": a["54"]}
        if "55" in a and codes.is_approval(rc):
            txn.reply_extra = {**txn.reply_extra, "55": a["55"]}
        acquirer = txn.acquirer
        if txn.flow is Flow.INQUIRY:
            txn.status = Status.APPROVED if codes.is_approval(rc) else Status.DECLINED
            self._finish(txn, rc, out)
            return
        if codes.is_approval(rc):
            txn.response_code = rc
            flow = txn.flow
            if flow is Flow.PURCHASE:
                kind, p = (
                    EntryKind.PURCHASE,
                    postings.sale(acquirer, txn.merchant_id, txn.amount_minor, txn.currency),
                )
            elif flow is Flow.PREAUTH:
                kind, p = (
                    EntryKind.HOLD,
                    postings.hold(acquirer, txn.merchant_id, txn.amount_minor, txn.currency),
                )
            else:  # REFUND
                kind, p = (
                    EntryKind.REFUND,
                    postings.unsale(acquirer, txn.merchant_id, txn.amount_minor, txn.currency),
                )
            d = postings.draft(txn, key=outcome_key(txn.key), kind=kind, postings=p)
            drafts: tuple[EntryDraft, ...] = (d,)
            after = None
            if flow is Flow.PURCHASE:
                drafts += self._sale_fee(txn)
            elif flow is Flow.REFUND:
                fee_back, after = self._refund_fee(txn, txn.original)
                drafts += fee_back

            def reversed_instead() -> Out:
                txn.reversal_queued = True
                self.counters["reversals_queued"] += 1
                return [QueueReversal(acquirer, txn.rrn, fields.reversal(txn, self._inst, ev.now_ms))]

            self._post(
                txn,
                drafts,
                out,
                on_commit=[ReleaseReversal(acquirer, txn.rrn)],
                undo=reversed_instead,
                after=after,
            )
            return
        if rc == codes.PARTIAL_APPROVAL:
            self.counters["partial_approvals_reversed"] += 1
            txn.reversal_queued = True
            out.append(QueueReversal(acquirer, txn.rrn, fields.reversal(txn, self._inst, ev.now_ms)))
            self._decline(txn, codes.DO_NOT_HONOUR, "partial approval not supported; reversed", out)
            return
        self._decline(txn, rc, "declined by acquirer", out, release=acquirer)

    def _on_deadline(self, ev: DeadlinePassed, out: Out) -> None:
        txn = self.live.get(ev.txn_id)
        if txn is None or txn.stage is not Stage.AWAITING:
            return
        self.counters["timeouts"] += 1
        self._give_up(txn, self.config.timeout_response_code, ev.now_ms, out)

    def _give_up(self, txn: Txn, code: str, now_ms: int, out: Out) -> None:
        """The acquirer's outcome is unknown: reverse it there, tell the terminal `code`."""
        if txn.flow is Flow.INQUIRY:
            txn.status = Status.DECLINED
            self._finish(txn, code, out)
            return
        txn.reversal_queued = True
        self.counters["reversals_queued"] += 1
        out.append(QueueReversal(txn.acquirer, txn.rrn, fields.reversal(txn, self._inst, now_ms)))
        self._decline(txn, code, "no usable answer from the acquirer; reversal queued", out)

    def _late(self, a: dict[str, Any], out: Out, looked_up: bool = False) -> None:
        """An answer after the terminal was told it timed out: never delivered; an approval is posted
        together with its reversal so the ledger shows the charge and its undoing."""
        rrn = a.get("37")
        txn = self.book.find_rrn(rrn) if isinstance(rrn, str) else None
        if txn is None and isinstance(rrn, str) and rrn and looked_up is False:
            # forgotten (cache bound or restart): the ledger knows whether it timed out
            lookup_id = next(self._ids)
            self._late_lookups[lookup_id] = a
            out.append(FindOriginal(lookup_id, rrn=rrn))
            return
        if txn is None or not (txn.reversal_queued or txn.status is Status.TIMED_OUT):
            self.counters["unmatched_answers"] += 1
            out.append(Log("warning", "unmatched_answer", "acquirer answer matching no transaction dropped"))
            return
        self.counters["late_answers"] += 1
        rc = a.get("39", "")
        if txn.late_seen or not codes.is_approval(rc):
            return
        txn.late_seen = True
        self.counters["late_approvals"] += 1
        out.append(
            Log(
                "warning",
                "late_approval",
                f"approval after the deadline for RRN {txn.rrn}; not delivered, reversal queued",
                txn.txn_id,
            )
        )
        acq, mid, amount, cur = txn.acquirer, txn.merchant_id, txn.amount_minor, txn.currency
        if txn.flow is Flow.PURCHASE:
            pair = (
                (EntryKind.PURCHASE, postings.sale(acq, mid, amount, cur)),
                (EntryKind.REVERSAL, postings.unsale(acq, mid, amount, cur)),
            )
        elif txn.flow is Flow.PREAUTH:
            pair = (
                (EntryKind.HOLD, postings.hold(acq, mid, amount, cur)),
                (EntryKind.HOLD_VOID, postings.release(acq, mid, amount, cur)),
            )
        elif txn.flow is Flow.REFUND:
            original = txn.original or self.book.find_rrn(txn.original_rrn)
            if (
                original is None
                or original.amount_minor - original.refunded_minor - original.refund_pending_minor < amount
            ):
                out.append(
                    Log(
                        "warning",
                        "late_refund_not_posted",
                        f"late refund approval {txn.rrn} exceeds the remainder; reversed only",
                    )
                )
                return
            pair = (
                (EntryKind.REFUND, postings.unsale(acq, mid, amount, cur)),
                (EntryKind.REVERSAL, postings.sale(acq, mid, amount, cur)),
            )
        else:
            return
        (k1, p1), (k2, p2) = pair
        auth = a.get("38")
        memo = txn.memo() + (f";late_auth={str(auth).replace(';', '_')}" if auth else "")
        d1 = postings.draft(
            txn, key=rrn_key(txn.rrn, "late"), kind=k1, postings=p1, response_code=rc, memo=memo
        )
        d2 = postings.draft(
            txn,
            key=rrn_key(txn.rrn, "rev"),
            kind=k2,
            postings=p2,
            response_code="00",
            original_rrn=txn.rrn,
            memo=memo,
        )
        self._post(None, (d1, d2), out)

    # ================================================================================================
    # merchant fees (issue 6): posted in the same Post as the outcome they price
    # ================================================================================================
    def _sale_fee(self, txn: Txn) -> tuple[EntryDraft, ...]:
        return self.hooks.fee_drafts(
            sale_rrn=txn.rrn,
            merchant_id=txn.merchant_id,
            terminal_id=txn.terminal_id,
            pan_prefix=pan_prefix(txn.pan),
            amount_minor=txn.amount_minor,
            currency=txn.currency,
            at_ms=txn.at_ms,
        )

    def _refund_fee(
        self, txn: Txn, original: Record | None
    ) -> tuple[tuple[EntryDraft, ...], Callable[[], None] | None]:
        """The pro-rata FEE_REFUND of an approved refund, and what to undo once it is posted or not.
        The basis counts refunds of the same sale already being posted, so two refunds committing in
        one batch return exactly what one after the other would."""
        fee = original.fee if original is not None else None
        if original is None or fee is None or original.fee_closed:
            return (), None
        amount = txn.amount_minor
        drafts = self.hooks.fee_refund_drafts(
            refund_rrn=txn.rrn,
            fee_entry=fee,
            original_amount_minor=original.amount_minor,
            refunded_before_minor=original.refunded_minor + original.refund_posting_minor,
            refund_minor=amount,
            at_ms=txn.at_ms,
            returned_before_minor=original.fee_returned_minor + original.fee_returning_minor,
        )
        back = sum(d.amount_minor for d in drafts)
        original.refund_posting_minor += amount
        original.fee_returning_minor += back

        def after() -> None:
            original.refund_posting_minor -= amount
            original.fee_returning_minor -= back

        return drafts, after

    def _fee_reversal(self, record: Record, at_ms: int, reason: str) -> tuple[EntryDraft, ...]:
        """Entries undoing the fee side of `record` when it is voided or reversed: a sale's fee (what
        refunds did not already return) or a refund's fee return."""
        if record.flow is Flow.REFUND:
            if record.fee_back_minor <= 0:
                return ()
            return self.hooks.fee_reversal_drafts(
                reversed_kind=EntryKind.FEE_REFUND,
                fee_rrn=record.rrn + FEE_SUFFIX,
                merchant_id=record.merchant_id,
                terminal_id=record.terminal_id,
                amount_minor=record.fee_back_minor,
                currency=record.currency,
                at_ms=at_ms,
                reason=reason,
            )
        fee = record.fee
        if fee is None or record.fee_closed:
            return ()
        left = fee.amount_minor - record.fee_returned_minor
        if left <= 0:
            return ()
        return self.hooks.fee_reversal_drafts(
            reversed_kind=EntryKind.FEE,
            fee_rrn=fee.rrn,
            merchant_id=fee.merchant_id,
            terminal_id=fee.terminal_id,
            amount_minor=left,
            currency=fee.currency,
            at_ms=at_ms,
            reason=reason,
        )

    # ================================================================================================
    # flows acting on an original
    # ================================================================================================
    def _void(self, txn: Txn, original: Record, now_ms: int, out: Out) -> None:
        if (
            original.flow is not Flow.PURCHASE
            or original.status is not Status.APPROVED
            or not codes.is_approval(original.response_code)
        ):
            raise Decline(codes.INVALID_TRANSACTION, f"original is {original.flow} {original.status}")
        if original.busy or original.refunded_minor or original.refund_pending_minor:
            raise Decline(codes.INVALID_TRANSACTION, "original is being acted on or partly refunded")
        if original.terminal_id != txn.terminal_id:
            raise Decline(codes.INVALID_TRANSACTION, "void from another terminal")
        if original.at_ms < self.book.batch_start(txn.terminal_id):
            raise Decline(codes.INVALID_TRANSACTION, "original already settled (after cutover or 0500)")
        if txn.currency != original.currency:
            raise Decline(codes.INVALID_TRANSACTION, "currency differs from the original's")
        if txn.amount_minor != original.amount_minor:
            raise Decline(codes.ORIGINAL_AMOUNT_INCORRECT, "void amount differs from the original's")
        self._check_rules(txn, now_ms, original)
        original.busy = True
        txn.acquirer = original.acquirer
        txn.auth_code = original.auth_code
        txn.response_code = codes.APPROVED
        d = postings.draft(
            txn,
            key=outcome_key(txn.key),
            kind=EntryKind.VOID,
            postings=postings.unsale(original.acquirer, txn.merchant_id, txn.amount_minor, txn.currency),
        )
        rev = fields.reversal(original, self._inst, now_ms)
        if txn.pan:
            rev["2"] = txn.pan

        def undo() -> None:
            original.busy = False

        self._post(
            txn,
            (d, *self._fee_reversal(original, txn.at_ms, f"void {txn.rrn}")),
            out,
            on_commit=[QueueReversal(original.acquirer, original.rrn, rev)],
            undo=undo,
        )

    def _refund(self, txn: Txn, original: Record, f: dict[str, Any] | None, now_ms: int, out: Out) -> None:
        if (
            original.flow not in (Flow.PURCHASE, Flow.COMPLETION)
            or original.status is not Status.APPROVED
            or not codes.is_approval(original.response_code)
        ):
            raise Decline(codes.INVALID_TRANSACTION, f"original is {original.flow} {original.status}")
        if original.busy:
            raise Decline(codes.INVALID_TRANSACTION, "original is being voided or reversed")
        if txn.currency != original.currency:
            raise Decline(codes.INVALID_TRANSACTION, "currency differs from the original's")
        remainder = original.amount_minor - original.refunded_minor - original.refund_pending_minor
        if txn.amount_minor > remainder:
            raise Decline(
                codes.INVALID_AMOUNT, f"refund {txn.amount_minor} above the refundable remainder {remainder}"
            )
        self._check_rules(txn, now_ms, original)
        original.refund_pending_minor += txn.amount_minor
        txn.pending_reserved = True
        self._route(txn, f, now_ms, out, preferred=original.acquirer)

    def _complete(self, txn: Txn, original: Record, now_ms: int, out: Out) -> None:
        if original.flow is not Flow.PREAUTH or original.status is not Status.APPROVED:
            raise Decline(codes.INVALID_TRANSACTION, f"original is {original.flow} {original.status}")
        if original.hold is not Hold.OPEN or original.busy:
            raise Decline(codes.INVALID_TRANSACTION, f"hold is {original.hold or 'not open'}")
        if now_ms >= original.at_ms + self.config.hold_expiry_ms:
            raise Decline(codes.INVALID_TRANSACTION, "hold expired")
        if txn.currency != original.currency:
            raise Decline(codes.INVALID_TRANSACTION, "currency differs from the hold's")
        if txn.amount_minor > original.amount_minor:
            raise Decline(codes.INVALID_AMOUNT, "completion above the authorised amount")
        self._check_rules(txn, now_ms, original)
        original.busy = True
        acq = original.acquirer
        txn.acquirer = acq
        txn.auth_code = original.auth_code
        txn.response_code = codes.APPROVED
        p = postings.release(acq, txn.merchant_id, original.amount_minor, txn.currency) + postings.sale(
            acq, txn.merchant_id, txn.amount_minor, txn.currency
        )
        d = postings.draft(txn, key=outcome_key(txn.key), kind=EntryKind.CAPTURE, postings=p)
        advice = fields.advice(txn, self._inst, now_ms, original)

        def undo() -> None:
            original.busy = False

        self._post(
            txn, (d, *self._sale_fee(txn)), out, on_commit=[QueueAdvice(acq, txn.rrn, advice)], undo=undo
        )

    def _reverse(self, txn: Txn, original: Record, now_ms: int, out: Out) -> None:
        txn.rrn = original.rrn
        if original.terminal_id != txn.terminal_id:
            raise Decline(codes.UNKNOWN_ORIGINAL, "original belongs to another terminal")
        if original.flow not in (Flow.PURCHASE, Flow.PREAUTH, Flow.REFUND, Flow.COMPLETION, Flow.VOID):
            raise Decline(codes.INVALID_TRANSACTION, f"{original.flow} cannot be reversed")
        if txn.amount_minor and txn.amount_minor != original.amount_minor:
            raise Decline(codes.ORIGINAL_AMOUNT_INCORRECT, "reversal amount differs from the original's")
        if original.stage is Stage.AWAITING and isinstance(original, Txn):
            # The terminal gave up before the acquirer answered: give up too, answer the reversal now
            # (its promise is the reversal queued in store-and-forward before this reply goes out).
            self.counters["reversals_before_answer"] += 1
            self._give_up(original, self.config.timeout_response_code, now_ms, out)
            self._finish(txn, codes.APPROVED, out)
            return
        if original.stage is not Stage.DONE or original.busy:
            raise Decline(codes.SYSTEM_MALFUNCTION, "original is still being processed; repeat the reversal")
        if original.status is not Status.APPROVED or not codes.is_approval(original.response_code):
            self.counters["reversals_idempotent"] += 1
            self._finish(txn, codes.APPROVED, out)  # nothing stands to reverse (declined, reversed...)
            return
        if original.flow is Flow.VOID:
            raise Decline(codes.INVALID_TRANSACTION, "a void cannot be reversed (its reversal is queued)")
        if original.refunded_minor or original.refund_pending_minor:
            raise Decline(codes.INVALID_TRANSACTION, "original is partly refunded")
        acq, mid, amount, cur = (
            original.acquirer,
            original.merchant_id,
            original.amount_minor,
            original.currency,
        )
        if original.flow is Flow.PREAUTH:
            if original.hold is not Hold.OPEN:
                raise Decline(codes.INVALID_TRANSACTION, f"hold is {original.hold}")
            kind, p = EntryKind.HOLD_VOID, postings.release(acq, mid, amount, cur)
        elif original.flow is Flow.REFUND:
            kind, p = EntryKind.REVERSAL, postings.sale(acq, mid, amount, cur)
        else:
            kind, p = EntryKind.REVERSAL, postings.unsale(acq, mid, amount, cur)
        original.busy = True
        d = postings.draft(
            original,
            key=rrn_key(original.rrn, "rev"),
            kind=kind,
            postings=p,
            at_ms=now_ms,
            response_code=codes.APPROVED,
            original_rrn=original.rrn,
        )
        txn.response_code = codes.APPROVED
        txn.auth_code = original.auth_code
        fee_undo = (
            self._fee_reversal(original, now_ms, f"reversal of {original.rrn}")
            if original.flow is not Flow.PREAUTH
            else ()
        )

        def undo() -> None:
            original.busy = False

        self._post(
            txn,
            (d, *fee_undo),
            out,
            undo=undo,
            on_commit=[QueueReversal(acq, original.rrn, fields.reversal(original, self._inst, now_ms))],
        )

    # ================================================================================================
    # settlement totals
    # ================================================================================================
    def _settle(self, txn: Txn, f: dict[str, Any], now_ms: int, out: Out) -> None:
        said: dict[str, tuple[int, int]] = {}
        for name, (cf, af) in SETTLEMENT_FIELDS.items():
            c, a = f.get(cf, "0") or "0", f.get(af, "0") or "0"
            if not (
                isinstance(c, str)
                and c.isascii()
                and c.isdigit()
                and len(c) <= 10
                and isinstance(a, str)
                and a.isascii()
                and a.isdigit()
                and len(a) <= 16
            ):
                self.live.pop(txn.txn_id, None)
                self._finish(txn, codes.FORMAT_ERROR, out)
                return
            said[name] = (int(c), int(a))
        per = self.book.totals.get(txn.terminal_id, {})
        ours = per.get(txn.currency)
        lines = []
        for name in SETTLEMENT_FIELDS:
            line = getattr(ours, name) if ours is not None else None
            lines.append(
                SettlementLine(
                    name,
                    said[name][0],
                    said[name][1],
                    line.count if line else 0,
                    line.amount_minor if line else 0,
                )
            )
        balanced = all(line.balanced for line in lines)
        report = SettlementReport(
            txn.terminal_id, txn.merchant_id, txn.currency, balanced, tuple(lines), now_ms
        )
        if not balanced:
            self.counters["settlements_out_of_balance"] += 1
            diffs = ", ".join(
                f"{ln.name}: terminal {ln.terminal_count}/{ln.terminal_amount_minor} ledger "
                f"{ln.ledger_count}/{ln.ledger_amount_minor}"
                for ln in lines
                if not ln.balanced
            )
            out.append(report)
            out.append(
                Log(
                    "warning", "settlement_out_of_balance", f"terminal {txn.terminal_id}: {diffs}", txn.txn_id
                )
            )
            self._finish(txn, codes.RECONCILE_ERROR, out)
            return
        self.counters["settlements_balanced"] += 1
        txn.response_code = codes.APPROVED
        memo = "flow=settlement;" + ";".join(
            f"{ln.name}={ln.ledger_count}/{ln.ledger_amount_minor}" for ln in lines
        )
        d = postings.draft(
            txn, key=outcome_key(txn.key), kind=EntryKind.SETTLEMENT, amount_minor=0, memo=memo
        )
        self._post(txn, (d,), out, on_commit=[report])

    # ================================================================================================
    # posting and answering
    # ================================================================================================
    def _decline(self, txn: Txn, code: str, reason: str, out: Out, release: str = "") -> None:
        """Record the decline durably (audit, replay after restart), then answer `code`."""
        if txn.flow is Flow.REVERSAL:
            self._refuse(txn, code, reason, out)
            return
        if txn.flow is Flow.SETTLEMENT:
            self._finish(txn, code, out)
            return
        self.counters[f"declined_{code}"] += 1
        if code != codes.TIMEOUT or not txn.reversal_queued:
            out.append(
                Log("info", "declined", f"{code} {codes.MEANINGS.get(code, '')}: {reason}", txn.txn_id)
            )
        txn.response_code = code
        memo = txn.memo() + f";why={clean_memo(reason[:MAX_REASON_CHARS])}"
        d = postings.draft(
            txn, key=outcome_key(txn.key), kind=EntryKind.DECLINE, response_code=code, memo=memo
        )
        extra = [ReleaseReversal(release, txn.rrn)] if release else []
        self._post(txn, (d,), out, on_commit=extra, on_fail=list(extra), fail_code=None)

    def _post(
        self,
        txn: Txn | None,
        drafts: tuple[EntryDraft, ...],
        out: Out,
        *,
        on_commit: Out | None = None,
        on_fail: Out | None = None,
        fail_code: str | None = codes.SYSTEM_MALFUNCTION,
        undo: Callable[[], Out | None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        plan_id = txn.txn_id if txn is not None else next(self._ids)
        self.plans[plan_id] = PostPlan(
            txn,
            drafts,
            on_commit=on_commit,
            on_fail=on_fail,
            fail_code=fail_code,
            reply=txn is not None,
            undo=undo,
            after=after,
        )
        if txn is not None:
            txn.stage = Stage.POSTING
        out.append(Post(plan_id, drafts))

    def _on_committed(self, ev: LedgerCommitted, out: Out) -> None:
        plan = self.plans.pop(ev.txn_id, None)
        if plan is None:
            return
        for d in plan.drafts:
            self.book.apply(d, count_totals=True)
        if plan.after is not None:
            plan.after()
        self.hooks.observe(plan.drafts)
        out.extend(plan.on_commit)
        if plan.txn is not None and plan.reply:
            self._finish(plan.txn, plan.txn.response_code, out)

    def _on_failed(self, ev: LedgerFailed, out: Out) -> None:
        plan = self.plans.pop(ev.txn_id, None)
        if plan is None:
            return
        self.counters["ledger_failures"] += 1
        out.append(
            Log("error", "ledger_failed", scrub_text(f"post {ev.txn_id} not written: {ev.error}"), ev.txn_id)
        )
        out.extend(plan.on_fail)
        if plan.after is not None:
            plan.after()
        if plan.undo is not None:
            more = plan.undo()
            if more:
                out.extend(more)
        txn = plan.txn
        if txn is not None and plan.reply:
            code = txn.response_code if plan.fail_code is None else plan.fail_code
            if ev.conflict and plan.fail_code is not None:
                self.counters["duplicates_found_by_ledger"] += 1
                code = codes.DUPLICATE
            if plan.fail_code is not None:
                txn.status = Status.DECLINED
                txn.auth_code = ""
            self._finish(txn, code, out)

    def _finish(self, txn: Txn, code: str, out: Out) -> None:
        """Answer every connection waiting on `txn`; the book keeps its compact record (`Done`)."""
        txn.response_code = code
        if txn.pending_reserved and txn.original is not None:
            txn.original.refund_pending_minor -= txn.amount_minor
            txn.pending_reserved = False
        if txn.flow is Flow.REFUND:
            self.hooks.release(outcome_key(txn.key))  # no-op once its entry committed
        elif txn.flow in LIFECYCLE_FLOWS and codes.is_approval(code):
            changed = self.hooks.approved(txn.terminal_id, str(txn.flow), self._now_ms)
            if changed is not None:
                out.append(
                    RecordLifecycle(
                        txn.terminal_id,
                        "approved",
                        self._now_ms,
                        str(txn.flow),
                        str(getattr(changed, "state_reason", "")),
                    )
                )
        ans = fields.answer(
            txn.mti,
            txn.reply_base,
            code,
            txn.rrn,
            txn.auth_code if codes.is_approval(code) else "",
            txn.reply_extra,
        )
        for conn_id in txn.conn_ids:
            out.append(Reply(conn_id, ans, txn.txn_id))
        self.counters[f"answered_{txn.flow}_{code}"] += 1
        txn.stage = Stage.DONE
        self.live.pop(txn.txn_id, None)
        # forget what only the live transaction needed (card data first)
        txn.pan = ""
        txn.conn_ids = []
        txn.pos_fields = {}
        txn.original = None
        txn.terminal_cfg = txn.merchant_cfg = None
        rec = self.book.retire(txn)
        if rec is not None and txn.is_original:
            for other in self.live.values():
                if other.original is txn:
                    other.original = rec

    def _contain(self, event: Event, out: Out) -> None:
        """After a bug: answer 96 and reverse whatever the acquirer may have approved."""
        txn_id = getattr(event, "txn_id", None)
        txn = self.live.get(txn_id) if isinstance(txn_id, int) else None
        if txn is None and isinstance(event, TerminalRequest) and self._current is not None:
            txn = self._current
        if txn is None and isinstance(event, TerminalRequest):
            mti = event.fields.get("t")
            if (
                not any(isinstance(d, Reply) for d in out)
                and isinstance(mti, str)
                and len(mti) == 4
                and mti.isdigit()
            ):
                out.append(
                    Reply(
                        event.conn_id,
                        fields.answer(mti, fields.reply_base(event.fields), codes.SYSTEM_MALFUNCTION),
                    )
                )
            return
        if txn is None or txn.stage is Stage.DONE:
            return
        self.plans.pop(txn.txn_id, None)
        if txn.tried and txn.flow is not Flow.INQUIRY and txn.rrn:
            out.append(
                QueueReversal(txn.acquirer, txn.rrn, fields.reversal(txn, self._inst, txn.received_ms))
            )
        self._finish(txn, codes.SYSTEM_MALFUNCTION, out)

    # ================================================================================================
    # housekeeping
    # ================================================================================================
    def _want_rrns(self, out: Out) -> None:
        if self.rrns.wants_more():
            out.append(ReserveRrns(self.rrns.block_size))

    def _on_rrns(self, ev: RrnsReserved, out: Out) -> None:
        self.rrns.grant(ev.start, ev.count)
        self._want_rrns(out)

    def _on_cutover(self, ev: Cutover, out: Out) -> None:
        self.book.close_batch(None, ev.now_ms)
        out.append(Log("info", "cutover", "business day closed; terminal batches reset"))

    def _on_tick(self, ev: Tick, out: Out) -> None:
        for t in self.hooks.tick(ev.now_ms):
            tid = str(getattr(t, "id", ""))
            reason = str(getattr(t, "state_reason", ""))
            self.counters["terminals_suspended"] += 1
            out.append(RecordLifecycle(tid, "clock", ev.now_ms, reason=reason))
            out.append(Log("warning", "terminal_suspended", f"terminal {tid}: {reason}"))
        expiry_ms = self.config.hold_expiry_ms
        due: list[Record] = []
        for h in self.book.open_holds.values():
            if h.at_ms + expiry_ms > ev.now_ms:
                break
            if not h.busy:
                due.append(h)
                if len(due) >= self.config.max_hold_expiries_per_tick:
                    break
        for h in due:
            h.busy = True
            self.counters["holds_expired"] += 1
            d = postings.draft(
                h,
                key=rrn_key(h.rrn, "expiry"),
                kind=EntryKind.HOLD_EXPIRY,
                postings=postings.release(h.acquirer, h.merchant_id, h.amount_minor, h.currency),
                at_ms=h.at_ms + expiry_ms,
                response_code=codes.APPROVED,
                original_rrn=h.rrn,
            )

            def undo(h: Record = h) -> None:
                h.busy = False

            self._post(None, (d,), out, undo=undo)

    def _on_saf_completed(self, ev: StoreForwardCompleted, out: Out) -> None:
        ok = codes.is_approval(ev.response_code)
        if ev.kind == "reversal":
            self.counters["reversals_completed"] += 1
            if not ok and ev.response_code != codes.UNKNOWN_ORIGINAL:
                out.append(
                    Log(
                        "warning",
                        "reversal_refused",
                        f"acquirer {ev.acquirer} answered {ev.response_code} to the reversal of {ev.rrn}",
                    )
                )
            return
        self.counters["advices_completed"] += 1
        if ok:
            return
        txn = self.book.find_rrn(ev.rrn)
        out.append(
            Log(
                "error",
                "advice_refused",
                f"acquirer {ev.acquirer} refused advice {ev.rrn} with {ev.response_code}",
            )
        )
        if txn is not None and txn.stand_in and txn.status is Status.APPROVED:
            self.counters["stand_in_refused"] += 1
            p = postings._pair(
                accounts.STAND_IN_EXPOSURE,
                accounts.acquirer_clearing(ev.acquirer),
                txn.amount_minor,
                txn.currency,
            )
            d = postings.draft(
                txn,
                key=rrn_key(txn.rrn, "advice-refused"),
                kind=EntryKind.ADJUSTMENT,
                postings=p,
                at_ms=ev.now_ms,
                response_code=ev.response_code,
                original_rrn=txn.rrn,
            )
            self._post(None, (d,), out)

    def _on_recovered(self, ev: Recovered, out: Out) -> None:
        """Rebuild memory from the ledger; settle armed reversals; re-queue lost store-and-forward."""
        self.book.day_start_ms = ev.business_day_start_ms
        for d in ev.drafts:
            self.book.apply(d, count_totals=d.at_ms >= ev.business_day_start_ms)
        fired = released = requeued = 0
        for a in ev.armed:
            rec = self.book.find_rrn(a.rrn)
            if (
                rec is None
                or rec.status is Status.PENDING
                or rec.status is Status.TIMED_OUT
                or rec.reversal_queued
            ):
                out.append(QueueReversal(a.acquirer, a.rrn, a.fields))
                fired += 1
            else:
                out.append(ReleaseReversal(a.acquirer, a.rrn))
                released += 1
        armed = {a.rrn for a in ev.armed}
        for d in ev.drafts:
            role = key_role(d.idempotency_key)
            target = ""
            if role == "rev" or d.kind is EntryKind.VOID:
                target = d.original_rrn
            elif d.kind is EntryKind.DECLINE and "rq=1" in d.memo:
                target = d.rrn
            if target and target not in ev.queued_rrns and target not in armed:
                rec = self.book.find_rrn(target)
                if rec is not None and rec.acquirer:
                    out.append(
                        QueueReversal(rec.acquirer, target, fields.reversal(rec, self._inst, ev.now_ms))
                    )
                    requeued += 1
            if (
                role == "out"
                and d.kind in (EntryKind.STAND_IN, EntryKind.CAPTURE)
                and d.rrn not in ev.queued_rrns
            ):
                rec = self.book.find_rrn(d.rrn)
                if rec is not None and rec.acquirer:
                    orig = self.book.find_rrn(rec.original_rrn) if rec.original_rrn else None
                    out.append(
                        QueueAdvice(rec.acquirer, d.rrn, fields.advice(rec, self._inst, ev.now_ms, orig))
                    )
                    requeued += 1
        self.counters["recovered_entries"] += len(ev.drafts)
        self.counters["armed_reversals_fired"] += fired
        out.append(
            Log(
                "info",
                "recovered",
                f"{len(ev.drafts)} entries; armed reversals: {fired} fired, "
                f"{released} released; {requeued} store-and-forward items re-queued",
            )
        )
        self._want_rrns(out)
