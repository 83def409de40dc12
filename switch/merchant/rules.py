"""`MerchantRules`: the one object the processing core calls for merchant services. Sans-I/O.

It holds a snapshot of the registry (merchants, contracts, terminals) and running per-merchant totals
(unsettled balance, refunds per business day, refunds in flight), and answers synchronously:

- `check(ctx)` / `check_request(req)`: before routing. None = go on; else a `MerchantDecline` (code,
  reason, flag). `check(ctx)` accepts switch.processing.ports.RuleContext as is (duck-typed: this layer
  may not import processing) and reads the optional attributes `mcc`, `pan_prefix`, `reserve_key` and
  `original_closed_by` when the context has them.
- `fee_drafts` / `fee_refund_drafts`: entries to add to the Post of an approved sale / refund / void.
- `sign_on`, `approved`, `tick`: lifecycle events; each returns the changed Terminal (or None), which
  the caller persists through the registry store (audited). The snapshot is updated at once, so the
  next request already sees the change.
- `observe(drafts)`: feed every committed entry (LedgerCommitted) so balances and daily refund totals
  stay current; `recover(...)` loads them at start-up from the ledger (switch.merchant.ledger_view).
- `release(reserve_key)`: a refund that passed `check` and then did not commit (declined upstream,
  timed out, ledger failure) gives its reservation back. A committed refund whose idempotency key is
  the reserve key releases it automatically in `observe`.

Reservations make two refunds racing for the same balance or daily cap safe: the second sees the
first's amount as already spent until it commits or is released.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from switch.config import MerchantServicesConfig
from switch.ledger.model import EntryDraft, EntryKind, Side, accounts
from switch.merchant import codes, drafts, fees, lifecycle
from switch.merchant.days import business_day
from switch.merchant.lifecycle import MerchantDecline
from switch.merchant.model import Contract, Merchant, MerchantStatus, Terminal
from switch.merchant.refunds import OriginalFacts, check_refund

#: Refunds that passed `check` and have not committed or been released. Beyond this, refunds are
#: declined 96-free but safely: 61 with a reason (the switch is overloaded with unresolved refunds).
MAX_RESERVATIONS = 100_000
#: Flows that carry a card and are checked against the registered MCC.
MCC_FLOWS = frozenset({"purchase", "preauth", "completion", "refund", "void", "inquiry"})
#: "Never" for the lapse schedule (year 9999).
NEVER_MS = 253_402_300_799_999
#: Flows priced with a fee when approved.
SALE_FLOWS = frozenset({"purchase", "completion"})


class MerchantRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the merchant rules look at in one request (no PAN: at most its first digits)."""

    flow: str
    terminal_id: str
    merchant_id: str
    now_ms: int
    amount_minor: int = 0
    currency: str = ""
    #: Field 18 as received ("" when absent).
    mcc: str = ""
    #: First 6-11 PAN digits, for the card type (fees). Never the whole PAN.
    pan_prefix: str = ""
    #: Idempotency key of the entry this request will post, for refund reservations ("" = none).
    reserve_key: str = ""
    original: OriginalFacts | None = None


class _Reservation(msgspec.Struct, frozen=True):
    merchant_id: str
    currency: str
    day: int
    amount_minor: int


class MerchantRules:
    def __init__(
        self,
        cfg: MerchantServicesConfig,
        merchants: Iterable[Merchant] = (),
        contracts: Iterable[Contract] = (),
        terminals: Iterable[Terminal] = (),
    ) -> None:
        self.cfg = cfg
        self.merchants: dict[str, Merchant] = {m.id: m for m in merchants}
        self.contracts: dict[str, Contract] = {c.id: c for c in contracts}
        self.terminals: dict[str, Terminal] = {t.id: t for t in terminals}
        #: (merchant, currency) -> what the switch owes the merchant now (credit balance of payable).
        self.unsettled: dict[tuple[str, str], int] = {}
        #: (merchant, currency, business day) -> refunds committed that day.
        self.refunded_by_day: dict[tuple[str, str, int], int] = {}
        self._reserved: dict[str, _Reservation] = {}
        #: No activated/active terminal lapses before this (None: unknown, `tick` scans).
        self._next_lapse_ms: int | None = None

    # --- registry snapshot ---------------------------------------------------------------------
    def put_merchant(self, m: Merchant) -> None:
        self.merchants[m.id] = m

    def put_contract(self, c: Contract) -> None:
        self.contracts[c.id] = c
        self._next_lapse_ms = None  # grace periods may have changed

    def put_terminal(self, t: Terminal) -> None:
        self.terminals[t.id] = t
        if self._next_lapse_ms is not None and t.state in lifecycle.SUSPENDABLE:
            self._next_lapse_ms = min(
                self._next_lapse_ms, lifecycle.grace_end_ms(t.paid_until_ms, self._grace(t))
            )

    def put(self, record: object) -> None:
        """Take any changed registry record (MerchantService.on_change); keys and renewals are not
        the rules' business."""
        if isinstance(record, Terminal):
            self.put_terminal(record)
        elif isinstance(record, Merchant):
            self.put_merchant(record)
        elif isinstance(record, Contract):
            self.put_contract(record)

    def _grace(self, t: Terminal) -> int:
        contract = self.contract_of(t.merchant_id)
        return contract.subscription_grace_days if contract else self.cfg.subscription_grace_days

    def contract_of(self, merchant_id: str) -> Contract | None:
        m = self.merchants.get(merchant_id)
        return None if m is None or not m.contract_id else self.contracts.get(m.contract_id)

    def _day(self, at_ms: int) -> int:
        return business_day(at_ms, self.cfg.business_day_utc_offset_minutes)

    # --- checks ----------------------------------------------------------------------------------
    def check(self, ctx: Any) -> MerchantDecline | None:
        """Adapter for switch.processing.ports.Rules (see the module docstring)."""
        original = None
        if getattr(ctx, "original_rrn", ""):
            original = OriginalFacts(
                rrn=ctx.original_rrn,
                merchant_id=ctx.merchant.id,
                currency=ctx.currency,
                amount_minor=ctx.original_amount_minor,
                at_ms=ctx.original_at_ms,
                refunded_minor=ctx.refunded_minor,
                closed_by=getattr(ctx, "original_closed_by", ""),
            )
        return self.check_request(
            MerchantRequest(
                flow=str(ctx.flow),
                terminal_id=ctx.terminal.id,
                merchant_id=ctx.merchant.id,
                now_ms=ctx.now_ms,
                amount_minor=ctx.amount_minor,
                currency=ctx.currency,
                mcc=getattr(ctx, "mcc", "") or "",
                pan_prefix=getattr(ctx, "pan_prefix", "") or "",
                reserve_key=getattr(ctx, "reserve_key", "") or "",
                original=original,
            )
        )

    def check_request(self, req: MerchantRequest) -> MerchantDecline | None:
        t = self.terminals.get(req.terminal_id)
        m = self.merchants.get(req.merchant_id)
        if t is None or m is None or t.merchant_id != m.id:
            return MerchantDecline(
                codes.INVALID_MERCHANT,
                f"terminal {req.terminal_id} is not registered to merchant {req.merchant_id}",
            )
        if m.status is not MerchantStatus.OPEN and req.flow not in lifecycle.ALWAYS_ALLOWED_FLOWS:
            return MerchantDecline(codes.INVALID_MERCHANT, f"merchant {m.id} is {m.status}")
        contract = self.contract_of(m.id)
        grace = contract.subscription_grace_days if contract else self.cfg.subscription_grace_days
        if req.flow == "network":
            return lifecycle.sign_on_allowed(t)
        decline = lifecycle.admit(t, req.flow, req.now_ms, grace)
        if decline is not None:
            return decline
        if req.flow in MCC_FLOWS:
            if req.mcc and req.mcc != m.mcc:
                return MerchantDecline(
                    codes.NOT_PERMITTED_TERMINAL,
                    f"MCC {req.mcc} in the request is not merchant {m.id}'s registered MCC {m.mcc}",
                    flag="mcc_mismatch",
                )
            if not req.mcc and self.cfg.require_mcc:
                return MerchantDecline(
                    codes.NOT_PERMITTED_TERMINAL, "field 18 (MCC) missing", flag="mcc_missing"
                )
            if contract is None:
                return MerchantDecline(
                    codes.NOT_PERMITTED_TERMINAL, f"merchant {m.id} has no contract: nothing may be priced"
                )
        if req.flow == "refund":
            assert contract is not None
            return self._check_refund(req, m, contract)
        return None

    def _check_refund(self, req: MerchantRequest, m: Merchant, contract: Contract) -> MerchantDecline | None:
        currency = req.currency or m.currency
        day = self._day(req.now_ms)
        reserved_day = sum(
            r.amount_minor
            for r in self._reserved.values()
            if (r.merchant_id, r.currency, r.day) == (m.id, currency, day)
        )
        reserved_all = sum(
            r.amount_minor for r in self._reserved.values() if (r.merchant_id, r.currency) == (m.id, currency)
        )
        decline = check_refund(
            contract,
            m.id,
            req.amount_minor,
            currency,
            req.original,
            req.now_ms,
            self.refunded_by_day.get((m.id, currency, day), 0) + reserved_day,
            self.unsettled.get((m.id, currency), 0) - reserved_all,
            self.cfg.business_day_utc_offset_minutes,
        )
        if decline is None and req.reserve_key:
            if len(self._reserved) >= MAX_RESERVATIONS and req.reserve_key not in self._reserved:
                return MerchantDecline(
                    codes.EXCEEDS_AMOUNT_LIMIT, f"{MAX_RESERVATIONS} refunds unresolved: try again later"
                )
            self._reserved[req.reserve_key] = _Reservation(m.id, currency, day, req.amount_minor)
        return decline

    def release(self, reserve_key: str) -> None:
        self._reserved.pop(reserve_key, None)

    # --- fees ------------------------------------------------------------------------------------
    def fee_drafts(
        self,
        *,
        sale_rrn: str,
        merchant_id: str,
        terminal_id: str,
        pan_prefix: str,
        amount_minor: int,
        currency: str,
        at_ms: int,
    ) -> tuple[EntryDraft, ...]:
        """The FEE entry of an approved sale (empty when the fee is 0). Post it with the sale."""
        contract = self.contract_of(merchant_id)
        if contract is None:
            return ()
        terms = fees.fee_terms(contract, pan_prefix, amount_minor)
        if terms.fee_minor <= 0:
            return ()
        return (
            drafts.fee(
                sale_rrn, merchant_id, terminal_id, terms.fee_minor, currency, at_ms, drafts.memo_json(terms)
            ),
        )

    @staticmethod
    def fee_refund_drafts(
        *,
        refund_rrn: str,
        fee_entry: EntryDraft | None,
        original_amount_minor: int,
        refunded_before_minor: int,
        refund_minor: int,
        at_ms: int,
        returned_before_minor: int | None = None,
    ) -> tuple[EntryDraft, ...]:
        """The FEE_REFUND entry returning the fee pro rata with a refund. `fee_entry`: the sale's FEE
        entry (rrn `<sale rrn>/fee`, found with the sale's family); None or a zero return gives no entry.

        `returned_before_minor`: fee already returned for this sale, when the caller knows it (the
        processing core does). Then the return is the cumulative target floor(F * R_after / A) minus
        what was returned, clamped to what is left of the fee: exact even after a refund and its fee
        return were reversed, and never more than charged (so the ledger never refuses the batch)."""
        if fee_entry is None or fee_entry.kind is not EntryKind.FEE:
            return ()
        terms = fees.decode_terms(fee_entry.memo)
        if returned_before_minor is None:
            back = fees.fee_refund_minor(
                terms.refundable_minor, original_amount_minor, refunded_before_minor, refund_minor
            )
        else:
            target = fees.fee_refund_minor(
                terms.refundable_minor, original_amount_minor, 0, refunded_before_minor + refund_minor
            )
            back = min(target, terms.refundable_minor) - returned_before_minor
            back = max(0, min(back, fee_entry.amount_minor - returned_before_minor))
        if back <= 0:
            return ()
        memo = drafts.memo_json(
            {
                "refundable_fee_minor": terms.refundable_minor,
                "original_minor": original_amount_minor,
                "refunded_before_minor": refunded_before_minor,
                "refund_minor": refund_minor,
            }
        )
        return (
            drafts.fee_refund(
                refund_rrn,
                fee_entry.original_rrn,
                fee_entry.merchant_id,
                fee_entry.terminal_id,
                back,
                fee_entry.currency,
                at_ms,
                memo,
            ),
        )

    @staticmethod
    def fee_reversal_drafts(
        *,
        reversed_kind: EntryKind,
        fee_rrn: str,
        merchant_id: str,
        terminal_id: str,
        amount_minor: int,
        currency: str,
        at_ms: int,
        reason: str,
    ) -> tuple[EntryDraft, ...]:
        """The REVERSAL undoing a FEE (sale voided or reversed) or a FEE_REFUND (refund reversed);
        posted with the void / reversal entry itself. Nothing when the amount is 0."""
        if amount_minor <= 0:
            return ()
        return (
            drafts.fee_reversal(
                reversed_kind,
                fee_rrn,
                merchant_id,
                terminal_id,
                amount_minor,
                currency,
                at_ms,
                drafts.memo_json({"reason": reason, "reversed": str(reversed_kind)}),
            ),
        )

    # --- lifecycle events ------------------------------------------------------------------------
    def sign_on(self, terminal_id: str, now_ms: int) -> Terminal | None:
        """A sign-on was accepted (check_request(flow='network') passed): record the first one."""
        t = self.terminals.get(terminal_id)
        if t is None:
            return None
        changed = lifecycle.on_sign_on(t, now_ms)
        if changed is not None:
            self.terminals[t.id] = changed
        return changed

    def approved(self, terminal_id: str, flow: str, now_ms: int) -> Terminal | None:
        """An approval of `flow` is durable: activation by the test transaction, or first live use."""
        t = self.terminals.get(terminal_id)
        if t is None:
            return None
        changed = lifecycle.on_approved(t, flow, now_ms)
        if changed is not None:
            self.terminals[t.id] = changed
        return changed

    def tick(self, now_ms: int) -> list[Terminal]:
        """Suspend terminals whose subscription lapsed past grace; returns those changed. Scans the
        terminals only once the earliest grace end has passed (the server ticks every second; requests
        are refused at the lapse moment by `check` anyway, this only records the state)."""
        if self._next_lapse_ms is not None and now_ms <= self._next_lapse_ms:
            return []
        out = []
        nxt = NEVER_MS
        for t in list(self.terminals.values()):
            grace = self._grace(t)
            changed = lifecycle.on_clock(t, now_ms, grace)
            if changed is not None:
                self.terminals[t.id] = changed
                out.append(changed)
            elif t.state in lifecycle.SUSPENDABLE:
                nxt = min(nxt, lifecycle.grace_end_ms(t.paid_until_ms, grace))
        self._next_lapse_ms = nxt
        return out

    # --- running totals --------------------------------------------------------------------------
    def recover(
        self, unsettled: dict[tuple[str, str], int], refunded_by_day: dict[tuple[str, str, int], int]
    ) -> None:
        self.unsettled = dict(unsettled)
        self.refunded_by_day = dict(refunded_by_day)
        self._reserved.clear()

    def observe(self, committed: Iterable[EntryDraft]) -> None:
        """Fold committed entries into the running totals (any kind; only merchant payable postings and
        REFUND amounts matter)."""
        for d in committed:
            if d.merchant_id:
                payable = accounts.merchant_payable(d.merchant_id)
                for p in d.postings:
                    if p.account == payable:
                        key = (d.merchant_id, p.currency)
                        delta = p.amount_minor if p.side is Side.CREDIT else -p.amount_minor
                        self.unsettled[key] = self.unsettled.get(key, 0) + delta
                if d.kind is EntryKind.REFUND:
                    k3 = (d.merchant_id, d.currency, self._day(d.at_ms))
                    self.refunded_by_day[k3] = self.refunded_by_day.get(k3, 0) + d.amount_minor
            self._reserved.pop(d.idempotency_key, None)
        self._prune_days()

    def _prune_days(self) -> None:
        if len(self.refunded_by_day) > 4 * max(1, len(self.merchants)):
            newest = max(k[2] for k in self.refunded_by_day)
            self.refunded_by_day = {k: v for k, v in self.refunded_by_day.items() if k[2] >= newest - 1}
