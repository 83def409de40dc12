"""Exceptions out of the codec carry no card data anywhere: not in str() only, but in every attribute,
`__dict__`, `args`, the `__cause__`/`__context__` chain, `__notes__`, and a pickle of it (an exception
travels: a log record with exc_info, a formatter that prints attributes, a queue to another process).

Known card data is pushed through every error path we have: pyiso8583's decode and encode errors (on
the Cython fast path and on the pure fallback), a field the spec lacks, a non-bytes input, the Wire's
encode and decode, framing errors and MAC-layout errors. Each raised object is walked recursively.
What must survive for callers is checked too: field number, offset, MTI and STAN."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest

import switch.codec as codec
from switch.codec import mac as macmod
from switch.codec.framing import FrameReader, FramingError
from switch.codec.specs import SPECS
from switch.codec.wire import Wire, WireError
from tests.security.reachable import walk

PAN = "4761739001010119"
TRACK2 = f"{PAN}=30122011758928889"
TRACK2_BCD = f"{PAN}D30122011758928889F"
PIN_BLOCK = "0412AC89ABCDEF67"
ICC = "9F2608A1B2C3D4E5F607189F2701809F1007"
#: Forms a leak can take: text, ASCII bytes, BCD bytes, hex text of the binary fields.
SECRETS_TEXT = (PAN, PAN[6:], TRACK2[17:], PIN_BLOCK, ICC)
SECRETS_BYTES = (
    PAN.encode(),
    PAN[6:].encode(),
    bytes.fromhex(PAN),
    bytes.fromhex(PIN_BLOCK),
    bytes.fromhex(ICC),
    TRACK2[17:].encode(),
)


@pytest.fixture(params=["fast", "pure"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "fast" and codec._fast is None:
        pytest.fail("the codec extension is not built (run: make build)")
    previous = codec.use_fast_path(request.param == "fast")
    try:
        yield request.param
    finally:
        codec.use_fast_path(previous)


def assert_no_card_data(exc: BaseException) -> None:
    texts = [str(exc), repr(exc)]
    for value in walk(exc):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, bytes | bytearray):
            for secret in SECRETS_BYTES:
                assert secret not in value, f"{secret!r} in a bytes attribute of {type(exc).__name__}"
            texts.append(bytes(value).hex().upper())
            texts.append(bytes(value).decode("latin-1"))
    try:
        texts.append(pickle.dumps(exc).hex().upper())
        texts.append(pickle.dumps(exc).decode("latin-1"))
    except (TypeError, pickle.PicklingError, AttributeError):
        pass  # not picklable: cannot travel that way either
    for text in texts:
        for secret in SECRETS_TEXT:
            assert secret not in text and secret.upper() not in text.upper(), (
                f"{secret!r} found in {type(exc).__name__}: {text[:200]!r}"
            )


def raised(fn: Any, *args: Any, **kwargs: Any) -> BaseException:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # any exception is what we inspect
        return exc
    raise AssertionError("no exception was raised")


ASCII = SPECS["terminal_ascii"]
PACKED = SPECS["terminal_packed"]
REQUEST = {
    "t": "0200",
    "2": PAN,
    "3": "000000",
    "4": "000000001000",
    "11": "000123",
    "35": TRACK2,
    "41": "TERM0001",
    "52": PIN_BLOCK,
    "55": ICC,
}


def _encoded(spec: Any, fields: dict[str, str]) -> bytes:
    return bytes(codec.encode_bytes(fields, spec))


def test_the_walk_finds_what_pyiso8583_itself_keeps() -> None:
    """The check is real: pyiso8583's own exception for a truncated message is full of card data."""
    import iso8583

    raw = _encoded(ASCII, {k: v for k, v in REQUEST.items() if k != "35"})
    exc = raised(iso8583.decode, raw[:-3], ASCII)
    with pytest.raises(AssertionError):
        assert_no_card_data(exc)


@pytest.mark.parametrize("cut", [3, 10, 25])
def test_truncated_message_decode_error_is_clean_and_still_useful(path: str, cut: int) -> None:
    raw = _encoded(ASCII, {k: v for k, v in REQUEST.items() if k != "35"})
    exc = raised(codec.decode, raw[:-cut], ASCII)
    assert isinstance(exc, codec.DecodeError)
    assert_no_card_data(exc)
    assert exc.field and exc.pos > 0  # where it failed stays
    assert exc.doc_dec.get("t") == "0200" and exc.doc_dec.get("11") == "000123"
    assert exc.doc_dec["2"] == "476173******0119"
    assert exc.__cause__ is None and exc.__context__ is None
    exc2 = raised(codec.decode_fields, raw[:-cut], ASCII)
    assert_no_card_data(exc2)


def test_bad_track_2_bytes_decode_error_has_no_chain_to_the_raw_bytes(path: str) -> None:
    raw = bytearray(_encoded(ASCII, REQUEST))
    at = raw.index(TRACK2.encode())
    raw[at + 20] = 0xFF  # not ASCII: pyiso8583 fails inside an except holding UnicodeDecodeError
    exc = raised(codec.decode, bytes(raw), ASCII)
    assert isinstance(exc, codec.DecodeError) and exc.field == "35"
    assert_no_card_data(exc)


def test_packed_profile_decode_error_with_bcd_pan_is_clean(path: str) -> None:
    raw = _encoded(PACKED, {k: v for k, v in REQUEST.items() if k != "35"} | {"35": TRACK2_BCD})
    exc = raised(codec.decode, raw[:-4], PACKED)
    assert isinstance(exc, codec.DecodeError)
    assert_no_card_data(exc)


@pytest.mark.parametrize(
    "bad",
    [
        {"4": "12X"},  # non-numeric amount: fails after the PAN and track 2 were encoded
        {"52": "ZZ" * 8},  # non-hex PIN block
        {"55": "9F2"},  # odd-length ICC data
        {"2": PAN + "0000"},  # PAN too long
        {PAN: "1"},  # a PAN pasted as a field number
        {"35": TRACK2 + "9" * 30},  # track 2 too long
    ],
)
def test_encode_errors_are_clean(path: str, bad: dict[str, str]) -> None:
    fields = {**REQUEST, **bad}
    exc = raised(codec.encode, dict(fields), ASCII)
    assert_no_card_data(exc)
    assert_no_card_data(raised(codec.encode_bytes, dict(fields), ASCII))
    if isinstance(exc, codec.EncodeError):
        assert exc.field
        assert fields["2"] in (PAN, PAN + "0000")  # the caller's dict is untouched


def test_non_bytes_input_and_unknown_field_errors_are_clean(path: str) -> None:
    assert_no_card_data(raised(codec.decode, PAN, ASCII))
    assert_no_card_data(raised(codec.encode, {**REQUEST, "200": PAN}, ASCII))


def test_wire_errors_are_clean() -> None:
    wire = Wire("terminal_ascii", "binary2")
    raw = wire.encode({k: v for k, v in REQUEST.items() if k != "35"})
    exc = raised(wire.decode, raw[:-5])
    assert isinstance(exc, WireError) and exc.mti == "0200"
    assert_no_card_data(exc)
    exc = raised(wire.encode, {**REQUEST, "4": "12X"})
    assert isinstance(exc, WireError)
    assert_no_card_data(exc)
    assert exc.__context__ is None


def test_mac_and_framing_errors_are_clean() -> None:
    layout = macmod.mac_layout(SPECS["acquirer_1987"])
    garbage = b"0200" + PAN.encode() + b"XXXX" + PAN.encode()
    exc = raised(macmod.mac_input, garbage, layout)
    assert isinstance(exc, macmod.MacError)
    assert_no_card_data(exc)
    reader = FrameReader("ascii4", max_frame_bytes=100)
    exc = raised(reader.feed, PAN.encode() + b"=3012")
    assert isinstance(exc, FramingError)
    assert_no_card_data(exc)
