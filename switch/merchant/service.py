"""Merchant operations as the CLI and the admin API run them: validate, post to the ledger, record in
the registry (audited). Synchronous and blocking (the API runs it in a worker thread).

Ordering and failure rules (money first, then the registry, compensate by rule):
- registration: the terminal must not exist; DEPOSIT posted; terminal saved; if saving fails after the
  deposit was posted, the deposit is refunded (DEPOSIT_REFUND, memo says why). The first subscription
  period is then paid like any renewal.
- renewal: SUBSCRIPTION posted; renewal + terminal saved; if saving fails, SUBSCRIPTION_REFUND is posted
  ("renewal failed") and the error raised. Cancel within the refund window: SUBSCRIPTION_REFUND.
- cutover: the batch boundary (to_seq) is recorded FIRST, then one SETTLEMENT entry per merchant and
  currency with idempotency keys derived from to_seq; a cutover that stopped half-way is finished by
  the next call (re-posting the same keys returns the entries already written), never settled twice.
Every ledger entry is idempotent by key, so a retried operation never charges twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from switch.config import MerchantServicesConfig
from switch.ledger.backend import merchant_seqs_sql
from switch.ledger.model import Entry, EntryDraft, EntryKind, IdempotencyConflict
from switch.merchant import deposit, drafts, lifecycle, settlement, subscription
from switch.merchant.model import (
    Contract,
    Merchant,
    Rate,
    RegistryError,
    Renewal,
    Terminal,
    TerminalKey,
    TerminalState,
    validate_contract,
    validate_key,
    validate_merchant,
    validate_terminal,
)
from switch.merchant.store import Cutover, RegistryConflict, RegistryStore

#: paid_until of a terminal whose contract has no subscription fee (never lapses): 9999-12-31.
NO_SUBSCRIPTION_MS = 253_402_214_400_000
#: Entries decoded per chunk when folding a batch.
FOLD_CHUNK = 5_000
#: Attempts to save a lifecycle event against concurrent registry writes.
LIFECYCLE_RETRIES = 5


def config_contract_id(merchant_id: str) -> str:
    """Contract id of a merchant imported from switch.toml ("cfg." + the id made contract-safe)."""
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in merchant_id)
    return f"cfg.{safe}"[:32]


class LedgerPort(Protocol):
    """Blocking append (switch.ledger.writer.LedgerWriter.append satisfies it)."""

    def append(self, drafts: Sequence[EntryDraft], timeout_s: float | None = None) -> list[Entry]: ...


class NotFound(RegistryError):
    pass


class DepositSweep(msgspec.Struct, kw_only=True):
    """What one scheduled deposit pass did (MerchantService.sweep_deposits)."""

    checked: int
    decided: list[deposit.DepositEvaluation] = msgspec.field(default_factory=list)
    errors: list[str] = msgspec.field(default_factory=list)
    cursor: deposit.Cursor | None = None


class MerchantService:
    def __init__(
        self,
        store: RegistryStore,
        reader: Any,
        ledger: LedgerPort | None,
        cfg: MerchantServicesConfig,
        clock_ms: Callable[[], int],
    ) -> None:
        self.store = store
        self.reader = reader  # switch.ledger.queries.LedgerReader
        self.ledger = ledger
        self.cfg = cfg
        self.clock_ms = clock_ms
        #: Called with each changed record so a running switch's MerchantRules sees it at once.
        self.on_change: Callable[[msgspec.Struct], None] = lambda record: None
        #: Called after a cutover recorded its boundary and posted its settlements (the running
        #: switch closes its terminal batches and business day at the same moment).
        self.on_cutover: Callable[[Cutover], None] = lambda cut: None

    # --- helpers ---------------------------------------------------------------------------------
    def _post(self, batch: Sequence[EntryDraft]) -> list[Entry]:
        if self.ledger is None:
            raise RegistryError(
                "no ledger writer: this operation posts entries (run it through the "
                "admin API of the running switch, or with the switch stopped)"
            )
        return self.ledger.append(batch, timeout_s=30.0)

    def merchant(self, id_: str) -> tuple[Merchant, int]:
        got = self.store.get("merchant", id_, Merchant)
        if got is None:
            raise NotFound(f"no merchant {id_}")
        return got

    def terminal(self, id_: str) -> tuple[Terminal, int]:
        got = self.store.get("terminal", id_, Terminal)
        if got is None:
            raise NotFound(f"no terminal {id_}")
        return got

    def contract_for(self, merchant_id: str) -> Contract:
        m, _ = self.merchant(merchant_id)
        got = self.store.get("contract", m.contract_id, Contract) if m.contract_id else None
        if got is None:
            raise NotFound(f"merchant {merchant_id} has no contract")
        return got[0]

    def _save(
        self,
        kind: str,
        id_: str,
        owner: str,
        record: msgspec.Struct,
        actor: str,
        action: str,
        version: int | None,
    ) -> None:
        self.store.save(
            kind,
            id_,
            owner,
            record,
            actor=actor,
            action=action,
            at_ms=self.clock_ms(),
            expect_version=version,
        )
        self.on_change(record)

    # --- merchants and contracts -----------------------------------------------------------------
    def create_merchant(self, m: Merchant, actor: str) -> Merchant:
        m = validate_merchant(msgspec.structs.replace(m, contract_id="", created_at_ms=self.clock_ms()))
        self._save("merchant", m.id, m.id, m, actor, "create", None)
        return m

    def update_merchant(self, id_: str, actor: str, **changes: Any) -> Merchant:
        m, v = self.merchant(id_)
        new = validate_merchant(msgspec.structs.replace(m, **changes))
        self._save("merchant", id_, id_, new, actor, "update", v)
        return new

    def put_contract(self, c: Contract, actor: str) -> Contract:
        """Create or replace a contract and make it the merchant's current one."""
        c = validate_contract(c)
        m, mv = self.merchant(c.merchant_id)
        if c.currency != m.currency:
            raise RegistryError(f"contract currency {c.currency} is not merchant {m.id}'s {m.currency}")
        got = self.store.get("contract", c.id, Contract)
        if got is not None and got[0].merchant_id != c.merchant_id:
            raise RegistryError(f"contract {c.id} belongs to merchant {got[0].merchant_id}")
        self._save(
            "contract", c.id, c.merchant_id, c, actor, "update" if got else "create", got[1] if got else None
        )
        if m.contract_id != c.id:
            self._save(
                "merchant",
                m.id,
                m.id,
                msgspec.structs.replace(m, contract_id=c.id),
                actor,
                "assign contract",
                mv,
            )
        return c

    # --- terminals -------------------------------------------------------------------------------
    def register_terminal(
        self, terminal_id: str, merchant_id: str, actor: str, profile: str = "terminal_ascii"
    ) -> Terminal:
        now = self.clock_ms()
        contract = self.contract_for(merchant_id)
        t = validate_terminal(
            Terminal(
                id=terminal_id,
                merchant_id=merchant_id,
                profile=profile,
                registered_at_ms=now,
                paid_until_ms=now,
            )
        )
        if self.store.get("terminal", terminal_id, Terminal) is not None:
            raise RegistryError(f"terminal {terminal_id} already exists")
        if contract.subscription_fee_minor == 0:
            t = msgspec.structs.replace(t, paid_until_ms=NO_SUBSCRIPTION_MS)
        if contract.deposit_minor > 0:
            rrn = f"dep/{terminal_id}/{now}"
            self._post(
                [
                    drafts.deposit(
                        rrn, merchant_id, terminal_id, contract.deposit_minor, contract.currency, now
                    )
                ]
            )
            t = msgspec.structs.replace(t, deposit_rrn=rrn)
            try:
                self._save("terminal", t.id, merchant_id, t, actor, "register", None)
            except Exception as exc:
                self._post(
                    [
                        drafts.deposit_refund(
                            rrn,
                            merchant_id,
                            terminal_id,
                            contract.deposit_minor,
                            contract.currency,
                            self.clock_ms(),
                            drafts.memo_json({"reason": f"registration failed: {exc}"}),
                        )
                    ]
                )
                raise
        else:
            self._save("terminal", t.id, merchant_id, t, actor, "register", None)
        if contract.subscription_fee_minor > 0:
            self.renew(terminal_id, actor)
        return self.terminal(terminal_id)[0]

    def set_state(self, terminal_id: str, to: TerminalState, actor: str, reason: str = "") -> Terminal:
        t, v = self.terminal(terminal_id)
        new = lifecycle.transition(t, to, self.clock_ms(), reason or f"by {actor}")
        self._save("terminal", t.id, t.merchant_id, new, actor, f"state {to}", v)
        return new

    def record_terminal(self, changed: Terminal, actor: str = "switch") -> None:
        """Persist a lifecycle change computed by MerchantRules (sign-on, activation, suspension)."""
        _, v = self.terminal(changed.id)
        self._save(
            "terminal", changed.id, changed.merchant_id, changed, actor, f"lifecycle {changed.state}", v
        )

    def apply_lifecycle(
        self, terminal_id: str, event: str, now_ms: int, flow: str = "", actor: str = "switch"
    ) -> Terminal | None:
        """Persist a lifecycle event the running switch acted on (processing's RecordLifecycle): the
        same pure transition is applied to the registry's CURRENT record, so an operator change made
        meanwhile (a renewal) is kept; a concurrent write is retried. Returns the saved record, or
        None when the record already shows the event (a repeat, or a renewal made it moot)."""
        for _ in range(LIFECYCLE_RETRIES):
            t, v = self.terminal(terminal_id)
            if event == "sign_on":
                new = lifecycle.on_sign_on(t, now_ms)
            elif event == "approved":
                new = lifecycle.on_approved(t, flow, now_ms)
            elif event == "clock":
                contract = self.store.get("contract", self.merchant(t.merchant_id)[0].contract_id, Contract)
                grace = contract[0].subscription_grace_days if contract else self.cfg.subscription_grace_days
                new = lifecycle.on_clock(t, now_ms, grace)
            else:
                raise RegistryError(f"unknown lifecycle event {event!r}")
            if new is None:
                return None
            try:
                self._save("terminal", t.id, t.merchant_id, new, actor, f"lifecycle {event}: {new.state}", v)
            except RegistryConflict:
                continue
            return new
        raise RegistryConflict(f"terminal {terminal_id} kept changing: lifecycle event {event} not saved")

    def import_from_config(
        self, merchants: Sequence[Any], terminals: Sequence[Any], actor: str = "switch.toml"
    ) -> list[str]:
        """Import merchants and terminals declared in switch.toml that the registry does not know yet.

        They are pre-provisioned devices already in service, so they come in as ACTIVE with no
        subscription (paid until 9999) and a contract `cfg.<merchant>` carrying the configured refund
        rules and no fees. The registry wins afterwards: an imported record is never overwritten from
        the config again. Returns the ids imported (audited with `actor`)."""
        now = self.clock_ms()
        done: list[str] = []
        for mc in merchants:
            if self.store.get("merchant", mc.id, Merchant) is not None:
                continue
            m = self.create_merchant(
                Merchant(id=mc.id, name=mc.name or mc.id, mcc=mc.mcc, currency=mc.currency), actor
            )
            self.put_contract(
                Contract(
                    id=config_contract_id(m.id),
                    merchant_id=m.id,
                    currency=m.currency,
                    rates={"default": Rate()},
                    refund_window_days=mc.refund_window_days,
                    single_refund_cap_minor=mc.single_refund_cap_minor or None,
                    daily_refund_cap_minor=mc.daily_refund_cap_minor or None,
                ),
                actor,
            )
            done.append(m.id)
        for tc in terminals:
            if self.store.get("terminal", tc.id, Terminal) is not None:
                continue
            t = validate_terminal(
                Terminal(
                    id=tc.id,
                    merchant_id=tc.merchant_id,
                    profile=tc.profile,
                    state=TerminalState.ACTIVE,
                    registered_at_ms=now,
                    signed_on_at_ms=now,
                    activated_at_ms=now,
                    live_at_ms=now,
                    paid_until_ms=NO_SUBSCRIPTION_MS,
                    state_reason="imported from switch.toml as a terminal already in service",
                )
            )
            self.merchant(t.merchant_id)  # NotFound unless its merchant exists
            self._save("terminal", t.id, t.merchant_id, t, actor, "import", None)
            done.append(t.id)
        return done

    def add_key(self, k: TerminalKey, actor: str) -> TerminalKey:
        k = validate_key(msgspec.structs.replace(k, created_at_ms=self.clock_ms()))
        t, _ = self.terminal(k.terminal_id)
        self._save("key", f"{k.terminal_id}/{k.key_index}", t.id, k, actor, "add key", None)
        return k

    # --- subscriptions ---------------------------------------------------------------------------
    def renew(self, terminal_id: str, actor: str) -> Renewal:
        now = self.clock_ms()
        t, v = self.terminal(terminal_id)
        contract = self.contract_for(t.merchant_id)
        plan = subscription.plan_renewal(t, contract, now)
        rrn = f"sub/{terminal_id}/{plan.period_from_ms}"
        ren = Renewal(
            rrn=rrn,
            terminal_id=t.id,
            merchant_id=t.merchant_id,
            amount_minor=plan.amount_minor,
            currency=plan.currency,
            paid_at_ms=now,
            period_from_ms=plan.period_from_ms,
            period_to_ms=plan.period_to_ms,
        )
        self._post(
            [
                drafts.subscription(
                    rrn, t.merchant_id, t.id, plan.amount_minor, plan.currency, now, drafts.memo_json(plan)
                )
            ]
        )
        try:
            self._save("renewal", rrn, t.id, ren, actor, "renew", None)
            self._save(
                "terminal",
                t.id,
                t.merchant_id,
                lifecycle.on_renewed(t, plan.period_to_ms, now),
                actor,
                "renewed",
                v,
            )
        except Exception as exc:
            self._post(
                [
                    drafts.subscription_refund(
                        rrn,
                        t.merchant_id,
                        t.id,
                        plan.amount_minor,
                        plan.currency,
                        self.clock_ms(),
                        drafts.memo_json({"reason": f"renewal failed: {exc}"}),
                    )
                ]
            )
            got = self.store.get("renewal", rrn, Renewal)
            if got is not None:
                self._save(
                    "renewal",
                    rrn,
                    t.id,
                    msgspec.structs.replace(got[0], status="refunded", reason="renewal failed"),
                    actor,
                    "refund",
                    got[1],
                )
            raise
        return ren

    def renewals(self, terminal_id: str) -> list[Renewal]:
        rows = self.store.list("renewal", Renewal, owner=terminal_id, limit=self.cfg.max_list_rows)
        return sorted(rows, key=lambda r: r.period_from_ms)

    def cancel_renewal(self, terminal_id: str, rrn: str, actor: str) -> Renewal:
        now = self.clock_ms()
        t, tv = self.terminal(terminal_id)
        got = self.store.get("renewal", rrn, Renewal)
        if got is None or got[0].terminal_id != terminal_id:
            raise NotFound(f"no renewal {rrn} for terminal {terminal_id}")
        ren, rv = got
        applied = [r for r in self.renewals(terminal_id) if r.status == "applied"]
        subscription.check_cancel(
            ren, applied[-1] if applied else None, self.contract_for(t.merchant_id), now
        )
        self._post(
            [
                drafts.subscription_refund(
                    rrn,
                    t.merchant_id,
                    t.id,
                    ren.amount_minor,
                    ren.currency,
                    now,
                    drafts.memo_json({"reason": "cancelled within refund window"}),
                )
            ]
        )
        done = msgspec.structs.replace(ren, status="refunded", reason=f"cancelled by {actor}")
        self._save("renewal", rrn, t.id, done, actor, "cancel", rv)
        self._save(
            "terminal",
            t.id,
            t.merchant_id,
            msgspec.structs.replace(t, paid_until_ms=ren.period_from_ms),
            actor,
            "renewal cancelled",
            tv,
        )
        return done

    # --- deposits --------------------------------------------------------------------------------
    def processed_minor(self, t: Terminal, until_ms: int) -> int:
        """Net sales of terminal `t` dated registered_at..until_ms, folded from the ledger."""
        net = 0
        sale_rrns: set[str] = set()
        for e in self._merchant_entries(t.merchant_id, t.registered_at_ms, until_ms):
            d = e.draft
            if d.terminal_id != t.id:
                continue
            if d.kind in settlement.SALES:
                net += d.amount_minor
                sale_rrns.add(d.rrn)
            elif d.kind in (EntryKind.VOID, EntryKind.REFUND) or (
                d.kind is EntryKind.REVERSAL and d.original_rrn in sale_rrns
            ):
                net -= d.amount_minor
        return net

    def _merchant_entries(self, merchant_id: str, from_ms: int, to_ms: int) -> list[Entry]:
        p = self.store.p
        rows = self.store.ledger_rows(
            merchant_seqs_sql(p, self.cfg.max_report_entries), (merchant_id, from_ms, to_ms) * 2
        )
        out = []
        for (seq,) in rows:
            e = self.reader.entry(int(seq))
            if e is not None:
                out.append(e)
        return out

    def evaluate_deposit(self, terminal_id: str, actor: str, apply: bool = True) -> deposit.DepositEvaluation:
        """Evaluate the deposit rule now; with `apply`, post the outcome (refund or keep) once decided.

        Exactly once, whoever asks (API, CLI, the running switch's schedule) and whenever they
        crash: the ledger is the truth. An outcome already in the ledger is only recorded in the
        registry (a crash between posting and saving left it there); both outcomes share one
        idempotency key, so of two evaluations racing only the first posts and the other records
        what the first posted. The amount refunded or kept is the deposit actually charged (its
        DEPOSIT entry), not what the contract says today."""
        now = self.clock_ms()
        t, _ = self.terminal(terminal_id)
        contract = self.contract_for(t.merchant_id)
        _, vol_deadline = deposit.deadlines(t, contract)
        ev = deposit.evaluate(t, contract, self.processed_minor(t, vol_deadline), now)
        if not apply or not t.deposit_rrn or t.deposit_outcome:
            return ev
        posted = self._deposit_outcome_entry(t.deposit_rrn)
        if posted is None:
            if ev.result == "pending":
                return ev
            charged = self._deposit_charged(t.deposit_rrn)
            if charged is not None:
                ev = msgspec.structs.replace(ev, deposit_minor=charged[0], currency=charged[1])
            memo = drafts.memo_json(ev)
            make = drafts.deposit_refund if ev.result == "refund" else drafts.deposit_kept
            d = make(t.deposit_rrn, t.merchant_id, t.id, ev.deposit_minor, ev.currency, now, memo)
            try:
                posted = self._post([d])[0]
            except IdempotencyConflict:
                posted = self._deposit_outcome_entry(t.deposit_rrn)  # another evaluation won the race
                if posted is None:
                    raise
        outcome = "refunded" if posted.draft.kind is EntryKind.DEPOSIT_REFUND else "kept"
        self._record_deposit_outcome(terminal_id, outcome, actor)
        try:
            return msgspec.json.decode(posted.draft.memo, type=deposit.DepositEvaluation)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return ev

    def _deposit_outcome_entry(self, deposit_rrn: str) -> Entry | None:
        """The refund or keep of this deposit already in the ledger, if any."""
        for rrn in (f"{deposit_rrn}/refund", f"{deposit_rrn}/kept"):
            for e in self.reader.entries_by_rrn(rrn):
                if e.draft.original_rrn == deposit_rrn and e.draft.kind in (
                    EntryKind.DEPOSIT_REFUND,
                    EntryKind.ADJUSTMENT,
                ):
                    return e
        return None

    def _deposit_charged(self, deposit_rrn: str) -> tuple[int, str] | None:
        for e in self.reader.entries_by_rrn(deposit_rrn):
            if e.draft.kind is EntryKind.DEPOSIT:
                return e.draft.amount_minor, e.draft.currency
        return None

    def _record_deposit_outcome(self, terminal_id: str, outcome: str, actor: str) -> None:
        for _ in range(LIFECYCLE_RETRIES):
            t, v = self.terminal(terminal_id)
            if t.deposit_outcome == outcome:
                return
            if t.deposit_outcome:
                raise RegistryError(
                    f"terminal {terminal_id}: registry says deposit {t.deposit_outcome}, "
                    f"ledger says {outcome}"
                )
            try:
                self._save(
                    "terminal",
                    t.id,
                    t.merchant_id,
                    msgspec.structs.replace(t, deposit_outcome=outcome),
                    actor,
                    f"deposit {outcome}",
                    v,
                )
                return
            except RegistryConflict:
                continue  # a lifecycle save or an operator changed the terminal: apply to the new one
        raise RegistryConflict(f"terminal {terminal_id} kept changing: deposit {outcome} not recorded")

    def sweep_deposits(self, actor: str, limit: int, after: deposit.Cursor | None = None) -> DepositSweep:
        """One scheduled pass: evaluate the undecided deposits that may be decided now (at most
        `limit`, continuing after `after`) and post each outcome once decided. A terminal whose
        evaluation fails is reported in `errors` and never blocks the others."""
        now = self.clock_ms()
        contracts: dict[str, Contract | None] = {}

        def contract_of(merchant_id: str) -> Contract | None:
            if merchant_id not in contracts:
                try:
                    contracts[merchant_id] = self.contract_for(merchant_id)
                except NotFound:
                    contracts[merchant_id] = None
            return contracts[merchant_id]

        batch, cursor = deposit.due(self._all_terminals(), contract_of, now, limit, after)
        out = DepositSweep(checked=len(batch), cursor=cursor)
        for t in batch:
            try:
                ev = self.evaluate_deposit(t.id, actor, apply=True)
            except (RegistryError, IdempotencyConflict) as exc:
                out.errors.append(f"terminal {t.id}: {exc}")
                continue
            if ev.result != "pending":
                out.decided.append(ev)
        return out

    def _all_terminals(self) -> list[Terminal]:
        out: list[Terminal] = []
        after = ""
        while True:
            page = self.store.list("terminal", Terminal, after_id=after, limit=self.cfg.max_list_rows)
            out += page
            if len(page) < self.cfg.max_list_rows:
                return out
            after = page[-1].id

    # --- status, cutover, reports ----------------------------------------------------------------
    def settled_before_seq(self) -> int:
        last = self.store.last_cutover()
        return 0 if last is None else last.to_seq

    def status(self, rrn: str) -> settlement.TxnStatus:
        family: dict[int, Entry] = {}
        for e in self.reader.entries_by_rrn(rrn):
            family[e.seq] = e
        for row in self.reader.backend.txn_rows([rrn, drafts.fee_rrn(rrn)]):
            if row.seq not in family:
                e = self.reader.entry(row.seq)
                if e is not None:
                    family[e.seq] = e
        refund_rrns = [
            e.draft.rrn
            for e in family.values()
            if e.draft.kind is EntryKind.REFUND and e.draft.original_rrn == rrn
        ]
        if refund_rrns:
            wanted = refund_rrns + [drafts.fee_rrn(r) for r in refund_rrns]
            for row in self.reader.backend.txn_rows(wanted):
                if row.seq not in family and row.kind == EntryKind.REVERSAL:
                    e = self.reader.entry(row.seq)
                    if e is not None:
                        family[e.seq] = e
        return settlement.status(rrn, family.values(), self.settled_before_seq())

    def status_by_stan(self, terminal_id: str, stan: str) -> list[settlement.TxnStatus]:
        """Transactions of a terminal with that STAN (newest first; STANs wrap, so may be several)."""
        t, _ = self.terminal(terminal_id)
        if not (len(stan) == 6 and stan.isdigit()):
            raise RegistryError("STAN must be 6 digits")
        seen: list[str] = []
        for seq in self.store.ledger_seqs_by_key_prefix(f"tk:{terminal_id}/{t.merchant_id}/{stan}/"):
            e = self.reader.entry(seq)
            if e is not None and e.draft.rrn not in seen:
                seen.append(e.draft.rrn)
        return [self.status(r) for r in seen]

    def _batch_entries(self, from_seq: int, to_seq: int) -> list[Entry]:
        if to_seq - from_seq > self.cfg.max_report_entries:
            raise RegistryError(f"batch of {to_seq - from_seq} entries exceeds max_report_entries")
        out: list[Entry] = []
        for start in range(from_seq, to_seq, FOLD_CHUNK):
            for row in self.reader.backend.entry_rows(start, min(to_seq, start + FOLD_CHUNK)):
                out.append(self.reader.entry(row.seq))
        return out

    def report(self, to_seq: int | None = None) -> list[settlement.MerchantSettlement]:
        """Settlement report of the batch closed at `to_seq` (None: the open batch, up to now)."""
        cuts = self.store.cutovers()
        if to_seq is None:
            from_seq = cuts[-1].to_seq if cuts else 0
            to_seq = self.reader.backend.entry_count()
        else:
            match = [c for c in cuts if c.to_seq == to_seq]
            if not match:
                raise NotFound(f"no cutover closing at seq {to_seq}")
            from_seq = match[0].from_seq
        return settlement.settle(self._batch_entries(from_seq, to_seq), from_seq, to_seq)

    def cutover(self, actor: str) -> tuple[Cutover, list[settlement.MerchantSettlement]]:
        now = self.clock_ms()
        last = self.store.last_cutover()
        if last is not None:
            self._post_settlements(last)  # finish a cutover that stopped half-way (idempotent)
        from_seq = last.to_seq if last else 0
        cut = Cutover(from_seq=from_seq, to_seq=self.reader.backend.entry_count(), at_ms=now, actor=actor)
        self.store.add_cutover(cut)
        rows = self._post_settlements(cut)
        self.on_cutover(cut)
        return cut, rows

    def _post_settlements(self, cut: Cutover) -> list[settlement.MerchantSettlement]:
        rows = settlement.settle(self._batch_entries(cut.from_seq, cut.to_seq), cut.from_seq, cut.to_seq)
        batch = [
            drafts.settlement(
                r.merchant_id, r.currency, r.net_payable_minor, cut.to_seq, cut.at_ms, drafts.memo_json(r)
            )
            for r in rows
        ]
        if batch:
            self._post(batch)
        return rows

    def reconcile(self, declared: settlement.TerminalTotals) -> settlement.Reconciliation:
        from_seq = self.settled_before_seq()
        return settlement.reconcile(
            declared, self._batch_entries(from_seq, self.reader.backend.entry_count()), from_seq
        )
