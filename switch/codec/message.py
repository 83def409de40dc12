"""A typed view over a decoded ISO 8583 field dict.

The codec speaks pyiso8583's dicts (field number as a string -> str value; binary fields as upper-case
hex). Processing code wants MTI parts, fields by number and amounts as integers; this view gives that
without copying the dict. Its repr masks card data (switch.codec.masking).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from switch.codec.masking import mask_fields


class MessageError(ValueError):
    """A field is missing or malformed; `field` names it (the switch answers 30)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field}: {reason}")
        self.field = field
        self.reason = reason


class Message:
    """Read access to a decoded message. `fields` is pyiso8583's decoded dict (not copied)."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = fields

    # --- MTI: version / class / function / origin (ISO 8583 digit positions 1-4) -----------------
    @property
    def mti(self) -> str:
        mti = self.fields.get("t", "")
        # isascii: str.isdigit also accepts "²" or Arabic-Indic digits, which int() and peers reject.
        if not isinstance(mti, str) or len(mti) != 4 or not (mti.isascii() and mti.isdigit()):
            raise MessageError("t", "MTI must be 4 digits")
        return mti

    @property
    def version(self) -> str:
        return self.mti[0]

    @property
    def mti_class(self) -> str:
        """Message class: version + class digits, '02' for 0200/0210/0220 (01 authorisation, 04 reversal,
        05 reconciliation, 08 network). The same spelling routing's matcher keys requests with."""
        return self.mti[0:2]

    @property
    def function(self) -> str:
        """Message function: 0 request, 1 response, 2 advice, 3 advice response..."""
        return self.mti[2]

    @property
    def origin(self) -> str:
        """Message origin: 0 acquirer, 1 acquirer repeat, 2 issuer, 3 issuer repeat..."""
        return self.mti[3]

    @property
    def is_repeat(self) -> bool:
        return self.origin in ("1", "3", "5")

    @property
    def is_request(self) -> bool:
        return self.function in ("0", "2", "4")

    def response_mti(self) -> str:
        """The MTI that answers this one: function + 1, origin reset (0200/0201 -> 0210).

        Only requests and advices (even function digit) have an answer; asking for the answer to an
        answer (0210 -> "0220" would be an advice) is a bug in the caller, reported as such.
        """
        mti = self.mti
        if int(mti[2]) % 2:
            raise MessageError("t", f"MTI {mti} is itself a response")
        return f"{mti[0]}{mti[1]}{int(mti[2]) + 1}0"

    # --- fields ----------------------------------------------------------------------------------
    def __contains__(self, field: int | str) -> bool:
        return str(field) in self.fields

    def __getitem__(self, field: int | str) -> str:
        key = str(field)
        try:
            return self.fields[key]
        except KeyError:
            raise MessageError(key, "missing") from None

    def get(self, field: int | str, default: str | None = None) -> str | None:
        return self.fields.get(str(field), default)

    def digits(self, field: int | str) -> str:
        """A field that must be all digits (30 otherwise)."""
        value = self[field]
        if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
            raise MessageError(str(field), "must be numeric")
        return value

    # --- money -----------------------------------------------------------------------------------
    @property
    def amount_minor(self) -> int:
        """Field 4 as an integer in minor units (never a float)."""
        return int(self.digits(4))

    @property
    def currency(self) -> str:
        """Field 49, ISO 4217 numeric."""
        cur = self.digits(49)
        if len(cur) != 3:
            raise MessageError("49", "currency must be 3 digits")
        return cur

    @property
    def processing_code(self) -> str:
        return self.digits(3)

    def __repr__(self) -> str:
        return f"Message({mask_fields(self.fields)!r})"

    __str__ = __repr__
