"""Card data never reaches text: a known PAN, track 2 (whose discretionary data carries the CVV), PIN
block and ICC data go through every codec error path, the message view and the fallback log line; no
str(), repr(), formatted traceback or log record may contain them."""

from __future__ import annotations

import copy
import logging
import traceback

import iso8583
import pytest

import switch.codec as codec
from switch.codec.masking import mask_fields, mask_pan, scrub_text
from switch.codec.message import Message, MessageError
from switch.codec.specs import SPECS

PAN = "4761739001010119"
CVV = "438"
DISCRETIONARY = f"2011{CVV}78089"
TRACK2_ASCII = f"{PAN}=2512{DISCRETIONARY}"
TRACK2_PACKED = f"{PAN}D2512{DISCRETIONARY}"
PIN_BLOCK = "0412AC89ABCDEF12"
ICC = "9F2608A1B2C3D4E5F607189F2701809F100706010A03A00000"
SECRETS = (PAN, TRACK2_ASCII, TRACK2_PACKED, f"2512{DISCRETIONARY}", PIN_BLOCK, PIN_BLOCK.lower(), ICC)


def fields_for(name: str) -> dict[str, str]:
    return {
        "t": "0200",
        "2": PAN,
        "3": "000000",
        "4": "000000012345",
        "11": "000123",
        "35": TRACK2_PACKED if name == "terminal_packed" else TRACK2_ASCII,
        "41": "TERM0001",
        "52": PIN_BLOCK,
        "55": ICC,
    }


def texts_of(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc)), *map(str, exc.args)]


def assert_clean(texts: list[str]) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into {text[:200]!r}"


def decode_errors(name: str) -> list[Exception]:
    """Every error decoding a damaged copy of the message: each truncation and some byte changes."""
    spec = SPECS[name]
    fields = fields_for(name)
    if name == "default_ascii":
        fields["52"] = PIN_BLOCK
    raw = bytes(codec.encode(fields, spec)[0])
    damaged = [raw[:cut] for cut in range(len(raw))] + [raw + b"\x00"]
    for at in range(len(raw)):
        for value in (0xFF, ord("Z"), 0x99):
            if raw[at] != value:
                damaged.append(raw[:at] + bytes([value]) + raw[at + 1 :])
    errors = []
    for data in damaged:
        try:
            codec.decode(data, spec)
        except Exception as e:
            errors.append(e)
        try:
            codec.decode_fields(data, spec)
        except Exception as e:
            errors.append(e)
    return errors


def encode_errors(name: str) -> list[Exception]:
    spec = SPECS[name]
    base = fields_for(name)
    broken: list[dict] = []
    for key in base:
        for bad in (base[key] + "0" * 1200, base[key] + "é", base[key][:-1], "ZZ" + base[key], 12, b"12"):
            broken.append(base | {key: bad})
    broken += [
        base | {PAN: "x"},  # out-of-range key quoting the PAN
        base | {int(PAN): "x"},  # non-str key quoting the PAN
        base | {f"{PAN}½": "x"},  # isnumeric but not int(): pyiso8583's ValueError quotes it
        {k: v for k, v in base.items() if k != "t"},
    ]
    errors = []
    for fields in broken:
        for fn in (codec.encode, codec.encode_bytes):
            try:
                fn(copy.deepcopy(fields), spec)
            except Exception as e:
                errors.append(e)
    return errors


@pytest.fixture(params=["fast", "pure"])
def path(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    previous = codec.use_fast_path(request.param == "fast")
    yield request.param
    codec.use_fast_path(previous)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_errors_never_show_card_data(name: str, path: str, caplog: pytest.LogCaptureFixture) -> None:
    errors = decode_errors(name)
    kinds = {e.msg.split(",")[0].split(" is ")[0] for e in errors if isinstance(e, codec.DecodeError)}
    # Several distinct kinds: short length, short data, bad length digits, bad data, extra data...
    assert len(kinds) >= 3, kinds
    logger = logging.getLogger("test.codec.masking")
    with caplog.at_level(logging.ERROR):
        for e in errors:
            assert_clean(texts_of(e))
            try:
                raise e
            except Exception:
                logger.exception("decode failed")
    assert_clean([caplog.text])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_encode_errors_never_show_card_data(name: str, path: str) -> None:
    errors = encode_errors(name)
    assert {type(e) for e in errors} >= {codec.EncodeError, ValueError}
    for e in errors:
        assert_clean(texts_of(e))


def test_pyiso8583_itself_would_have_leaked_the_pan() -> None:
    """The scrubbing above does something: the raw pyiso8583 texts of those key errors quote the PAN."""
    spec = SPECS["terminal_ascii"]
    for bad in ({"t": "0200", PAN: "x"}, {"t": "0200", int(PAN): "x"}):
        with pytest.raises(iso8583.EncodeError) as raw_error:
            iso8583.encode(dict(bad), spec)
        assert PAN in str(raw_error.value)
        with pytest.raises(codec.EncodeError) as ours:
            codec.encode(dict(bad), spec)
        assert PAN not in str(ours.value) and mask_pan(PAN) in str(ours.value)
    with pytest.raises(ValueError) as value_error:
        codec.encode({"t": "0200", f"{PAN}½": "x"}, spec)
    assert PAN not in str(value_error.value) and value_error.value.__context__ is None


def test_message_view_never_shows_card_data() -> None:
    fields = fields_for("terminal_ascii")
    msg = Message(fields)
    assert_clean([repr(msg), str(msg), repr(mask_fields(fields))])
    assert mask_pan(PAN) in repr(msg)
    bad = Message(fields | {"2": PAN + "X"})
    checks = (("99", lambda m: m[99]), ("35", lambda m: m.digits(35)), ("2", lambda m: m.digits(2)))
    for field, action in checks:
        with pytest.raises(MessageError) as info:
            action(bad)
        assert info.value.field == field
        assert_clean(texts_of(info.value))
    bad_amount = Message(fields | {"4": PAN + "X", "49": PAN})
    for getter in (lambda m: m.amount_minor, lambda m: m.currency):
        with pytest.raises(MessageError) as info:
            getter(bad_amount)
        assert_clean(texts_of(info.value))


def test_fallback_log_line_never_shows_card_data(caplog: pytest.LogCaptureFixture) -> None:
    spec = copy.deepcopy(SPECS["terminal_ascii"])
    spec["2"] = {"data_enc": "ascii", "len_enc": "b", "len_type": 9, "max_len": 19, "desc": "9-byte length"}
    spec["35"] = dict(spec["35"], len_count="digits")
    with caplog.at_level(logging.DEBUG):
        raw = bytes(codec.encode(fields_for("terminal_ascii"), spec)[0])
        codec.decode(raw, spec)
    assert "does not cover" in caplog.text
    assert_clean([caplog.text])


def test_scrub_text_masks_every_card_number_in_free_text() -> None:
    text = f"bad key {PAN} and track {TRACK2_ASCII} and {int(PAN)}"
    clean = scrub_text(text)
    assert_clean([clean])
    assert clean.count(mask_pan(PAN)) == 3
