"""The typed message view: MTI parts, answers, field access, money as integers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import switch.codec as codec
from switch.codec.message import Message, MessageError
from switch.codec.specs import SPECS


@pytest.mark.parametrize(
    ("mti", "answer"),
    [
        ("0100", "0110"),
        ("0200", "0210"),
        ("0201", "0210"),
        ("0220", "0230"),
        ("0221", "0230"),
        ("0400", "0410"),
        ("0420", "0430"),
        ("0421", "0430"),
        ("0500", "0510"),
        ("0800", "0810"),
        ("1200", "1210"),
    ],
)
def test_response_mti(mti: str, answer: str) -> None:
    assert Message({"t": mti}).response_mti() == answer


@pytest.mark.parametrize("mti", ["0110", "0210", "0230", "0410", "0810"])
def test_a_response_has_no_response(mti: str) -> None:
    with pytest.raises(MessageError) as info:
        Message({"t": mti}).response_mti()
    assert info.value.field == "t"


def test_mti_parts() -> None:
    m = Message({"t": "0421"})
    assert (m.version, m.mti_class, m.function, m.origin) == ("0", "04", "2", "1")
    assert m.is_repeat and m.is_request
    answer = Message({"t": "0210"})
    assert not answer.is_repeat and not answer.is_request
    assert Message({"t": "1200"}).version == "1"


@pytest.mark.parametrize("mti", ["", "020", "02000", "02A0", "０２００", "02²0", None])
def test_bad_mti_is_a_message_error(mti: object) -> None:
    fields = {} if mti is None else {"t": mti}
    with pytest.raises(MessageError) as info:
        Message(fields).mti  # noqa: B018
    assert info.value.field == "t"


def test_field_access_by_number_or_string() -> None:
    m = Message({"t": "0200", "11": "000123", "41": "TERM0001"})
    assert m[11] == m["11"] == "000123"
    assert 41 in m and "41" in m and 42 not in m
    assert m.get(42) is None and m.get(42, "x") == "x" and m.get("41") == "TERM0001"
    with pytest.raises(MessageError) as info:
        m[42]
    assert (info.value.field, info.value.reason) == ("42", "missing")
    assert isinstance(info.value, ValueError)


def test_view_does_not_copy() -> None:
    fields = {"t": "0200"}
    m = Message(fields)
    fields["4"] = "000000000100"
    assert m.amount_minor == 100


@given(st.integers(min_value=0, max_value=999_999_999_999))
def test_amount_minor_is_an_exact_integer(amount: int) -> None:
    m = Message({"t": "0200", "4": f"{amount:012d}", "49": "978"})
    assert m.amount_minor == amount and type(m.amount_minor) is int
    assert m.currency == "978"


@pytest.mark.parametrize("amount", ["", "12.50", "-00000000100", "00000000010²", "٠٠٠٠٠٠٠٠٠١٠٠", " 100"])
def test_non_numeric_amount_is_a_message_error(amount: str) -> None:
    with pytest.raises(MessageError) as info:
        Message({"t": "0200", "4": amount}).amount_minor  # noqa: B018
    assert info.value.field == "4"


@pytest.mark.parametrize("currency", ["97", "9788", "EUR", ""])
def test_currency_must_be_three_digits(currency: str) -> None:
    with pytest.raises(MessageError) as info:
        Message({"t": "0200", "49": currency}).currency  # noqa: B018
    assert info.value.field == "49"


def test_processing_code_and_digits() -> None:
    m = Message({"t": "0200", "3": "200000", "41": "TERM0001"})
    assert m.processing_code == "200000"
    with pytest.raises(MessageError):
        m.digits(41)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_view_over_every_profile_decoded_message(name: str) -> None:
    """Numeric fields read the same whatever the wire profile (BCD or ASCII)."""
    spec = SPECS[name]
    raw = codec.encode({"t": "0200", "3": "000000", "4": "000000012345", "49": "978", "22": "051"}, spec)[0]
    m = Message(codec.decode(bytes(raw), spec)[0])
    seen = (m.mti, m.amount_minor, m.currency, m.processing_code, m[22])
    assert seen == ("0200", 12345, "978", "000000", "051")
    assert m.response_mti() == "0210"
