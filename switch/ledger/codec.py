"""Canonical bytes of an entry: the Merkle leaf input and the stored `entries.body`.

entry bytes = 0x01 (format) || seq as 8 bytes big-endian || body
body        = msgpack array of the EntryDraft fields in declaration order (postings as arrays)

msgspec encodes integers minimally and strings as UTF-8, and the array holds every field, so one draft
has exactly one encoding; an array instead of a map keeps field names out of every stored row (row
size is most of the cost of a SQLite insert). A field added to EntryDraft later (with a default, at
the end) simply makes newer arrays longer: old bodies still decode and still hash to their leaves.
The body alone is what idempotency
compares ("same payload" = same bytes) and what `entries.body` stores; the seq goes in front so a row
moved to another position no longer hashes to its leaf. Decoding the bytes back with type=EntryDraft is
also the ledger's input validation: a draft whose fields have the wrong types cannot be written.
"""

from __future__ import annotations

import re
import struct

import msgspec

from switch.ledger.model import Entry, EntryDraft, EntryKind, Side, UnbalancedEntry

ENTRY_FORMAT = 1
_HEADER = struct.Struct(">BQ")
_encoder = msgspec.msgpack.Encoder()
_FIELDS = msgspec.structs.fields(EntryDraft)
_FIELD_NAMES = tuple(f.name for f in _FIELDS)
#: The body's wire form: EntryDraft's fields, types and defaults, as an array.
_Wire = msgspec.defstruct(
    "_Wire",
    [(f.name, f.type, f.default if f.default is not msgspec.NODEFAULT else msgspec.field()) for f in _FIELDS],
    array_like=True,
    frozen=True,
)
_wire_decoder = msgspec.msgpack.Decoder(_Wire)
_astuple = msgspec.structs.astuple

#: Field limits checked on every draft (bytes of UTF-8 text; named so they show up in errors).
MAX_KEY_CHARS = 128
MAX_TEXT_CHARS = 64
MAX_MEMO_CHARS = 512
MAX_POSTINGS = 64
MAX_ABS_AMOUNT_MINOR = 10**15

_CURRENCY = re.compile(r"[0-9]{3}|[A-Z]{3}").fullmatch
_PAN_HASH = re.compile(r"[0-9a-f]{64}").fullmatch
#: What switch.codec.masking.mask_pan produces: up to 6 digits, stars, up to 4 digits.
_PAN_MASKED = re.compile(r"[0-9]{0,6}\**[0-9]{0,4}").fullmatch
_DEBIT = Side.DEBIT


class InvalidDraft(ValueError):
    """A draft the ledger will not store (wrong types, missing fields, card data, limits)."""


def draft_bytes(draft: EntryDraft) -> bytes:
    return _encoder.encode(_astuple(draft))


def decode_draft(body: bytes) -> EntryDraft:
    """The draft stored in `body`; raises msgspec.DecodeError / ValidationError if it is not one."""
    wire = _wire_decoder.decode(body)
    return EntryDraft(**dict(zip(_FIELD_NAMES, _astuple(wire))))


def entry_bytes(seq: int, body: bytes) -> bytes:
    return _HEADER.pack(ENTRY_FORMAT, seq) + body


def entry_from_body(seq: int, body: bytes) -> Entry:
    return Entry(seq=seq, draft=decode_draft(body))


def prepare(draft: EntryDraft) -> bytes:
    """Validate a draft and return its canonical bytes; raise InvalidDraft / UnbalancedEntry.

    Errors never quote pan_masked or pan_hash values (they may be exactly what is wrong)."""
    try:
        body = _encoder.encode(_astuple(draft))
        w = _wire_decoder.decode(body)  # type validation at the boundary
    except (msgspec.ValidationError, msgspec.EncodeError, TypeError, AttributeError, OverflowError) as exc:
        raise InvalidDraft(f"draft {getattr(draft, 'idempotency_key', '?')!r}: {exc}") from None
    key = w.idempotency_key
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidDraft(f"idempotency_key must be 1..{MAX_KEY_CHARS} characters")
    if not w.rrn:
        raise InvalidDraft(f"draft {key!r}: rrn is required")
    if max(len(w.rrn), len(w.original_rrn), len(w.response_code), len(w.merchant_id), len(w.terminal_id),
           len(w.pan_masked)) > MAX_TEXT_CHARS:  # fmt: skip
        raise InvalidDraft(f"draft {key!r}: a text field is longer than {MAX_TEXT_CHARS} characters")
    if len(w.memo) > MAX_MEMO_CHARS:
        raise InvalidDraft(f"draft {key!r}: memo longer than {MAX_MEMO_CHARS} characters")
    if w.pan_masked and not _PAN_MASKED(w.pan_masked):
        raise InvalidDraft(f"draft {key!r}: pan_masked must show at most the BIN and the last 4 digits")
    if w.pan_hash and not _PAN_HASH(w.pan_hash):
        raise InvalidDraft(f"draft {key!r}: pan_hash must be 64 lower-case hex digits (HMAC-SHA-256)")
    if not 0 <= w.amount_minor <= MAX_ABS_AMOUNT_MINOR:
        raise InvalidDraft(f"draft {key!r}: amount_minor {w.amount_minor} out of range")
    if w.currency and not _CURRENCY(w.currency):
        raise InvalidDraft(f"draft {key!r}: currency {w.currency!r} is not ISO 4217")
    postings = w.postings
    if len(postings) > MAX_POSTINGS:
        raise InvalidDraft(f"draft {key!r}: more than {MAX_POSTINGS} postings")
    if w.kind is EntryKind.DECLINE and postings:
        raise InvalidDraft(f"draft {key!r}: a decline records no postings")
    net: dict[str, int] = {}
    for p in postings:
        amount, currency = p.amount_minor, p.currency
        if not 0 < amount <= MAX_ABS_AMOUNT_MINOR:
            raise UnbalancedEntry(f"draft {key!r}: posting to {p.account!r} has amount {amount}")
        if not p.account or len(p.account) > MAX_KEY_CHARS or not _CURRENCY(currency):
            raise InvalidDraft(f"draft {key!r}: posting to {p.account!r} has a bad account or currency")
        net[currency] = net.get(currency, 0) + (amount if p.side is _DEBIT else -amount)
    if any(net.values()):
        raise UnbalancedEntry(f"draft {key!r}: postings do not balance: {net}")
    return body
