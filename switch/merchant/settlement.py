"""Settlement and status folds over ledger entries. Pure: callers hand in committed `Entry`s.

Settlement report per (merchant, currency) over a batch (entries with from_seq <= seq < to_seq):
- gross: sales (purchase, capture, stand-in) minus voids and reversals of those sales;
- refunds: refunds minus reversed refunds;
- fees: FEE minus FEE_REFUND; deposits: DEPOSIT minus DEPOSIT_REFUND; subscriptions: SUBSCRIPTION
  minus SUBSCRIPTION_REFUND;
- net payable = gross - refunds - fees - deposits - subscriptions.
Cross-check: the same number must equal the movement of the merchant's payable account over the batch
(settlement entries excluded); `payable_check_minor` carries it and `balanced` says whether they agree.

Reversals are classified by what they undo, read from the entry itself (so an original settled in an
earlier batch is classified right): a REVERSAL naming `<rrn>/fee` undoes a fee (or a fee return), any
other REVERSAL debiting the merchant's payable undoes a sale, one crediting it undoes a refund.

Terminal reconciliation (0500): the terminal's declared totals against the ledger's for that terminal
in the open batch, on the ISO 8583:1987 lines the terminal sends and the processing core checks
(docs/flows.md "Settlement totals"): debits 76/88 (sales the terminal heard approved), debit_reversals
77/89 (voids and reversals of those), credits 74/86 (refunds), credit_reversals 75/87 (reversals of
refunds). Late approvals the terminal never heard (posted with their reversal) count on no line. Every
out-of-balance line is listed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

import msgspec

from switch.ledger.model import Entry, EntryDraft, EntryKind, Side, accounts

K = EntryKind
SALES = frozenset({K.PURCHASE, K.CAPTURE, K.STAND_IN})
#: RRN suffix of fee entries (switch.merchant.drafts.fee_rrn).
FEE_SUFFIX = "/fee"


def reversal_undoes(d: EntryDraft) -> str:
    """What a REVERSAL entry undoes: "fee" (a FEE), "fee_refund" (a FEE_REFUND), "sale" or "refund"."""
    payable = accounts.merchant_payable(d.merchant_id)
    credits_merchant = any(p.account == payable and p.side is Side.CREDIT for p in d.postings)
    if d.original_rrn.endswith(FEE_SUFFIX):
        return "fee" if credits_merchant else "fee_refund"
    return "refund" if credits_merchant else "sale"


class MerchantSettlement(msgspec.Struct, kw_only=True):
    merchant_id: str
    currency: str
    from_seq: int
    to_seq: int
    sales_count: int = 0
    gross_minor: int = 0
    refunds_count: int = 0
    refunds_minor: int = 0
    fees_minor: int = 0
    deposits_minor: int = 0
    subscriptions_minor: int = 0
    net_payable_minor: int = 0
    payable_check_minor: int = 0
    balanced: bool = True


CSV_COLUMNS = tuple(f.name for f in msgspec.structs.fields(MerchantSettlement))


def settle(entries: Iterable[Entry], from_seq: int, to_seq: int) -> list[MerchantSettlement]:
    """One MerchantSettlement per (merchant, currency) with activity in the batch, sorted."""
    out: dict[tuple[str, str], MerchantSettlement] = {}
    for e in entries:
        d = e.draft
        if not (from_seq <= e.seq < to_seq) or not d.merchant_id or d.kind in (K.DECLINE, K.SETTLEMENT):
            continue
        s = out.get((d.merchant_id, d.currency))
        if s is None:
            s = out[(d.merchant_id, d.currency)] = MerchantSettlement(
                merchant_id=d.merchant_id, currency=d.currency, from_seq=from_seq, to_seq=to_seq
            )
        a = d.amount_minor
        if d.kind in SALES:
            s.sales_count += 1
            s.gross_minor += a
        elif d.kind is K.VOID:
            s.gross_minor -= a
        elif d.kind is K.REFUND:
            s.refunds_count += 1
            s.refunds_minor += a
        elif d.kind is K.REVERSAL:
            undoes = reversal_undoes(d)
            if undoes == "sale":
                s.gross_minor -= a
            elif undoes == "refund":
                s.refunds_minor -= a
            elif undoes == "fee":
                s.fees_minor -= a
            else:  # a fee return undone: the fee is owed again
                s.fees_minor += a
        elif d.kind is K.FEE:
            s.fees_minor += a
        elif d.kind is K.FEE_REFUND:
            s.fees_minor -= a
        elif d.kind is K.DEPOSIT:
            s.deposits_minor += a
        elif d.kind is K.DEPOSIT_REFUND:
            s.deposits_minor -= a
        elif d.kind is K.SUBSCRIPTION:
            s.subscriptions_minor += a
        elif d.kind is K.SUBSCRIPTION_REFUND:
            s.subscriptions_minor -= a
        payable = accounts.merchant_payable(d.merchant_id)
        for p in d.postings:
            if p.account == payable and p.currency == d.currency:
                s.payable_check_minor += p.amount_minor if p.side is Side.CREDIT else -p.amount_minor
    for s in out.values():
        s.net_payable_minor = (
            s.gross_minor - s.refunds_minor - s.fees_minor - s.deposits_minor - s.subscriptions_minor
        )
        s.balanced = s.net_payable_minor == s.payable_check_minor
    return [out[k] for k in sorted(out)]


def to_csv(rows: Iterable[MerchantSettlement]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([getattr(r, c) for c in CSV_COLUMNS])
    return buf.getvalue()


def to_json(rows: Iterable[MerchantSettlement]) -> bytes:
    return msgspec.json.encode(list(rows))


# --- transaction status ---------------------------------------------------------------------------
class TxnStatus(msgspec.Struct, kw_only=True):
    """A transaction's state derived from its ledger entries (no card data beyond the masked PAN)."""

    rrn: str
    state: str  # pending | approved | declined | reversed | voided | partly_refunded | fully_refunded
    settled: bool
    kind: str = ""
    merchant_id: str = ""
    terminal_id: str = ""
    amount_minor: int = 0
    currency: str = ""
    refunded_minor: int = 0
    #: Merchant fee charged on the sale (0 once undone by a void or reversal) and returned by refunds.
    fee_minor: int = 0
    fee_refunded_minor: int = 0
    response_code: str = ""
    #: Why it was declined, as the switch recorded it (e.g. "rule[mcc_mismatch]: ..."); "" otherwise.
    reason: str = ""
    at_ms: int = 0
    pan_masked: str = ""
    entries: list[str] = []


def status(rrn: str, family: Iterable[Entry], settled_before_seq: int) -> TxnStatus:
    """State of `rrn` from the entries whose rrn or original_rrn is it (plus reversals of its refunds
    when the caller includes them). No entry: pending (the switch has not recorded an outcome)."""
    fam = sorted(family, key=lambda e: e.seq)
    own = [e for e in fam if e.draft.rrn == rrn]
    if not own:
        return TxnStatus(rrn=rrn, state="pending", settled=False)
    first = own[0]
    d = first.draft
    st = TxnStatus(
        rrn=rrn,
        state="approved",
        settled=first.seq < settled_before_seq,
        kind=str(d.kind),
        merchant_id=d.merchant_id,
        terminal_id=d.terminal_id,
        amount_minor=d.amount_minor,
        currency=d.currency,
        response_code=d.response_code,
        at_ms=d.at_ms,
        pan_masked=d.pan_masked,
        entries=[f"{e.seq}:{e.draft.kind}" for e in fam],
    )
    if d.kind is K.DECLINE:
        st.state = "declined"
        st.reason = memo_value(d.memo, "why")
        return st
    refund_rrns: dict[str, int] = {}
    fee_rrn = rrn + FEE_SUFFIX
    fee_backs: dict[str, int] = {}
    for e in fam:
        x = e.draft
        if x.original_rrn == rrn and x.kind is K.REFUND:
            refund_rrns[x.rrn] = x.amount_minor
            st.refunded_minor += x.amount_minor
        elif x.kind is K.REVERSAL and x.original_rrn in refund_rrns:
            st.refunded_minor -= refund_rrns.pop(x.original_rrn)
        elif x.original_rrn == rrn and x.kind is K.VOID:
            st.state = "voided"
        elif x.original_rrn == rrn and x.kind is K.REVERSAL:
            st.state = "reversed"
        elif x.kind is K.FEE and x.original_rrn == rrn:
            st.fee_minor += x.amount_minor
        elif x.kind is K.FEE_REFUND and x.original_rrn == fee_rrn:
            fee_backs[x.rrn] = x.amount_minor
            st.fee_refunded_minor += x.amount_minor
        elif x.kind is K.REVERSAL and x.original_rrn == fee_rrn:
            st.fee_minor -= x.amount_minor
        elif x.kind is K.REVERSAL and x.original_rrn in fee_backs:
            st.fee_refunded_minor -= fee_backs.pop(x.original_rrn)
    if st.state == "approved" and st.refunded_minor > 0:
        st.state = "fully_refunded" if st.refunded_minor >= st.amount_minor else "partly_refunded"
    return st


def memo_value(memo: str, key: str) -> str:
    """One `k=v` value of a processing memo (`flow=...;why=...`), "" when absent."""
    for part in memo.split(";"):
        k, sep, v = part.partition("=")
        if sep and k == key:
            return v
    return ""


# --- terminal reconciliation ----------------------------------------------------------------------
class TotalsLine(msgspec.Struct, frozen=True):
    count: int
    amount_minor: int


#: Settlement lines, ISO 8583:1987 (count field, amount field), as switch.sim.terminal and the
#: processing core use them.
LINES = ("credits", "credit_reversals", "debits", "debit_reversals")


class TerminalTotals(msgspec.Struct, frozen=True, kw_only=True):
    """What a terminal's 0500 declares for its open batch, line by line (fields 74-77, 86-89)."""

    terminal_id: str
    currency: str
    debits: TotalsLine = TotalsLine(0, 0)
    debit_reversals: TotalsLine = TotalsLine(0, 0)
    credits: TotalsLine = TotalsLine(0, 0)
    credit_reversals: TotalsLine = TotalsLine(0, 0)


class ReconLine(msgspec.Struct, frozen=True):
    name: str
    terminal_count: int
    terminal_amount_minor: int
    ledger_count: int
    ledger_amount_minor: int
    balanced: bool


class Reconciliation(msgspec.Struct, frozen=True):
    terminal_id: str
    currency: str
    from_seq: int
    balanced: bool
    lines: list[ReconLine]
    out_of_balance: list[ReconLine]


def ledger_line(d: EntryDraft, late_rrns: set[str]) -> str:
    """The settlement line an entry counts on for its terminal ("" for none). Only outcomes the
    terminal heard (outcome keys `tk:...:out`) and reversals of those count; a late approval and its
    reversal (keys `rrn:<rrn>:late` / `:rev`) count on no line."""
    kind = d.kind
    if kind in SALES or kind is K.REFUND or kind is K.VOID:
        if not d.idempotency_key.endswith(":out"):
            return ""
        return "debits" if kind in SALES else "credits" if kind is K.REFUND else "debit_reversals"
    if kind is K.REVERSAL and d.original_rrn not in late_rrns:
        undoes = reversal_undoes(d)
        if undoes == "sale":
            return "debit_reversals"
        if undoes == "refund":
            return "credit_reversals"
    return ""


def reconcile(declared: TerminalTotals, entries: Iterable[Entry], from_seq: int) -> Reconciliation:
    ledger = {name: [0, 0] for name in LINES}
    mine = [
        e.draft
        for e in entries
        if e.seq >= from_seq
        and e.draft.terminal_id == declared.terminal_id
        and e.draft.currency == declared.currency
    ]
    late_rrns = {d.rrn for d in mine if d.idempotency_key.endswith(":late")}
    for d in mine:
        name = ledger_line(d, late_rrns)
        if name:
            ledger[name][0] += 1
            ledger[name][1] += d.amount_minor
    lines = []
    for name in LINES:
        t: TotalsLine = getattr(declared, name)
        lc, la = ledger[name]
        lines.append(ReconLine(name, t.count, t.amount_minor, lc, la, (t.count, t.amount_minor) == (lc, la)))
    bad = [x for x in lines if not x.balanced]
    return Reconciliation(
        terminal_id=declared.terminal_id,
        currency=declared.currency,
        from_seq=from_seq,
        balanced=not bad,
        lines=lines,
        out_of_balance=bad,
    )
