"""Card-data protection for anything a human or a metrics system may read.

A full PAN, track data, a PIN block or a CVV must never reach an error message, a repr, a log line or a
metric. These helpers keep at most the BIN (first 6) and the last 4 digits of a PAN, and replace
sensitive fields wholesale. jPOS calls this "protect" and "wipe"; we do both by field number so every
caller agrees on which fields are secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Fields whose content is shown as BIN + last 4 only (PAN).
PAN_FIELDS = frozenset({"2"})
#: Fields never shown at all: track 1/2/3, PIN block, security info, ICC data, MACs, key material.
WIPED_FIELDS = frozenset({"35", "36", "45", "52", "53", "55", "64", "96", "128"})

_DIGIT_RUN = re.compile(r"\d{12,19}")
#: Track 2 as text: PAN, separator ("=", or "D" in BCD hex), then expiry, service code and discretionary
#: data (which carries the CVV): the PAN part is masked, everything after the separator wiped.
_TRACK2 = re.compile(r"(\d{12,19})[=Dd]\d[\dFf]*")


def mask_pan(pan: str | bytes | None) -> str:
    """BIN (first 6) + stars + last 4; short or odd values are starred entirely."""
    if pan is None:
        return ""
    if isinstance(pan, bytes | bytearray):
        pan = pan.decode("ascii", "replace")
    digits = pan.strip()
    if len(digits) < 13 or not digits.isdigit():
        return "*" * len(digits)
    return f"{digits[:6]}{'*' * (len(digits) - 10)}{digits[-4:]}"


def scrub_text(text: str) -> str:
    """Wipe track 2 and mask any run of 12-19 digits in free text (an error quoting raw field data)."""
    text = _TRACK2.sub(lambda m: f"{mask_pan(m.group(1))}=[track 2 data wiped]", text)
    return _DIGIT_RUN.sub(lambda m: mask_pan(m.group(0)), text)


def mask_field(field: str, value: Any) -> Any:
    """The printable form of one field's value."""
    if field in PAN_FIELDS:
        return mask_pan(value if isinstance(value, str | bytes | bytearray) else str(value))
    if field in WIPED_FIELDS:
        n = len(value) if hasattr(value, "__len__") else 0
        return f"[{n} wiped]"
    if isinstance(value, str):
        return scrub_text(value)
    return value


def _mask_key(key: Any) -> Any:
    # field numbers are 1-3 characters; a longer key can be data pasted in the wrong place (a PAN)
    return scrub_text(key) if isinstance(key, str) and len(key) > 3 else key


def mask_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a decoded or to-be-encoded field dict safe to log (odd keys scrubbed too)."""
    return {_mask_key(k): mask_field(k, v) for k, v in fields.items()}


#: Encoded pieces whose bytes an error may keep: message header, MTI and bitmaps (never card data).
_STRUCTURAL_FIELDS = frozenset({"h", "t", "p", "1"})


def mask_encoded_fields(doc_enc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of pyiso8583's per-field encoded dict ({field: {"len": bytes, "data": bytes}}) safe to
    keep on an exception: length prefixes stay; field bytes stay only for the header, MTI and bitmaps,
    and for fields whose bytes read as ASCII text with no card number in them (a PAN packed as BCD or
    track data in binary cannot be recognised, so any other field's bytes become b"")."""
    out: dict[str, Any] = {}
    for field, piece in doc_enc.items():
        if not isinstance(piece, Mapping):
            out[_mask_key(field)] = {}
            continue
        safe = dict(piece)
        data = piece.get("data", b"")
        if field not in _STRUCTURAL_FIELDS and data:
            keep = False
            if field not in PAN_FIELDS and field not in WIPED_FIELDS and isinstance(data, bytes | bytearray):
                try:
                    text = bytes(data).decode("ascii")
                except UnicodeDecodeError:
                    text = None
                keep = text is not None and text.isprintable() and scrub_text(text) == text
            if not keep:
                safe["data"] = b""
        out[_mask_key(field)] = safe
    return out


def masked_repr(obj: Any) -> str:
    """repr of a msgspec Struct that carries field dicts (events, decisions): every mapping attribute is
    shown through mask_fields and every text through scrub_text. Use as ``__repr__ = masked_repr``;
    msgspec's own repr would print the PAN, track 2 and PIN block of a request."""
    parts = []
    for name in getattr(obj, "__struct_fields__", ()):
        value = getattr(obj, name)
        if isinstance(value, Mapping):
            value = mask_fields(value)
        elif isinstance(value, str):
            value = scrub_text(value)
        parts.append(f"{name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"
