"""Which implementation of the ledger's per-entry loops runs: the Cython extension
`switch._speedups.ledger` (default when built) or the pure-Python reference.

Why a switch: the extension is an acceleration, never a second source of truth. The reference stays
importable and tested (SWITCH_LEDGER_PURE=1 at import, or `use_fast_path(False)` in tests), and a
missing or failed build slows the ledger down with one log line instead of stopping it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from switch.ledger import codec
from switch.ledger.model import EntryDraft, EntryKind, Posting, Side

log = logging.getLogger(__name__)

#: SWITCH_LEDGER_PURE=1 (read once, at import) forces the pure-Python loops.
PURE_REQUESTED: Final = os.environ.get("SWITCH_LEDGER_PURE", "").strip() not in ("", "0")

_ext: Any
try:
    from switch._speedups import ledger as _ext
except ImportError as exc:  # a failed build must slow the ledger down, not stop it
    _ext = None
    log.warning("ledger extension unavailable (%s); using the pure-Python loops", exc)

if _ext is not None and not _ext.configure(
    EntryDraft, EntryKind, Side, Posting,
    tuple(f.name for f in msgspec.structs.fields(EntryDraft)),
    msgspec.msgpack.Encoder().encode, msgspec.structs.astuple, hashlib.sha256,
    codec.MAX_ABS_AMOUNT_MINOR, codec.MAX_KEY_CHARS, codec.MAX_TEXT_CHARS, codec.MAX_MEMO_CHARS,
    codec.MAX_POSTINGS,
):  # fmt: skip
    log.warning("ledger extension does not match EntryDraft's fields; using the pure-Python loops")
    _ext = None

#: True while the Cython loops are used. Read it as `switch.ledger.fast.FAST_PATH`.
FAST_PATH: bool = _ext is not None and not PURE_REQUESTED


def use_fast_path(enabled: bool) -> bool:
    """Switch implementations at run time (tests); returns the previous state. Asking for the fast
    path without the extension raises, so a test can never think it covered it."""
    global FAST_PATH
    if enabled and _ext is None:
        raise RuntimeError("the ledger extension switch._speedups.ledger is not built")
    previous, FAST_PATH = FAST_PATH, enabled
    return previous


def prepare(draft: EntryDraft) -> bytes:
    """`codec.prepare`: the draft's canonical body, or InvalidDraft / UnbalancedEntry."""
    if FAST_PATH:
        body = _ext.prepare_body(draft)
        if body is not None:
            return body  # type: ignore[no-any-return]
    return codec.prepare(draft)


def normal(d: EntryDraft) -> bool:
    """True if the draft already holds the exact types decoding would give (the common case)."""
    return (
        type(d.kind) is EntryKind
        and type(d.postings) is tuple
        and all(type(p.side) is Side and type(p) is Posting for p in d.postings)
    )


def prepare_all(drafts: Sequence[EntryDraft]) -> tuple[Sequence[EntryDraft], list[bytes]]:
    """Validate one submission: (the drafts as the ledger will hold them, their canonical bodies).

    A draft the extension accepts is already of exact types (it checks them) and needs neither the
    msgpack decode round trip nor a copy; any other one goes through `codec.prepare`, and is replaced
    by its decoded form if it was valid but not of exact types (e.g. kind given as a plain str).
    Raises InvalidDraft / UnbalancedEntry for the first bad draft."""
    if FAST_PATH and len(drafts) == 1:  # one outcome, one entry: the switch's usual submission
        body = _ext.prepare_body(drafts[0])
        if body is not None:
            return drafts, [body]
    fast = _ext.prepare_body if FAST_PATH else None
    bodies: list[bytes] = []
    fixed: list[EntryDraft] | None = None
    for i, d in enumerate(drafts):
        body = fast(d) if fast is not None else None
        if body is None:
            body = codec.prepare(d)
            if not normal(d):
                if fixed is None:
                    fixed = list(drafts)
                fixed[i] = codec.decode_draft(body)
        bodies.append(body)
    return (drafts if fixed is None else fixed), bodies


def build_rows_ext() -> Any:
    """The extension's `build_rows`, or None when the pure-Python loop is to run."""
    return _ext.build_rows if FAST_PATH else None


def key_filter_stage_ext() -> Any:
    """The extension's KeyFilterStage class, or None when the pure-Python stage is to run."""
    return _ext.KeyFilterStage if FAST_PATH else None


def sqlite_batch_writer() -> Any:
    """The extension's SqliteBatchWriter class (switch.ledger.sqlite: batches committed with the GIL
    released), or None when the pure-Python path runs or the extension cannot reach the libsqlite3
    the sqlite3 module uses (through the _sqlite3 module's own handle, same version)."""
    if not FAST_PATH or not hasattr(_ext, "sqlite_batch_writes"):
        return None
    import sqlite3  # noqa: F401  (loads _sqlite3, which the extension looks up but never loads)

    if not _ext.sqlite_batch_writes():
        return None
    return _ext.SqliteBatchWriter
