"""Settlement and status folds over ledger entries. Pure: callers hand in committed `Entry`s.

Settlement report per (merchant, currency) over a batch (entries with from_seq <= seq < to_seq):
- gross: sales (purchase, capture, stand-in) minus voids and reversals of those sales;
- refunds: refunds minus reversed refunds;
- fees: FEE minus FEE_REFUND; deposits: DEPOSIT minus DEPOSIT_REFUND; subscriptions: SUBSCRIPTION
  minus SUBSCRIPTION_REFUND;
- net payable = gross - refunds - fees - deposits - subscriptions.
Cross-check: the same number must equal the movement of the merchant's payable account over the batch
(settlement entries excluded); `payable_check_minor` carries it and `balanced` says whether they agree.

Terminal reconciliation (0500): the terminal's declared totals against the ledger's for that terminal
in the open batch, line by line (sales, refunds, voids and reversals); every out-of-balance line listed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

import msgspec

from switch.ledger.model import Entry, EntryKind, Side, accounts

K = EntryKind
SALES = frozenset({K.PURCHASE, K.CAPTURE, K.STAND_IN})


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
    kind_of_rrn: dict[str, EntryKind] = {}
    for e in entries:
        d = e.draft
        if not (from_seq <= e.seq < to_seq) or not d.merchant_id or d.kind in (K.DECLINE, K.SETTLEMENT):
            continue
        if d.kind in SALES or d.kind is K.REFUND:
            kind_of_rrn.setdefault(d.rrn, d.kind)
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
            # Reversal of a refund gives the refund back; of anything else (sales): undoes the sale.
            if kind_of_rrn.get(d.original_rrn) is K.REFUND:
                s.refunds_minor -= a
            else:
                s.gross_minor -= a
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
    fee_minor: int = 0
    response_code: str = ""
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
        return st
    refund_rrns: dict[str, int] = {}
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
    if st.state == "approved" and st.refunded_minor > 0:
        st.state = "fully_refunded" if st.refunded_minor >= st.amount_minor else "partly_refunded"
    return st


# --- terminal reconciliation ----------------------------------------------------------------------
class TotalsLine(msgspec.Struct, frozen=True):
    count: int
    amount_minor: int


class TerminalTotals(msgspec.Struct, frozen=True, kw_only=True):
    """What a terminal's 0500 declares for its open batch."""

    terminal_id: str
    currency: str
    sales: TotalsLine
    refunds: TotalsLine
    voids: TotalsLine = TotalsLine(0, 0)
    reversals: TotalsLine = TotalsLine(0, 0)


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


def reconcile(declared: TerminalTotals, entries: Iterable[Entry], from_seq: int) -> Reconciliation:
    ledger = {"sales": [0, 0], "refunds": [0, 0], "voids": [0, 0], "reversals": [0, 0]}
    for e in entries:
        d = e.draft
        if e.seq < from_seq or d.terminal_id != declared.terminal_id or d.currency != declared.currency:
            continue
        name = (
            "sales"
            if d.kind in SALES
            else "refunds"
            if d.kind is K.REFUND
            else "voids"
            if d.kind is K.VOID
            else "reversals"
            if d.kind is K.REVERSAL
            else ""
        )
        if name:
            ledger[name][0] += 1
            ledger[name][1] += d.amount_minor
    lines = []
    for name in ("sales", "refunds", "voids", "reversals"):
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
