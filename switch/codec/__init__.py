"""ISO 8583 codec: specs, encode/decode (fast and reference), framing, MAC and masking. Pure: no I/O.

`decode(data, spec)` and `encode(fields, spec)` have pyiso8583's signatures and results: the same
bytes, the same two dicts (encode also fills in "p"/"1" of the dict it is given), and for bad input the
same exception: `DecodeError`/`EncodeError` here are subclasses of pyiso8583's with the same `msg`,
`field`, `pos` and partial dicts; other exceptions pyiso8583 lets escape (TypeError for a non-bytes
input, KeyError for a field the spec lacks) escape unchanged.

For the switch's own hot path, `decode_fields(data, spec)` is `decode(...)[0]` and
`encode_bytes(fields, spec)` is `encode(...)[0]` without touching `fields`: they skip pyiso8583's
per-field "encoded" dict, which costs more to build than everything else together (docs/messages.md).

Two paths:
- fast (`FAST_PATH` true): the Cython extension `switch._speedups.codec` runs a plan compiled once per
  spec object (switch.codec.plan). It returns only for input it is certain about; anything malformed or
  outside what the plan covers is handed to the reference path, so errors are produced by pyiso8583.
- reference: pyiso8583 itself. Used when the extension is missing, when SWITCH_CODEC_PURE=1 is set in
  the environment at import, or after `use_fast_path(False)`.

On CPython 3.11 the fast path fills the result dicts in place: each is a copy of a per-bitmap (or
per-pair) template whose values it replaces directly in CPython's table instead of through
PyDict_SetItem, which was ~40% of building pyiso8583's result (docs/performance.md, "Codec"). That
relies on CPython 3.11's private dict layout, so it is guarded (compiled for 3.11 only, a self-test at
import, a layout check per copy, each entry's key compared before it is written) and falls back to
PyDict_SetItem when anything does not match. SWITCH_CODEC_DICT_FILL=0 at import, or
`configure(fill_dicts_in_place=False)`, turns it off; results are identical either way.

Errors carry no card data, in their text or anywhere else (an exception travels: a log record with
exc_info, a traceback formatter that prints attributes, a pickle to another process). Compared with
pyiso8583's own:
- the message goes through `masking.scrub_text` (pyiso8583 quotes offending dict *keys* in two encode
  errors, and a numeric key can be a PAN pasted in the wrong place);
- `doc_dec` is `masking.mask_fields` of pyiso8583's partial dict: MTI, STAN, terminal id and the other
  fields a caller answering a format error needs stay readable, the PAN is BIN + last 4, track data,
  PIN block, ICC data and MACs are replaced by their length;
- `doc_enc` is `masking.mask_encoded_fields` of pyiso8583's: length prefixes stay, field bytes only
  where they cannot be card data;
- `s` (the raw message) is b"": it cannot be masked field by field once the message is malformed;
- `field`, `pos` and `msg` are unchanged, and there is no `__cause__`/`__context__` (pyiso8583 raises
  from inside `except` blocks whose exceptions, UnicodeDecodeError's `.object` for one, hold the raw
  field bytes).
Other exceptions pyiso8583 lets escape keep their type and scrubbed text, without their chain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Final

import iso8583

from switch.codec.masking import mask_encoded_fields, mask_fields, scrub_text
from switch.codec.plan import SpecPlan, compile_spec
from switch.codec.specs import SPECS, get_spec

__all__ = [
    "FAST_PATH",
    "SPECS",
    "DecodeError",
    "EncodeError",
    "configure",
    "decode",
    "decode_fields",
    "encode",
    "encode_bytes",
    "forget_spec",
    "get_spec",
    "uncovered",
    "use_fast_path",
]

log = logging.getLogger(__name__)

#: Plans kept at once (one per spec object in use; a switch has a handful). Oldest is dropped first.
DEFAULT_MAX_CACHED_PLANS: Final = 64
#: Distinct "fast path does not cover" warnings remembered, so each is logged once.
MAX_WARNED_SPECS: Final = 1024

DecodedDict = dict[str, str]
EncodedDict = dict[str, dict[str, bytes]]


class DecodeError(iso8583.DecodeError):
    """pyiso8583's DecodeError with its card data masked: message, doc_dec and doc_enc masked, s
    emptied; field and pos as pyiso8583 set them (module docstring)."""

    @classmethod
    def masked(cls, e: iso8583.DecodeError) -> DecodeError:
        doc_dec = mask_fields(e.doc_dec) if isinstance(e.doc_dec, Mapping) else {}
        doc_enc = mask_encoded_fields(e.doc_enc) if isinstance(e.doc_enc, Mapping) else {}
        return cls(scrub_text(e.msg), b"", doc_dec, doc_enc, e.pos, e.field)


class EncodeError(iso8583.EncodeError):
    """pyiso8583's EncodeError with its card data masked: message, doc_dec and doc_enc masked (the
    caller's own dict is not touched); field as pyiso8583 set it."""

    @classmethod
    def masked(cls, e: iso8583.EncodeError) -> EncodeError:
        doc_dec = mask_fields(e.doc_dec) if isinstance(e.doc_dec, Mapping) else {}
        doc_enc = mask_encoded_fields(e.doc_enc) if isinstance(e.doc_enc, Mapping) else {}
        return cls(scrub_text(e.msg), doc_dec, doc_enc, e.field)


def _scrubbed(exc: Exception) -> Exception:
    """The exception to raise for one pyiso8583 let escape: itself without its chain when its text is
    clean, else a copy of its type with the text scrubbed (its args may quote the data)."""
    text = str(exc)
    clean = scrub_text(text)
    if clean == text:
        exc.__cause__ = exc.__context__ = None
        exc.__suppress_context__ = True
        return exc.with_traceback(None)
    try:
        return type(exc)(clean)
    except Exception:
        return ValueError(clean)


def _reference_decode(s: Any, spec: Mapping[str, Any]) -> tuple[DecodedDict, EncodedDict]:
    """pyiso8583.decode with its errors re-raised as ours (outside the except block: no __context__)."""
    error: Exception | None = None
    try:
        return iso8583.decode(s, spec)
    except iso8583.DecodeError as e:
        error = DecodeError.masked(e)
    except Exception as e:
        error = _scrubbed(e)
    raise error


def _reference_encode(doc_dec: Any, spec: Mapping[str, Any]) -> tuple[bytearray, EncodedDict]:
    """pyiso8583.encode with its errors re-raised as ours."""
    error: Exception | None = None
    try:
        return iso8583.encode(doc_dec, spec)
    except iso8583.EncodeError as e:
        error = EncodeError.masked(e)
    except Exception as e:
        error = _scrubbed(e)
    raise error


_warned: set[tuple[str, tuple[str, ...]]] = set()


def _spec_name(spec: Any) -> str:
    for name, known in SPECS.items():
        if known is spec:
            return name
    return f"<spec at {id(spec):#x}>"


def _compile_plan(spec: Mapping[str, Any]) -> Any:
    """Called by the extension on a spec it has not seen: compile, warn once about uncovered parts."""
    plan: SpecPlan = compile_spec(spec)
    if plan.uncovered:
        key = (_spec_name(spec), plan.uncovered)
        if key not in _warned and len(_warned) < MAX_WARNED_SPECS:
            _warned.add(key)
            log.warning(
                "codec fast path does not cover %s of spec %s; messages using them go through pyiso8583",
                "; ".join(plan.uncovered),
                key[0],
            )
    return _fast.Plan(plan)


_fast: Any
try:
    from switch._speedups import codec as _fast
except ImportError as exc:  # a failed build must slow the switch down, not stop it
    _fast = None
    log.warning("codec extension unavailable (%s); using pyiso8583 for every message", exc)

#: SWITCH_CODEC_PURE=1 (read once, at import) forces pyiso8583 everywhere.
PURE_REQUESTED: Final = os.environ.get("SWITCH_CODEC_PURE", "").strip() not in ("", "0")
#: SWITCH_CODEC_DICT_FILL=0 (read once, at import) builds result dicts through PyDict_SetItem only.
DICT_FILL_REFUSED: Final = os.environ.get("SWITCH_CODEC_DICT_FILL", "").strip() == "0"

#: True while the Cython path is active. Read it as `switch.codec.FAST_PATH` (it changes with
#: use_fast_path), not via `from switch.codec import FAST_PATH`.
FAST_PATH: bool = False

if _fast is not None:
    _fast.configure(_reference_decode, _reference_encode, _compile_plan, DEFAULT_MAX_CACHED_PLANS)
    _fast.set_enabled(not PURE_REQUESTED)
    FAST_PATH = not PURE_REQUESTED
    if DICT_FILL_REFUSED:
        _fast.set_dict_fill(False)
    decode = _fast.decode
    encode = _fast.encode
    decode_fields = _fast.decode_fields
    encode_bytes = _fast.encode_bytes
else:
    decode = _reference_decode
    encode = _reference_encode

    def decode_fields(s: Any, spec: Mapping[str, Any]) -> DecodedDict:
        """decode(s, spec)[0]: the decoded fields only (no encoded dict to build)."""
        return _reference_decode(s, spec)[0]

    def encode_bytes(doc_dec: Any, spec: Mapping[str, Any]) -> bytearray:
        """encode(doc_dec, spec)[0], leaving doc_dec untouched."""
        return _reference_encode(doc_dec.copy() if isinstance(doc_dec, dict) else doc_dec, spec)[0]


def use_fast_path(enabled: bool) -> bool:
    """Switch between the Cython and the reference path at run time; returns the previous state.

    Asking for the fast path without the extension raises, so a test can never think it covered it.
    """
    global FAST_PATH
    previous = FAST_PATH
    if enabled and _fast is None:
        raise RuntimeError("the codec extension switch._speedups.codec is not built")
    if _fast is not None:
        _fast.set_enabled(enabled)
    FAST_PATH = enabled
    return previous


def configure(
    *, max_cached_plans: int = DEFAULT_MAX_CACHED_PLANS, fill_dicts_in_place: bool | None = None
) -> None:
    """Set the codec's limits (from the switch config at start-up).

    fill_dicts_in_place: None keeps the current choice; True where unavailable (not CPython 3.11)
    quietly stays off, since results are identical and only slower.
    """
    if _fast is not None:
        _fast.configure(_reference_decode, _reference_encode, _compile_plan, max_cached_plans)
        _fast.set_enabled(FAST_PATH)
        if fill_dicts_in_place is not None:
            _fast.set_dict_fill(fill_dicts_in_place and _fast.dict_fill_available())


def forget_spec(spec: Mapping[str, Any] | None = None) -> None:
    """Drop the compiled plan of a spec you edited in place (or of all specs)."""
    if _fast is not None:
        _fast.forget(spec)


def uncovered(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The spec entries the fast path leaves to pyiso8583, as "field: reason" (empty: all covered)."""
    return compile_spec(spec).uncovered
