"""Decisions returned by the processing core; the server carries them out IN ORDER.

Contract (docs/flows.md has the full table):
- `Reply` is only ever returned after the entries behind it are durable (`LedgerCommitted`).
- `SendToAcquirer.reversal` is the pre-stored reversal (EMV terminals' habit, applied to the switch):
  the server stores it ARMED in store-and-forward before the request leaves. Every armed reversal is
  later either fired (`QueueReversal` for the same acquirer and RRN) or dropped (`ReleaseReversal`), so
  a crash at any point leaves no approval at the acquirer that the ledger does not show.
- Field 11 of acquirer-side fields is left to the link (switch.routing.matching allocates its own STAN
  per link); field 37 is the switch's RRN.
- Sensitive fields (PIN block 52, track 2 35) appear only inside `SendToAcquirer.fields`; the core
  does not keep them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from switch.codec.masking import masked_repr
from switch.ledger.model import EntryDraft

Fields = dict[str, Any]


class SendToAcquirer(msgspec.Struct, frozen=True):
    """Send `fields` to `acquirer`; answer with AcquirerAnswered / AcquirerUnavailable / DeadlinePassed."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    txn_id: int
    acquirer: str
    fields: Fields
    deadline_ms: int
    reversal: Fields | None = None


class Post(msgspec.Struct, frozen=True):
    """Commit `drafts` to the ledger (one group-commit batch is fine); answer LedgerCommitted/Failed."""

    txn_id: int
    drafts: tuple[EntryDraft, ...]


class Reply(msgspec.Struct, frozen=True):
    """Encode, MAC and send `fields` to terminal connection `conn_id` (drop it if the connection closed)."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    conn_id: int
    fields: Fields
    txn_id: int = 0


class QueueReversal(msgspec.Struct, frozen=True):
    """Deliver this reversal (0400, repeated as 0401) through durable store-and-forward until answered;
    supersedes an armed reversal with the same (acquirer, rrn). Idempotent per (acquirer, rrn)."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    acquirer: str
    rrn: str
    fields: Fields


class ReleaseReversal(msgspec.Struct, frozen=True):
    """Drop the armed pre-stored reversal of (acquirer, rrn): its outcome is durable and final."""

    acquirer: str
    rrn: str


class QueueAdvice(msgspec.Struct, frozen=True):
    """Deliver this advice (0120/0220) through store-and-forward. Idempotent per (acquirer, rrn)."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    acquirer: str
    rrn: str
    fields: Fields


class FindOriginal(msgspec.Struct, frozen=True):
    """Look the original up in the ledger; answer OriginalFound(txn_id, drafts).

    Exactly one of `rrn` / `idempotency_key` is set. For the key, return the entry with that key and
    every entry naming its RRN (as rrn or original_rrn)."""

    txn_id: int
    rrn: str | None = None
    idempotency_key: str | None = None


class ReserveRrns(msgspec.Struct, frozen=True):
    """Durably reserve `count` more RRNs (advance the persisted high-water mark), then feed RrnsReserved."""

    count: int


class SignOn(msgspec.Struct, frozen=True):
    """Terminal sign-on or key change (0800, field 70 = 001/101): the server generates working keys
    under the terminal's master key, adds them (field 53/62/96 per profile) to `reply` and sends it."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    conn_id: int
    terminal_id: str
    merchant_id: str
    reply: Fields


class RecordLifecycle(msgspec.Struct, frozen=True):
    """A terminal lifecycle event merchant services acted on (issue 6): persist it in the registry.

    `event`: "sign_on" (first sign-on recorded), "approved" (a durable approval of `flow`: activation by
    the test transaction, or first live use) or "clock" (subscription lapsed past grace: suspended).
    The server re-applies the SAME event to the registry's current record (switch.merchant.service.
    MerchantService.apply_lifecycle) instead of writing the core's copy, so a concurrent operator change
    (a renewal) is never overwritten. `reason` is for the operator log."""

    terminal_id: str
    event: Literal["sign_on", "approved", "clock"]
    now_ms: int
    flow: str = ""
    reason: str = ""


class SettlementLine(msgspec.Struct, frozen=True):
    """One line of terminal totals: what the terminal said against what the ledger says."""

    name: str  # "credits" | "credit_reversals" | "debits" | "debit_reversals"
    terminal_count: int
    terminal_amount_minor: int
    ledger_count: int
    ledger_amount_minor: int

    @property
    def balanced(self) -> bool:
        return (self.terminal_count, self.terminal_amount_minor) == (
            self.ledger_count,
            self.ledger_amount_minor,
        )


class SettlementReport(msgspec.Struct, frozen=True):
    """The outcome of a 0500: every line, balanced or not, for the admin API and logs."""

    terminal_id: str
    merchant_id: str
    currency: str
    balanced: bool
    lines: tuple[SettlementLine, ...]
    at_ms: int


class Log(msgspec.Struct, frozen=True):
    """A notable event for the operator log. `text` is already masked (never a PAN, key or PIN block)."""

    level: Literal["debug", "info", "warning", "error"]
    event: str
    text: str
    txn_id: int = 0


Decision = (
    SendToAcquirer
    | Post
    | Reply
    | QueueReversal
    | ReleaseReversal
    | QueueAdvice
    | FindOriginal
    | ReserveRrns
    | SignOn
    | RecordLifecycle
    | SettlementReport
    | Log
)
