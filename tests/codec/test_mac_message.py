"""Which bytes of an ISO message are MACed: sign/verify on pyiso8583-encoded messages of real specs."""

from __future__ import annotations

import copy
import functools
from typing import Any

import iso8583
import pytest
from hypothesis import given
from hypothesis import strategies as st
from iso8583.specs import default, default_ascii

from switch.codec import mac
from switch.codec import mac_reference as ref

KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
MAC_FN = functools.partial(mac.retail_mac, KEY)
SPECS = {"default": default, "default_ascii": default_ascii}


def _placeholder(spec: dict[str, Any], field: str) -> str:
    return "00" * 8 if spec[field]["data_enc"] == "b" else "0" * 16


def _purchase(spec: dict[str, Any], mac_field: str = "64", extra: dict[str, str] | None = None) -> bytes:
    fields = {
        "t": "0200",
        "2": "4761739001010119",
        "3": "000000",
        "4": "000000012345",
        "11": "000123",
        "41": "TERM0001",
        "49": "978",
        **(extra or {}),
    }
    fields[mac_field] = _placeholder(spec, mac_field)
    raw, _ = iso8583.encode(fields, spec)
    return bytes(raw)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sign_writes_the_retail_mac_over_mti_to_mac_field(name: str) -> None:
    spec = SPECS[name]
    raw = _purchase(spec)
    signed = mac.sign_message(raw, spec, MAC_FN)
    wire = 8 if spec["64"]["data_enc"] == "b" else 16
    assert len(signed) == len(raw)
    assert signed[:-wire] == raw[:-wire]
    expected = ref.retail_mac(KEY, raw[:-wire])
    decoded, _ = iso8583.decode(signed, spec)
    assert decoded["64"] == expected.hex().upper()
    assert mac.verify_message(signed, spec, MAC_FN)
    assert mac.mac_input(signed, spec) == raw[:-wire]
    assert raw[:4] == b"0200"  # the MACed bytes start at the MTI


@pytest.mark.parametrize("name", sorted(SPECS))
def test_secondary_bitmap_moves_the_mac_to_field_128(name: str) -> None:
    spec = SPECS[name]
    raw = _purchase(spec, "128", {"70": "301"})
    signed = mac.sign_message(raw, spec, MAC_FN)
    wire = 8 if spec["128"]["data_enc"] == "b" else 16
    decoded, _ = iso8583.decode(signed, spec)
    assert "64" not in decoded
    assert decoded["128"] == ref.retail_mac(KEY, raw[:-wire]).hex().upper()
    assert mac.verify_message(signed, spec, MAC_FN)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_layout_object_gives_the_same_result(name: str) -> None:
    spec = SPECS[name]
    layout = mac.mac_layout(spec)
    raw = _purchase(spec)
    assert mac.sign_message(raw, layout, MAC_FN) == mac.sign_message(bytearray(raw), spec, MAC_FN)


def test_lower_case_hex_mac_is_accepted() -> None:
    signed = mac.sign_message(_purchase(default_ascii), default_ascii, MAC_FN)
    lowered = signed[:-16] + signed[-16:].lower()
    assert lowered != signed
    assert mac.verify_message(lowered, default_ascii, MAC_FN)


def test_non_hex_mac_text_is_a_mismatch_not_a_crash() -> None:
    signed = mac.sign_message(_purchase(default_ascii), default_ascii, MAC_FN)
    assert not mac.verify_message(signed[:-16] + b"ZZZZZZZZZZZZZZZZ", default_ascii, MAC_FN)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_wrong_key_fails(name: str) -> None:
    spec = SPECS[name]
    signed = mac.sign_message(_purchase(spec), spec, MAC_FN)
    other = functools.partial(mac.retail_mac, bytes(16))
    assert not mac.verify_message(signed, spec, other)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_message_without_mac_as_last_field_is_a_format_error(name: str) -> None:
    spec = SPECS[name]
    fields = {"t": "0200", "3": "000000", "11": "000123", "41": "TERM0001"}
    raw, _ = iso8583.encode(fields, spec)
    with pytest.raises(mac.MacError, match="last field of the message is 41"):
        mac.verify_message(bytes(raw), spec, MAC_FN)
    with pytest.raises(mac.MacError):
        mac.sign_message(bytes(raw), spec, MAC_FN)
    # Field 64 present but followed by secondary-bitmap fields: the MAC must then be field 128.
    raw2 = _purchase(spec, "64", {"70": "301"})
    with pytest.raises(mac.MacError, match="last field of the message is 70"):
        mac.verify_message(raw2, spec, MAC_FN)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("cut", [0, 3, 4, 10])
def test_truncated_messages_are_format_errors(name: str, cut: int) -> None:
    spec = SPECS[name]
    signed = mac.sign_message(_purchase(spec), spec, MAC_FN)
    with pytest.raises(mac.MacError):
        mac.verify_message(signed[:cut], spec, MAC_FN)


def test_non_hex_ascii_bitmap_is_a_format_error() -> None:
    signed = mac.sign_message(_purchase(default_ascii), default_ascii, MAC_FN)
    broken = signed[:4] + b"XYZ" + signed[7:]
    with pytest.raises(mac.MacError, match="not hex"):
        mac.verify_message(broken, default_ascii, MAC_FN)


def test_spec_problems_are_named() -> None:
    no_mac = {k: v for k, v in default.items() if k not in ("64", "128")}
    with pytest.raises(mac.MacError, match="neither field 64 nor field 128"):
        mac.mac_layout(no_mac)
    variable = copy.deepcopy(default)
    variable["64"]["len_type"] = 2
    with pytest.raises(mac.MacError, match="fixed-length"):
        mac.mac_layout(variable)


def test_header_before_the_mti_is_not_maced() -> None:
    spec = copy.deepcopy(default)
    spec["h"]["max_len"] = 6
    fields = {"h": "ISOHDR", "t": "0200", "3": "000000", "11": "000123", "64": "00" * 8}
    raw, _ = iso8583.encode(fields, spec)
    signed = mac.sign_message(bytes(raw), spec, MAC_FN)
    assert signed[-8:] == ref.retail_mac(KEY, bytes(raw[6:-8]))
    assert mac.verify_message(b"OTHERH" + signed[6:], spec, MAC_FN)


def test_short_mac_function_output_is_rejected() -> None:
    with pytest.raises(ValueError, match="returned 4 bytes"):
        mac.sign_message(_purchase(default), default, lambda data: b"\x00" * 4)


def test_truncated_mac_field_carries_the_left_bytes() -> None:
    spec = copy.deepcopy(default_ascii)
    spec["64"]["max_len"] = 8  # 4 bytes of MAC as 8 hex characters
    fields = {"t": "0200", "3": "000000", "11": "000123", "64": "0" * 8}
    raw, _ = iso8583.encode(fields, spec)
    signed = mac.sign_message(bytes(raw), spec, MAC_FN)
    assert signed[-8:] == ref.retail_mac(KEY, bytes(raw[:-8]))[:4].hex().upper().encode()
    assert mac.verify_message(signed, spec, MAC_FN)


digits = st.text(alphabet="0123456789", min_size=1, max_size=19)
fixed_digits = lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)  # noqa: E731
field_dicts = st.fixed_dictionaries(
    {"t": st.sampled_from(["0200", "0210", "0400", "0800"])},
    optional={
        "2": digits,
        "3": fixed_digits(6),
        "4": fixed_digits(12),
        "11": fixed_digits(6),
        "37": st.text(alphabet="ABCDEF0123456789", min_size=12, max_size=12),
        "41": st.text(alphabet="ABCXYZ 0189", min_size=8, max_size=8),
        "70": fixed_digits(3),
    },
)


@given(st.sampled_from(sorted(SPECS)), field_dicts, st.data())
def test_any_signed_message_verifies_and_any_flipped_bit_fails(
    name: str, fields: dict[str, str], data: st.DataObject
) -> None:
    spec = SPECS[name]
    mac_field = "128" if "70" in fields else "64"
    fields[mac_field] = _placeholder(spec, mac_field)
    raw, _ = iso8583.encode(fields, spec)
    signed = mac.sign_message(bytes(raw), spec, MAC_FN)
    assert mac.verify_message(signed, spec, MAC_FN)
    covered = len(mac.mac_input(signed, spec))
    i = data.draw(st.integers(0, covered - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    tampered = bytearray(signed)
    tampered[i] ^= 1 << bit
    try:
        ok = mac.verify_message(bytes(tampered), spec, MAC_FN)
    except mac.MacError:
        return  # the flip hit the bitmap and moved the last field: a format error, also rejected
    assert not ok


def test_packed_profile_with_bcd_mti() -> None:
    """Packed terminals send a 2-byte BCD MTI; the MAC still starts at the MTI's first byte."""
    spec = copy.deepcopy(default)
    spec["t"].update({"data_enc": "b", "max_len": 2})
    fields = {"t": "0200", "3": "000000", "11": "000123", "64": "00" * 8}
    raw, _ = iso8583.encode(fields, spec)
    assert raw[:2] == b"\x02\x00"
    signed = mac.sign_message(bytes(raw), spec, MAC_FN)
    assert signed[-8:] == ref.retail_mac(KEY, bytes(raw[:-8]))
    assert mac.mac_layout(spec).mti_bytes == 2
    assert mac.verify_message(signed, spec, MAC_FN)
