"""One transaction as the core knows it: live while it is processed, then a record that later
voids, refunds, completions, reversals and repeats consult.

A live `Txn` is the state machine; once the terminal is answered the book keeps a `Done` in its place
(the same fields minus what only the live transaction needed, untracked by the cyclic GC), and an answer
replayed to a repeat, a refund's remainder and the settlement totals all read that one record. Outcome
fields change only when ledger entries are durable (`switch.processing.book.Book.apply`), never on an
in-flight decision.

Memo: entries carry a few facts the ledger model has no column for, as `k=v;k=v` text in
`EntryDraft.memo` (flow, acquirer, authorisation code, the acquirer-side STAN and transmission time), so a
record can be rebuilt from the ledger alone after a restart.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from switch.ledger.model import EntryDraft
from switch.merchant import drafts as merchant_drafts
from switch.processing.request import Flow

#: RRN suffix of merchant fee entries (switch.merchant.drafts.fee_rrn).
FEE_SUFFIX = merchant_drafts.fee_rrn("")


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


class Record(msgspec.Struct):
    """What a transaction is, live or remembered: identity, amounts, and the outcome as the ledger shows
    it. `Txn` adds what only a live transaction needs; `Done` is the compact form kept afterwards."""

    txn_id: int = 0
    flow: Flow = Flow.PURCHASE
    rrn: str = ""
    key: str = ""  # terminal key
    mti: str = ""
    terminal_id: str = ""
    merchant_id: str = ""
    at_ms: int = 0
    amount_minor: int = 0
    currency: str = ""
    processing_code: str = ""
    original_rrn: str = ""
    # outcome (set from durable entries)
    status: Status = Status.PENDING
    response_code: str = ""  # what the terminal heard / will hear
    acquirer: str = ""
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
    fee_minor: int = -1  # a sale's FEE entry amount (-1: none); see `fee` (its memo: `fee_memo`)
    fee_closed: bool = False  # the sale's fee was reversed (void / reversal of the sale)
    fee_returned_minor: int = 0  # a sale's fee returned by refunds (FEE_REFUND minus reversed ones)
    fee_back_minor: int = 0  # a refund's own FEE_REFUND amount (0 once reversed)
    # refunds and fee returns approved and being posted (not yet in refunded/fee_returned): the basis
    # of the next refund's pro-rata fee while several refunds of one sale commit in the same batch
    refund_posting_minor: int = 0
    fee_returning_minor: int = 0
    # also on both, stored apart (see Done): pan_masked, pan_hash, auth_code, acq_stan, fee_memo
    if TYPE_CHECKING:
        pan_masked: str
        pan_hash: str
        auth_code: str
        acq_stan: str
        fee_memo: str

    @property
    def fee(self) -> EntryDraft | None:
        """The sale's FEE entry (what refunds return and reversals undo), rebuilt from the two fields
        kept of it by the one function that made it (switch.merchant.drafts.fee: `<sale rrn>/fee` for the
        sale's merchant, terminal and currency, so only the amount and the terms memo vary)."""
        if self.fee_minor < 0:
            return None
        return merchant_drafts.fee(
            self.rrn,
            self.merchant_id,
            self.terminal_id,
            self.fee_minor,
            self.currency,
            self.at_ms,
            self.fee_memo,
        )

    @fee.setter
    def fee(self, entry: EntryDraft | None) -> None:
        if entry is None:
            self.fee_minor, self.fee_memo = -1, ""
        else:
            self.fee_minor, self.fee_memo = entry.amount_minor, entry.memo

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.txn_id}, {self.flow}, rrn={self.rrn}, {self.status},"
            f" rc={self.response_code}, {self.amount_minor} {self.currency}, {self.pan_masked},"
            f" stage={self.stage})"  # type: ignore[attr-defined]
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


class Txn(Record, kw_only=True):
    """A live transaction: the state machine while it is processed (GC-tracked: lists and dicts)."""

    pan_masked: str = ""
    pan_hash: str = ""
    auth_code: str = ""
    acq_stan: str = ""  # field 11 of the acquirer's answer
    fee_memo: str = ""  # the sale's FEE entry memo (the fee terms refunds are priced with)
    stage: Stage = Stage.DONE
    conn_ids: list[int] = []
    reply_base: dict[str, Any] = {}
    reply_extra: dict[str, Any] = {}
    received_ms: int = 0
    deadline_ms: int = 0
    tried: list[str] = []
    original: Record | None = None
    candidates: list[str] = []  # idempotency keys still to try for FindOriginal
    pan: str = ""  # kept only while live (refunds/voids/advices need field 2); cleared when done
    expiry_yymm: str = ""
    pos_fields: dict[str, Any] = {}  # 22/25/... forwarded to the acquirer; never 35, 52
    pending_reserved: bool = False  # a refund holding refund_pending_minor on its original
    is_original: bool = False  # another live transaction named this one as its original while live
    terminal_cfg: Any = None
    merchant_cfg: Any = None


_NOTHING: Mapping[str, Any] = MappingProxyType({})


class Done(Record, gc=False):
    """A finished transaction as the core remembers it for repeats, voids, refunds, completions,
    reversals, fees and settlement totals: scalars only, so the cyclic GC never tracks it (a full
    collection does not walk the up to a million kept; msgspec `gc=False`, safe because nothing it holds
    can refer back to it). Its outcome fields still change in place as durable entries arrive.

    What a live `Txn` has beyond it reads as empty here (class attributes, read-only), so code that
    looks at an original reads either form alike; the answer a repeat replays is rebuilt from the
    repeat's own echoed fields plus these."""

    reply_extra: tuple[tuple[str, Any], ...] = ()  # answer fields replayed to repeats (54), not 55
    #: pan_masked, pan_hash, auth_code, acq_stan and fee_memo in one string (`pack`): one object
    #: instead of five, ~190 bytes less per record; read and written through the properties below
    packed: str = ""
    stage: ClassVar[Stage] = Stage.DONE
    pan: ClassVar[str] = ""
    expiry_yymm: ClassVar[str] = ""
    original: ClassVar[None] = None
    reply_base: ClassVar[Mapping[str, Any]] = _NOTHING
    pos_fields: ClassVar[Mapping[str, Any]] = _NOTHING
    conn_ids: ClassVar[tuple[int, ...]] = ()
    tried: ClassVar[tuple[str, ...]] = ()
    candidates: ClassVar[tuple[str, ...]] = ()
    pending_reserved: ClassVar[bool] = False
    is_original: ClassVar[bool] = False
    received_ms: ClassVar[int] = 0
    deadline_ms: ClassVar[int] = 0
    terminal_cfg: ClassVar[None] = None
    merchant_cfg: ClassVar[None] = None

    def parts(self) -> tuple[str, str, str, str, str]:
        """(pan_masked, pan_hash, auth_code, acq_stan, fee_memo)."""
        p = self.packed
        if not p:
            return ("", "", "", "", "")
        a = 4 + ord(p[0])
        b = a + ord(p[1])
        c = b + ord(p[2])
        d = c + ord(p[3])
        return (p[4:a], p[a:b], p[b:c], p[c:d], p[d:])

    def repack(
        self,
        *,
        pan_masked: str | None = None,
        pan_hash: str | None = None,
        auth_code: str | None = None,
        acq_stan: str | None = None,
        fee_memo: str | None = None,
    ) -> None:
        """Set any of the five packed strings at once (None: keep it)."""
        pm, ph, ac, st, fm = self.parts()
        self.packed = pack(
            pm if pan_masked is None else pan_masked,
            ph if pan_hash is None else pan_hash,
            ac if auth_code is None else auth_code,
            st if acq_stan is None else acq_stan,
            fm if fee_memo is None else fee_memo,
        )


_PACKED_NAMES = ("pan_masked", "pan_hash", "auth_code", "acq_stan", "fee_memo")


def pack(pan_masked: str, pan_hash: str, auth_code: str, acq_stan: str, fee_memo: str) -> str:
    """The five strings as one: their first four lengths as characters, then the strings. Any content
    survives (no separator to escape); lengths under 128 keep it an ASCII string."""
    if not (pan_masked or pan_hash or auth_code or acq_stan or fee_memo):
        return ""
    return (  # the last part runs to the end: no length kept for it
        f"{chr(len(pan_masked))}{chr(len(pan_hash))}{chr(len(auth_code))}{chr(len(acq_stan))}"
        f"{pan_masked}{pan_hash}{auth_code}{acq_stan}{fee_memo}"
    )


def _packed_part(i: int, name: str) -> property:
    def get(self: Done) -> str:
        return self.parts()[i]

    def put(self: Done, value: str) -> None:
        self.repack(**{name: value})

    return property(get, put, doc=f"{name} (kept in `packed`)")


for _i, _name in enumerate(_PACKED_NAMES):
    setattr(Done, _name, _packed_part(_i, _name))
del _i, _name

_intern = sys.intern
_DONE_FIELDS = (
    "txn_id",
    "flow",
    "rrn",
    "key",
    "mti",
    "terminal_id",
    "merchant_id",
    "at_ms",
    "amount_minor",
    "currency",
    "processing_code",
    "original_rrn",
    "status",
    "response_code",
    "acquirer",
    "acq_datetime",
    "stand_in",
    "late_approved",
    "refunded_minor",
    "refund_pending_minor",
    "hold",
    "busy",
    "reversal_queued",
    "late_seen",
    "fee_minor",
    "fee_closed",
    "fee_returned_minor",
    "fee_back_minor",
    "refund_posting_minor",
    "fee_returning_minor",
    "reply_extra",
    "packed",
)
if Done.__struct_fields__ != _DONE_FIELDS:  # pragma: no cover - a field added or moved without done()
    raise RuntimeError("done() builds a Done positionally: keep _DONE_FIELDS and done() in step")


def done(txn: Txn) -> Done:
    """The compact record of a finished `txn`. Strings shared by many transactions (MTI, terminal,
    merchant, currency, processing and response codes, acquirer) are interned: each request decoded its
    own copies."""
    extra = txn.reply_extra
    return Done(  # positional, in field order (_DONE_FIELDS): ~6x cheaper than keywords
        txn.txn_id,
        txn.flow,
        txn.rrn,
        txn.key,
        _intern(txn.mti),
        _intern(txn.terminal_id),
        _intern(txn.merchant_id),
        txn.at_ms,
        txn.amount_minor,
        _intern(txn.currency),
        _intern(txn.processing_code),
        txn.original_rrn,
        txn.status,
        _intern(txn.response_code),
        _intern(txn.acquirer),
        txn.acq_datetime,
        txn.stand_in,
        txn.late_approved,
        txn.refunded_minor,
        txn.refund_pending_minor,
        txn.hold,
        txn.busy,
        txn.reversal_queued,
        txn.late_seen,
        txn.fee_minor,
        txn.fee_closed,
        txn.fee_returned_minor,
        txn.fee_back_minor,
        txn.refund_posting_minor,
        txn.fee_returning_minor,
        tuple((k, v) for k, v in extra.items() if k != "55") if extra else (),
        pack(txn.pan_masked, txn.pan_hash, txn.auth_code, txn.acq_stan, txn.fee_memo),
    )


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
