"""Events fed to the processing core (`Processor.handle`). Each one is a fact the server observed.

The core never reads a clock: every event that can move time carries `now_ms` (milliseconds since the
Unix epoch, UTC, from the server's clock). Field dicts are pyiso8583's (str -> str); the server has
already decoded them and verified their MAC (a MAC failure is the server's answer, A0, and never
reaches the core).
"""

from __future__ import annotations

from typing import Any

import msgspec

from switch.codec.masking import masked_repr
from switch.ledger.model import Entry, EntryDraft

Fields = dict[str, Any]


class TerminalRequest(msgspec.Struct, frozen=True):
    """A decoded, MAC-verified request from a terminal connection."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    conn_id: int
    profile: str
    fields: Fields
    now_ms: int


class AcquirerAnswered(msgspec.Struct, frozen=True):
    """The acquirer's answer to `SendToAcquirer(txn_id)`, already matched by the link."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    txn_id: int
    fields: Fields
    now_ms: int


class AcquirerUnavailable(msgspec.Struct, frozen=True):
    """`SendToAcquirer(txn_id)` could NOT be delivered (no link up, link full, encode failed).

    `fields` hands back the undelivered request so the core can re-address it to a backup without ever
    keeping the PIN block itself. A link that drops after the frame was written is not this event: the
    outcome is unknown, so the server lets the deadline pass (or sends `DeadlinePassed` early).
    """

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    txn_id: int
    fields: Fields
    now_ms: int
    reason: str = ""


class DeadlinePassed(msgspec.Struct, frozen=True):
    """The `deadline_ms` of a `SendToAcquirer` has passed without an answer."""

    txn_id: int
    now_ms: int


class LedgerCommitted(msgspec.Struct, frozen=True):
    """The drafts of `Post(txn_id)` are durable (fsync done)."""

    txn_id: int
    entries: tuple[Entry, ...] = ()
    now_ms: int = 0


class LedgerFailed(msgspec.Struct, frozen=True):
    """The drafts of `Post(txn_id)` were NOT written. `conflict`: an idempotency key was already used
    with another payload (the request is a duplicate the core had forgotten)."""

    txn_id: int
    error: str
    now_ms: int = 0
    conflict: bool = False


class OriginalFound(msgspec.Struct, frozen=True):
    """Answer to `FindOriginal(txn_id)`: every ledger entry whose `rrn` or `original_rrn` is the
    original's RRN (empty when the ledger knows no such transaction)."""

    txn_id: int
    drafts: tuple[EntryDraft, ...]
    now_ms: int


class AcquirerHealth(msgspec.Struct, frozen=True):
    """An acquirer went up (at least one link signed on) or down (none)."""

    acquirer: str
    up: bool
    now_ms: int = 0


class StoreForwardCompleted(msgspec.Struct, frozen=True):
    """A queued reversal or advice got its final answer from the acquirer (store-and-forward)."""

    acquirer: str
    rrn: str
    kind: str  # "reversal" | "advice"
    response_code: str
    now_ms: int


class RrnsReserved(msgspec.Struct, frozen=True):
    """RRNs [start, start + count) are durably reserved for this process (switch.processing.rrn)."""

    start: int
    count: int


class Cutover(msgspec.Struct, frozen=True):
    """The business day closed at `now_ms`: voids of earlier purchases are refused; terminal batches
    close."""

    now_ms: int


class Tick(msgspec.Struct, frozen=True):
    """Periodic housekeeping (expire pre-authorisation holds). The server sends it e.g. once a second."""

    now_ms: int


class ArmedReversal(msgspec.Struct, frozen=True):
    """A pre-stored reversal still armed in store-and-forward when the process stopped."""

    __repr__ = masked_repr  # field dicts carry the PAN, track 2, PIN block

    acquirer: str
    rrn: str
    fields: Fields


class Recovered(msgspec.Struct, frozen=True):
    """Start-up state, fed once before any traffic.

    `drafts`: the ledger's entries since `business_day_start_ms` plus those of open holds, in sequence
    order. `armed`: pre-stored reversals still armed in store-and-forward. `queued_rrns`: RRNs of
    originals that store-and-forward already holds (or held) a live reversal for.
    """

    now_ms: int
    business_day_start_ms: int = 0
    drafts: tuple[EntryDraft, ...] = ()
    armed: tuple[ArmedReversal, ...] = ()
    queued_rrns: frozenset[str] = frozenset()


Event = (
    TerminalRequest
    | AcquirerAnswered
    | AcquirerUnavailable
    | DeadlinePassed
    | LedgerCommitted
    | LedgerFailed
    | OriginalFound
    | AcquirerHealth
    | StoreForwardCompleted
    | RrnsReserved
    | Cutover
    | Tick
    | Recovered
)
