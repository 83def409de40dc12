"""The message specs the switch speaks: pyiso8583 spec dicts, one per wire profile.

Why generated from one catalogue: every profile carries the same ISO 8583:1987 data elements (same
numbers, same meaning, same maximum lengths); only the wire encoding differs (ASCII digits, packed
BCD, binary). Writing 5 x 131 dict entries by hand is how two profiles silently disagree about a
maximum length. So `FIELDS` lists each element once with its ISO attribute ("n6", "ans..999"), and one
small function per profile turns attributes into pyiso8583 entries. A decoded dict is then the same in
every profile (numeric fields are digit strings, binary fields upper-case hex) except that packed
track data shows the separator as "D" where ASCII profiles show "=".

Every profile defines fields 1..128 so a corrupted bitmap naming an unused field fails with a
`DecodeError` on that field's data instead of a `KeyError` for a field the spec lacks (pyiso8583 raises
`KeyError` for those; see docs/messages.md). Specs are plain dicts because pyiso8583 takes dicts;
treat them as read-only after first use: `switch.codec` compiles each spec object once and caches the
plan by identity (`switch.codec.forget_spec` drops it if you must edit one).

Profiles (docs/messages.md documents every field of each, per MTI):
- ``default``, ``default_ascii``: pyiso8583's own, the very same objects.
- ``terminal_ascii``: POS terminals speaking ASCII: ASCII numerics and ASCII LL/LLL lengths, 8-byte
  binary bitmaps, binary PIN block (52), MACs (64/128) and ICC data (55, ASCII LLL length in bytes).
- ``terminal_packed``: CUP/UnionPay-style POS terminals: BCD numerics (odd lengths padded with a
  leading 0), BCD LL/LLL lengths counted in digits (nibbles) for numeric fields and in bytes for the
  others, binary bitmaps, 52, 55 and 64. The 5-byte TPDU in front is framing's job, not the spec's.
- ``acquirer_1987``: host-to-host ISO 8583:1987: ASCII numerics and lengths, binary bitmaps, secondary
  bitmap with 70, 90, 95 and 128 usable, binary 52/64/128 and ICC data (55) with an ASCII LLL length.
"""

from __future__ import annotations

import re
from typing import Any, Final

import iso8583.specs

#: ISO 8583:1987 data elements: number -> (attribute, description). Attribute grammar:
#: type (n, an, ans, ns, z, b, x+n) then either a fixed size or ".." and a maximum; variable
#: elements carry their length-prefix digits ("LL"/"LLL"). b sizes are in bits, as in the standard.
FIELDS: Final[dict[int, tuple[str, str]]] = {
    2: ("n..19 LL", "Primary Account Number (PAN)"),
    3: ("n6", "Processing Code"),
    4: ("n12", "Amount, Transaction"),
    5: ("n12", "Amount, Settlement"),
    6: ("n12", "Amount, Cardholder Billing"),
    7: ("n10", "Transmission Date and Time"),
    8: ("n8", "Amount, Cardholder Billing Fee"),
    9: ("n8", "Conversion Rate, Settlement"),
    10: ("n8", "Conversion Rate, Cardholder Billing"),
    11: ("n6", "System Trace Audit Number"),
    12: ("n6", "Time, Local Transaction"),
    13: ("n4", "Date, Local Transaction"),
    14: ("n4", "Date, Expiration"),
    15: ("n4", "Date, Settlement"),
    16: ("n4", "Date, Conversion"),
    17: ("n4", "Date, Capture"),
    18: ("n4", "Merchant Type"),
    19: ("n3", "Acquiring Institution Country Code"),
    20: ("n3", "PAN Country Code"),
    21: ("n3", "Forwarding Institution Country Code"),
    22: ("n3", "Point-of-Service Entry Mode"),
    23: ("n3", "PAN Sequence Number"),
    24: ("n3", "Network International ID (NII)"),
    25: ("n2", "Point-of-Service Condition Code"),
    26: ("n2", "Point-of-Service Capture Code"),
    27: ("n1", "Authorizing ID Response Length"),
    28: ("x+n8", "Amount, Transaction Fee"),
    29: ("x+n8", "Amount, Settlement Fee"),
    30: ("x+n8", "Amount, Transaction Processing Fee"),
    31: ("x+n8", "Amount, Settlement Processing Fee"),
    32: ("n..11 LL", "Acquiring Institution ID Code"),
    33: ("n..11 LL", "Forwarding Institution ID Code"),
    34: ("ns..28 LL", "Primary Account Number, Extended"),
    35: ("z..37 LL", "Track 2 Data"),
    36: ("z..104 LLL", "Track 3 Data"),
    37: ("an12", "Retrieval Reference Number"),
    38: ("an6", "Authorization ID Response"),
    39: ("an2", "Response Code"),
    40: ("an3", "Service Restriction Code"),
    41: ("ans8", "Card Acceptor Terminal ID"),
    42: ("ans15", "Card Acceptor ID Code"),
    43: ("ans40", "Card Acceptor Name/Location"),
    44: ("an..25 LL", "Additional Response Data"),
    45: ("an..76 LL", "Track 1 Data"),
    46: ("ans..999 LLL", "Additional Data - ISO"),
    47: ("ans..999 LLL", "Additional Data - National"),
    48: ("ans..999 LLL", "Additional Data - Private"),
    49: ("an3", "Currency Code, Transaction"),
    50: ("an3", "Currency Code, Settlement"),
    51: ("an3", "Currency Code, Cardholder Billing"),
    52: ("b64", "PIN Block"),
    53: ("n16", "Security-Related Control Information"),
    54: ("an..120 LLL", "Additional Amounts"),
    55: ("b..2040 LLL", "ICC Data (EMV TLV)"),
    56: ("ans..999 LLL", "Reserved ISO"),
    57: ("ans..999 LLL", "Reserved National"),
    58: ("ans..999 LLL", "Reserved National"),
    59: ("ans..999 LLL", "Reserved National"),
    60: ("ans..999 LLL", "Reserved National"),
    61: ("ans..999 LLL", "Reserved Private"),
    62: ("ans..999 LLL", "Reserved Private"),
    63: ("ans..999 LLL", "Reserved Private"),
    64: ("b64", "MAC"),
    65: ("b64", "Bitmap, Extended"),
    66: ("n1", "Settlement Code"),
    67: ("n2", "Extended Payment Code"),
    68: ("n3", "Receiving Institution Country Code"),
    69: ("n3", "Settlement Institution Country Code"),
    70: ("n3", "Network Management Information Code"),
    71: ("n4", "Message Number"),
    72: ("n4", "Message Number, Last"),
    73: ("n6", "Date, Action"),
    74: ("n10", "Credits, Number"),
    75: ("n10", "Credits, Reversal Number"),
    76: ("n10", "Debits, Number"),
    77: ("n10", "Debits, Reversal Number"),
    78: ("n10", "Transfer, Number"),
    79: ("n10", "Transfer, Reversal Number"),
    80: ("n10", "Inquiries, Number"),
    81: ("n10", "Authorizations, Number"),
    82: ("n12", "Credits, Processing Fee Amount"),
    83: ("n12", "Credits, Transaction Fee Amount"),
    84: ("n12", "Debits, Processing Fee Amount"),
    85: ("n12", "Debits, Transaction Fee Amount"),
    86: ("n16", "Credits, Amount"),
    87: ("n16", "Credits, Reversal Amount"),
    88: ("n16", "Debits, Amount"),
    89: ("n16", "Debits, Reversal Amount"),
    90: ("n42", "Original Data Elements"),
    91: ("an1", "File Update Code"),
    92: ("an2", "File Security Code"),
    93: ("an5", "Response Indicator"),
    94: ("an7", "Service Indicator"),
    95: ("an42", "Replacement Amounts"),
    96: ("b64", "Message Security Code"),
    97: ("x+n16", "Amount, Net Settlement"),
    98: ("ans25", "Payee"),
    99: ("n..11 LL", "Settlement Institution ID Code"),
    100: ("n..11 LL", "Receiving Institution ID Code"),
    101: ("ans..17 LL", "File Name"),
    102: ("ans..28 LL", "Account ID 1"),
    103: ("ans..28 LL", "Account ID 2"),
    104: ("ans..100 LLL", "Transaction Description"),
    **{n: ("ans..999 LLL", "Reserved for ISO Use") for n in range(105, 112)},
    **{n: ("ans..999 LLL", "Reserved for National Use") for n in range(112, 120)},
    **{n: ("ans..999 LLL", "Reserved for Private Use") for n in range(120, 128)},
    128: ("b64", "MAC"),
}

#: CUP/UnionPay POS terminal elements that differ from ISO 1987 (UnionPay POS terminal spec):
#: 60 carries the transaction type / batch number / network code as BCD digits, 61 the original
#: batch/trace/date of voids and reversals, 62 terminal/key data, 63 operator/card-organisation data.
CUP_OVERRIDES: Final[dict[int, tuple[str, str]]] = {
    60: ("n..17 LLL", "Reserved Private: transaction type, batch number, network code (CUP)"),
    61: ("n..29 LLL", "Original Message Data: batch, trace, date (CUP)"),
    62: ("b..4096 LLL", "Reserved Private: terminal info / working keys (CUP)"),
    63: ("ans..163 LLL", "Reserved Private: operator, card organisation (CUP)"),
}

_ATTR = re.compile(r"^(?P<type>x\+n|ans|an|ns|n|z|b)(?P<var>\.\.)?(?P<size>\d+)(?: (?P<prefix>L{2,3}))?$")


class Attr:
    """A parsed ISO attribute: "n..19 LL" -> type n, variable, max 19, 2 length digits."""

    __slots__ = ("kind", "prefix_digits", "size", "variable")

    def __init__(self, text: str) -> None:
        m = _ATTR.match(text)
        if m is None:
            raise ValueError(f"bad ISO attribute {text!r}")
        self.kind: str = m["type"]
        self.variable: bool = m["var"] is not None
        self.size: int = int(m["size"])
        self.prefix_digits: int = len(m["prefix"] or "")
        if self.variable != bool(self.prefix_digits):
            raise ValueError(f"variable attribute needs LL/LLL and fixed must not have it: {text!r}")
        if self.kind == "b" and self.size % 8:
            raise ValueError(f"binary sizes are whole bytes: {text!r}")

    @property
    def size_bytes(self) -> int:
        """Binary elements are specified in bits; everything else in characters."""
        return self.size // 8 if self.kind == "b" else self.size


def _entry(data_enc: str, len_enc: str, len_type: int, max_len: int, desc: str, **extra: Any) -> dict:
    entry: dict[str, Any] = {
        "data_enc": data_enc,
        "len_enc": len_enc,
        "len_type": len_type,
        "max_len": max_len,
        "desc": desc,
    }
    entry.update(extra)
    return entry


def _ascii_field(attr: Attr, desc: str) -> dict:
    """ASCII profiles: characters as ASCII, binary as raw bytes, lengths as ASCII digits."""
    if attr.kind == "b":
        return _entry("b", "ascii", attr.prefix_digits, attr.size_bytes, desc)
    return _entry("ascii", "ascii", attr.prefix_digits, attr.size, desc)


def _packed_field(attr: Attr, desc: str) -> dict:
    """CUP-style packed profile: digits as BCD (leading 0 pad), lengths as BCD.

    BCD length prefixes hold two digits per byte, so LL takes 1 byte and LLL 2 bytes. Numeric
    and track elements count their length in digits (nibbles); text and binary in bytes.
    """
    len_type = (attr.prefix_digits + 1) // 2
    if attr.kind in ("n", "z"):
        return _entry("b", "bcd", len_type, attr.size, desc, len_count="nibbles", left_pad="0")
    if attr.kind == "b":
        return _entry("b", "bcd", len_type, attr.size_bytes, desc)
    return _entry("ascii", "bcd", len_type, attr.size, desc)


def _build(field_fn: Any, *, bitmap_enc: str, mti_enc: str, overrides: dict[int, tuple[str, str]]) -> dict:
    spec: dict[str, dict] = {
        "h": _entry("ascii", "ascii", 0, 0, "Message Header (none; TPDU/length are framing)"),
        "t": _entry(mti_enc, "ascii", 0, 4 if mti_enc != "b" else 2, "Message Type Indicator"),
        "p": _entry(bitmap_enc, "ascii", 0, 8, "Bitmap, Primary"),
        "1": _entry(bitmap_enc, "ascii", 0, 8, "Bitmap, Secondary"),
    }
    for number in range(2, 129):
        text, desc = overrides.get(number, FIELDS[number])
        spec[str(number)] = field_fn(Attr(text), desc)
    return spec


def _terminal_ascii() -> dict:
    spec = _build(_ascii_field, bitmap_enc="b", mti_enc="ascii", overrides={})
    # EMV caps ICC data at 255 bytes in an authorisation; a longer field 55 is a broken terminal.
    spec["55"]["max_len"] = 255
    return spec


def _terminal_packed() -> dict:
    spec = _build(_packed_field, bitmap_enc="b", mti_enc="b", overrides=CUP_OVERRIDES)
    spec["55"]["max_len"] = 255
    return spec


def _acquirer_1987() -> dict:
    return _build(_ascii_field, bitmap_enc="b", mti_enc="ascii", overrides={})


#: Every shipped profile by name. The values are the dicts `switch.codec.decode/encode` take.
SPECS: Final[dict[str, dict]] = {
    "default": iso8583.specs.default,
    "default_ascii": iso8583.specs.default_ascii,
    "terminal_ascii": _terminal_ascii(),
    "terminal_packed": _terminal_packed(),
    "acquirer_1987": _acquirer_1987(),
}

#: Profiles the switch itself defines (as opposed to pyiso8583's examples).
PROFILES: Final[tuple[str, ...]] = ("terminal_ascii", "terminal_packed", "acquirer_1987")


def get_spec(name: str) -> dict:
    """The spec of a profile named in the config; a clear error names the known ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown message profile {name!r}; known: {', '.join(sorted(SPECS))}") from None


#: The fields the switch reads or writes (docs/messages.md documents each, per profile and per MTI).
SWITCH_FIELDS: Final[tuple[int, ...]] = (
    2, 3, 4, 7, 11, 12, 13, 14, 18, 22, 23, 25, 32, 35, 37, 38, 39, 41, 42, 43, 48, 49,
    52, 53, 54, 55, 60, 61, 62, 63, 64, 70, 90, 95, 128,
)  # fmt: skip


def _wire_form(entry: dict) -> str:
    """How one spec entry looks on the wire, e.g. "BCD n..19, LL BCD length (digits)"."""
    data = entry["data_enc"]
    nibbles = entry.get("len_count") == "nibbles"
    if data == "b":
        kind = "BCD" if nibbles else "binary"
        unit = "digits" if nibbles else "bytes"
    else:
        kind, unit = data.upper(), "chars"
    can_be_odd = entry["len_type"] > 0 or entry["max_len"] % 2 == 1
    pad = f", odd padded with leading {entry['left_pad']}" if entry.get("left_pad") and can_be_odd else ""
    if entry["len_type"] == 0:
        return f"{kind}, fixed {entry['max_len']} {unit}{pad}"
    len_enc = {"b": "binary", "bcd": "BCD"}.get(entry["len_enc"], entry["len_enc"].upper())
    return f"{kind}, up to {entry['max_len']} {unit}, {entry['len_type']}-byte {len_enc} length{pad}"


def markdown_table(fields: tuple[int, ...] = SWITCH_FIELDS) -> str:
    """The per-profile field table of docs/messages.md, generated from the specs (a test compares)."""
    names = ("terminal_ascii", "terminal_packed", "acquirer_1987")
    lines = [
        "| field | ISO 8583:1987 | name | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for key in ("t", "p", "1"):
        forms = []
        for name in names:
            entry = SPECS[name][key]
            if key == "t":
                forms.append("BCD, 2 bytes" if entry["data_enc"] == "b" else "ASCII, 4 chars")
            else:
                forms.append("binary, 8 bytes" if entry["data_enc"] == "b" else "ASCII hex, 16 chars")
        label = {"t": "MTI", "p": "primary bitmap", "1": "secondary bitmap"}[key]
        attr = {"t": "n4", "p": "b64", "1": "b64"}[key]
        lines.append(f"| {key} | {attr} | {label} | " + " | ".join(forms) + " |")
    for number in fields:
        attr, _ = FIELDS[number]
        desc = SPECS["terminal_packed"][str(number)]["desc"]
        forms = [_wire_form(SPECS[name][str(number)]) for name in names]
        lines.append(f"| {number} | {attr} | {desc} | " + " | ".join(forms) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
