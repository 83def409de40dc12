"""Compile a pyiso8583 spec dict once into a flat plan the Cython codec executes.

Why a plan: pyiso8583 re-reads the spec dict (string keys, `.get` defaults, encoding names) for every
field of every message; that lookup work is most of its cost. A plan resolves all of it once: per field
number, one small record saying how the length is written (fixed, binary, BCD, text digits) and how the
data is written (binary as hex, ASCII, Latin-1, any other Python codec), with the digit table of a text
length encoding precomputed.

The plan only describes what the fast path handles *exactly* like pyiso8583. Anything else is marked
`KIND_BAIL` (with the reason): a message that reaches such a field, or any input the fast path finds
malformed, is handed whole to pyiso8583, which produces the result or the error itself. That is what
makes errors identical by construction (same class, message, field, position and partial dicts) without
re-implementing pyiso8583's error paths in C. A spec feature the fast path does not cover at all is
reported in `SpecPlan.uncovered`, which `switch.codec` logs once per spec.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping
from typing import Any, Final

import msgspec

# Field kinds.
KIND_BAIL: Final = 0  # not in the spec, or a feature the fast path leaves to pyiso8583
KIND_FIELD: Final = 1
# Data encodings.
DATA_BIN: Final = 0  # "b": raw bytes <-> upper-case hex (binary and BCD)
DATA_ASCII: Final = 1
DATA_LATIN1: Final = 2
DATA_CODEC: Final = 3  # any other Python codec, called through the C API by name
# Length prefixes.
LEN_FIXED: Final = 0
LEN_BIN: Final = 1  # unsigned big-endian integer of len_type bytes
LEN_BCD: Final = 2  # 2 decimal digits per byte
LEN_TEXT: Final = 3  # len_type decimal digits in a text codec (ASCII, EBCDIC, ...)
# Pad characters: a code point, or one of these.
PAD_NONE: Final = -1
PAD_INVALID: Final = -2  # present but not a str: pyiso8583 misbehaves, so bail when it is needed

#: Widest length prefixes the C code parses (wider ones are legal pyiso8583 but go to it).
MAX_BIN_LEN_BYTES: Final = 8
MAX_BCD_LEN_BYTES: Final = 9
MAX_TEXT_LEN_DIGITS: Final = 18
#: Field numbers a message can carry: primary, secondary and tertiary bitmaps.
MAX_FIELD: Final = 192


class FieldPlan(msgspec.Struct, frozen=True):
    """How one field (or the header) is read and written; see the module constants."""

    kind: int
    data: int = DATA_BIN
    codec: str = ""
    length: int = LEN_FIXED
    len_type: int = 0
    max_len: int = 0
    nibbles: bool = False
    left_pad: int = PAD_NONE
    right_pad: int = PAD_NONE
    #: For LEN_TEXT: the encoded byte of each digit 0-9.
    digits: bytes = b""
    reason: str = ""


class SpecPlan(msgspec.Struct, frozen=True):
    """A whole spec: header, MTI, bitmaps, and fields 0..192 (index = field number)."""

    #: Set when every call fails in pyiso8583 itself (no "h", "t" or "p" entry...): all calls go there.
    all_bail: str
    has_header: bool
    header: FieldPlan
    mti: FieldPlan
    primary: FieldPlan
    secondary: FieldPlan
    fields: tuple[FieldPlan, ...]
    #: "field: reason" for every spec entry the fast path does not cover (logged once).
    uncovered: tuple[str, ...]


_BAIL_MISSING = FieldPlan(KIND_BAIL, reason="not in spec")


def _exact_int(value: Any) -> bool:
    return type(value) is int


def _data_encoding(name: Any) -> tuple[int, str, str]:
    """(DATA_*, codec name, reason-if-unsupported) for a `data_enc` value."""
    if not isinstance(name, str):
        return DATA_CODEC, "", f"data_enc {type(name).__name__} is not a str"
    if name == "b":
        return DATA_BIN, "", ""
    if not name.isascii() or "\0" in name:
        return DATA_CODEC, "", "data_enc name is not ASCII"
    try:
        canonical = codecs.lookup(name).name
    except LookupError:
        return DATA_CODEC, "", f"unknown data_enc {name!r}"
    if canonical == "ascii":
        return DATA_ASCII, name, ""
    if canonical == "iso8859-1":
        return DATA_LATIN1, name, ""
    return DATA_CODEC, name, ""


def _digit_bytes(name: str) -> bytes | None:
    """The byte of each digit 0-9 in a text length codec, if digits are single stable bytes.

    Stable means any run of those bytes decodes to the same run of digits (true for ASCII, Latin-1,
    UTF-8, EBCDIC code pages); codecs with BOMs or multi-byte digits are left to pyiso8583.
    """
    try:
        encoded = [str(d).encode(name) for d in range(10)]
        if any(len(e) != 1 for e in encoded) or len(set(encoded)) != 10:
            return None
        table = b"".join(encoded)
        if "0123456789".encode(name) != table or table.decode(name) != "0123456789":
            return None
        for a in range(10):
            for b in range(10):
                if bytes((table[a], table[b])).decode(name) != f"{a}{b}":
                    return None
    except Exception:
        return None
    return table


def _pad(field_spec: Mapping[str, Any], key: str) -> int:
    try:
        pad = field_spec.get(key, "")
    except Exception:
        return PAD_INVALID
    if not isinstance(pad, str):
        return PAD_INVALID
    return ord(pad[0]) if pad else PAD_NONE


def compile_field(field_spec: Any) -> FieldPlan:
    """The plan of one regular field (or the header), mirroring pyiso8583's _decode/_encode_field."""
    if not isinstance(field_spec, Mapping):
        return FieldPlan(KIND_BAIL, reason="field spec is not a mapping")
    try:
        len_type = field_spec["len_type"]
        max_len = field_spec["max_len"]
        data_enc = field_spec["data_enc"]
    except KeyError as e:
        return FieldPlan(KIND_BAIL, reason=f"missing {e.args[0]!r}")
    if not _exact_int(len_type) or len_type < 0:
        return FieldPlan(KIND_BAIL, reason=f"len_type {len_type!r} is not an int >= 0")
    if not _exact_int(max_len) or (len_type == 0 and max_len < 0):
        return FieldPlan(KIND_BAIL, reason=f"max_len {max_len!r} unusable")
    len_count = field_spec.get("len_count", "bytes")
    if len_count not in ("bytes", "nibbles") or type(len_count) is not str:
        return FieldPlan(KIND_BAIL, reason=f"len_count {len_count!r}")
    data, codec, why = _data_encoding(data_enc)
    if why:
        return FieldPlan(KIND_BAIL, reason=why)
    length, digits = LEN_FIXED, b""
    if len_type:
        len_enc = field_spec.get("len_enc")
        if len_enc == "b" and type(len_enc) is str:
            length = LEN_BIN
            if len_type > MAX_BIN_LEN_BYTES:
                return FieldPlan(KIND_BAIL, reason=f"binary length of {len_type} bytes")
        elif len_enc == "bcd" and type(len_enc) is str:
            length = LEN_BCD
            if len_type > MAX_BCD_LEN_BYTES:
                return FieldPlan(KIND_BAIL, reason=f"BCD length of {len_type} bytes")
        elif isinstance(len_enc, str) and type(len_enc) is str:
            table = _digit_bytes(len_enc)
            if table is None:
                return FieldPlan(KIND_BAIL, reason=f"len_enc {len_enc!r} has no single-byte digits")
            if len_type > MAX_TEXT_LEN_DIGITS:
                return FieldPlan(KIND_BAIL, reason=f"text length of {len_type} digits")
            length, digits = LEN_TEXT, table
        else:
            return FieldPlan(KIND_BAIL, reason=f"len_enc {len_enc!r}")
    return FieldPlan(
        KIND_FIELD,
        data=data,
        codec=codec,
        length=length,
        len_type=len_type,
        max_len=max_len,
        nibbles=len_count == "nibbles",
        left_pad=_pad(field_spec, "left_pad"),
        right_pad=_pad(field_spec, "right_pad"),
        digits=digits,
    )


def _compile_data_only(field_spec: Any) -> FieldPlan:
    """MTI and bitmaps: pyiso8583 reads only `data_enc` (their sizes are fixed by the standard)."""
    if not isinstance(field_spec, Mapping) or "data_enc" not in field_spec:
        return FieldPlan(KIND_BAIL, reason="missing or not a mapping")
    data, codec, why = _data_encoding(field_spec["data_enc"])
    if why:
        return FieldPlan(KIND_BAIL, reason=why)
    return FieldPlan(KIND_FIELD, data=data, codec=codec)


def compile_spec(spec: Mapping[str, Any]) -> SpecPlan:
    """Compile a whole spec. Never raises for a strange spec: strange parts become KIND_BAIL."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a mapping, not {type(spec).__name__}")
    all_bail = ""
    has_header = False
    header = _BAIL_MISSING
    try:
        has_header = spec["h"]["max_len"] > 0
    except Exception as e:  # pyiso8583 fails on every call: leave all of them to it
        all_bail = f"header entry unusable ({type(e).__name__})"
    if has_header:
        header = compile_field(spec["h"])
        if header.kind == KIND_BAIL:
            all_bail = f"header entry unusable ({header.reason})"
    mti = _compile_data_only(spec["t"]) if "t" in spec else _BAIL_MISSING
    primary = _compile_data_only(spec["p"]) if "p" in spec else _BAIL_MISSING
    if mti.kind == KIND_BAIL:
        all_bail = all_bail or f"MTI entry unusable ({mti.reason})"
    if primary.kind == KIND_BAIL:
        all_bail = all_bail or f"primary bitmap entry unusable ({primary.reason})"
    secondary = _compile_data_only(spec["1"]) if "1" in spec else _BAIL_MISSING
    fields = [_BAIL_MISSING]
    for number in range(1, MAX_FIELD + 1):
        key = str(number)
        fields.append(compile_field(spec[key]) if key in spec and number != 1 else _BAIL_MISSING)
    uncovered: list[str] = []
    named = [("h", header if has_header else None), ("t", mti), ("p", primary), ("1", secondary)]
    named += [(str(n), fields[n]) for n in range(2, MAX_FIELD + 1)]
    for key, plan in named:
        if plan is not None and plan.kind == KIND_BAIL and key in spec:
            uncovered.append(f"{key}: {plan.reason}")
    if all_bail:
        uncovered.insert(0, f"*: {all_bail}")
    return SpecPlan(
        all_bail=all_bail,
        has_header=has_header,
        header=header,
        mti=mti,
        primary=primary,
        secondary=secondary,
        fields=tuple(fields),
        uncovered=tuple(uncovered),
    )
