"""One transaction as the core knows it: live while it is processed, then a record that later
voids, refunds, completions, reversals and repeats consult.

The same `Txn` object is the live state machine and the remembered outcome, so an answer replayed to a
repeat, a refund's remainder and the settlement totals all read one truth. Its outcome fields change
only when ledger entries are durable (`switch.processing.fold.apply`), never on an in-flight decision.

Memo: entries carry a few facts the ledger model has no column for, as `k=v;k=v` text in
`EntryDraft.memo` (flow, acquirer, authorisation code, the acquirer-side STAN and transmission time), so a
record can be rebuilt from the ledger alone after a restart.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from switch.ledger.model import EntryDraft
from switch.processing.request import Flow


class Stage(enum.StrEnum):
    """Where a live transaction is (docs/flows.md draws the machine)."""

    NEW = "new"
    LOOKUP = "lookup"  # waiting for OriginalFound
    AWAITING = "awaiting"  # sent to an acquirer, waiting for its answer or the deadline
    POSTING = "posting"  # outcome entries submitted, waiting for LedgerCommitted / LedgerFailed
    DONE = "done"  # the terminal has been answered (or the record came from the ledger)


class Status(enum.StrEnum):
    """The outcome as the ledger shows it."""

    PENDING = "pending"
    APPROVED = "approved"
    DECLINED = "declined"
    TIMED_OUT = "timed_out"
    REVERSED = "reversed"
    VOIDED = "voided"


class Hold(enum.StrEnum):
    NONE = ""
    OPEN = "open"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


class Txn(msgspec.Struct, kw_only=True):
    txn_id: int = 0
    flow: Flow
    rrn: str = ""
    key: str = ""  # terminal key
    mti: str = ""
    terminal_id: str = ""
    merchant_id: str = ""
    at_ms: int = 0
    amount_minor: int = 0
    currency: str = ""
    processing_code: str = ""
    pan_masked: str = ""
    pan_hash: str = ""
    original_rrn: str = ""
    # outcome (set from durable entries)
    status: Status = Status.PENDING
    response_code: str = ""  # what the terminal heard / will hear
    auth_code: str = ""
    acquirer: str = ""
    acq_stan: str = ""
    acq_datetime: str = ""  # field 7 sent to the acquirer, MMDDhhmmss
    stand_in: bool = False
    late_approved: bool = False
    refunded_minor: int = 0
    refund_pending_minor: int = 0
    hold: Hold = Hold.NONE
    busy: bool = False  # a void / reversal / completion acting on this original is being posted
    reversal_queued: bool = False  # the switch queued a reversal of this transaction's acquirer request
    late_seen: bool = False
    # merchant fees (issue 6), from durable FEE / FEE_REFUND entries
    fee: EntryDraft | None = None  # a sale's FEE entry (what refunds return and reversals undo)
    fee_closed: bool = False  # the sale's fee was reversed (void / reversal of the sale)
    fee_returned_minor: int = 0  # a sale's fee returned by refunds (FEE_REFUND minus reversed ones)
    fee_back_minor: int = 0  # a refund's own FEE_REFUND amount (0 once reversed)
    # refunds and fee returns approved and being posted (not yet in refunded/fee_returned): the basis
    # of the next refund's pro-rata fee while several refunds of one sale commit in the same batch
    refund_posting_minor: int = 0
    fee_returning_minor: int = 0
    # live only
    stage: Stage = Stage.DONE
    conn_ids: list[int] = []
    reply_base: dict[str, Any] = {}
    reply_extra: dict[str, Any] = {}
    received_ms: int = 0
    deadline_ms: int = 0
    tried: list[str] = []
    original: Txn | None = None
    candidates: list[str] = []  # idempotency keys still to try for FindOriginal
    pan: str = ""  # kept only while live (refunds/voids/advices need field 2); cleared when done
    expiry_yymm: str = ""
    pos_fields: dict[str, Any] = {}  # 22/25/... forwarded to the acquirer; never 35, 52
    pending_reserved: bool = False  # a refund holding refund_pending_minor on its original
    terminal_cfg: Any = None
    merchant_cfg: Any = None

    def __repr__(self) -> str:
        return (
            f"Txn({self.txn_id}, {self.flow}, rrn={self.rrn}, {self.status}, rc={self.response_code},"
            f" {self.amount_minor} {self.currency}, {self.pan_masked}, stage={self.stage})"
        )

    __str__ = __repr__

    def memo(self) -> str:
        parts = [f"flow={self.flow}"]
        for k, v in (
            ("acq", self.acquirer),
            ("auth", self.auth_code),
            ("stan", self.acq_stan),
            ("dt", self.acq_datetime),
            ("pc", self.processing_code),
        ):
            if v:
                parts.append(f"{k}={_clean(v)}")
        if self.stand_in:
            parts.append("si=1")
        if self.reversal_queued:
            parts.append("rq=1")
        return ";".join(parts)


def _clean(v: str) -> str:
    return v.replace(";", "_").replace("=", "_")


def clean_memo(v: str) -> str:
    """`v` made safe as a memo value (no `;` or `=`)."""
    return _clean(v)


def parse_memo(memo: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in memo.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k] = v
    return out


# Idempotency keys: derived only from the terminal key or the RRN, so a retry after any crash produces
# the same key and the ledger refuses to post twice.
def outcome_key(terminal_key: str) -> str:
    return f"tk:{terminal_key}:out"


def rrn_key(rrn: str, role: str) -> str:
    """role: rev (reversal / hold void), late (late approval), expiry, advice-refused."""
    return f"rrn:{rrn}:{role}"


def key_role(idempotency_key: str) -> str:
    return idempotency_key.rpartition(":")[2]


def key_terminal_key(idempotency_key: str) -> str:
    """The terminal key inside an outcome key ('' for RRN keys)."""
    if idempotency_key.startswith("tk:"):
        return idempotency_key[3:].rpartition(":")[0]
    return ""
