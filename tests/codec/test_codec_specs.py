"""The shipped profiles: shape, known bytes of the packed profile, profile-independent decoded dicts,
and docs/messages.md kept in step with the specs."""

from __future__ import annotations

from pathlib import Path

import iso8583
import iso8583.specs
import pytest

import switch.codec as codec
from switch.codec.specs import FIELDS, PROFILES, SPECS, SWITCH_FIELDS, get_spec, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "messages.md"
PAN = "4761739001010119"


def test_shipped_names_and_pyiso8583_own_specs() -> None:
    assert set(SPECS) == {"default", "default_ascii", "terminal_ascii", "terminal_packed", "acquirer_1987"}
    assert SPECS["default"] is iso8583.specs.default
    assert SPECS["default_ascii"] is iso8583.specs.default_ascii
    assert get_spec("terminal_ascii") is SPECS["terminal_ascii"]
    with pytest.raises(KeyError, match="known: acquirer_1987, default"):
        get_spec("nope")


@pytest.mark.parametrize("name", PROFILES)
def test_every_field_1_to_128_is_defined(name: str) -> None:
    """A corrupted bitmap then fails on field data (DecodeError), never on a missing spec (KeyError)."""
    spec = SPECS[name]
    assert {"h", "t", "p", "1"} <= set(spec)
    assert all(str(n) in spec for n in range(2, 129))
    assert spec["h"]["max_len"] == 0


def test_terminal_ascii_profile() -> None:
    spec = SPECS["terminal_ascii"]
    assert spec["p"]["data_enc"] == spec["1"]["data_enc"] == "b"
    assert spec["t"]["data_enc"] == "ascii"
    for n in (2, 3, 4, 11, 22, 35, 49):
        assert spec[str(n)]["data_enc"] == "ascii"
    assert spec["2"]["len_type"] == 2 and spec["2"]["len_enc"] == "ascii"
    for n in (52, 64, 128):
        assert (spec[str(n)]["data_enc"], spec[str(n)]["max_len"], spec[str(n)]["len_type"]) == ("b", 8, 0)
    icc = spec["55"]
    assert (icc["data_enc"], icc["len_enc"], icc["len_type"], icc["max_len"]) == ("b", "ascii", 3, 255)


def test_terminal_packed_profile() -> None:
    spec = SPECS["terminal_packed"]
    assert spec["t"]["data_enc"] == "b" and spec["p"]["data_enc"] == "b"
    for n, (attr, _) in FIELDS.items():
        entry = spec[str(n)]
        if attr[0] in "nz" and not attr.startswith("ns") and n not in (60, 61, 62, 63):
            assert entry["data_enc"] == "b" and entry["len_count"] == "nibbles" and entry["left_pad"] == "0"
            if entry["len_type"]:
                assert entry["len_enc"] == "bcd"
    assert spec["2"]["len_type"] == 1 and spec["55"]["len_type"] == 2
    assert spec["55"].get("len_count", "bytes") == "bytes" and spec["55"]["len_enc"] == "bcd"


def test_packed_known_bytes() -> None:
    """Hand-assembled CUP-style bytes: BCD MTI, binary bitmap, BCD lengths counted in digits."""
    fields = {"t": "0200", "2": PAN, "3": "000000", "4": "000000012345", "11": "000123", "22": "051"}
    expected = bytes.fromhex(
        "0200"  # MTI
        "7020040000000000"  # fields 2, 3, 4 / 11 / 22
        "16" "4761739001010119"  # 2: 16 digits
        "000000"  # 3
        "000000012345"  # 4
        "000123"  # 11
        "0051"  # 22: n3, left-padded
    )  # fmt: skip
    raw, _ = codec.encode(dict(fields), SPECS["terminal_packed"])
    assert bytes(raw) == expected
    decoded, _ = codec.decode(expected, SPECS["terminal_packed"])
    assert decoded == fields | {"p": "7020040000000000"}
    odd = dict(fields, **{"2": PAN[:-1]})
    raw, _ = codec.encode(odd, SPECS["terminal_packed"])
    assert bytes(raw)[10:19] == bytes.fromhex("15" "0476173900101011")  # fmt: skip


def test_acquirer_secondary_bitmap_fields_90_and_128() -> None:
    spec = SPECS["acquirer_1987"]
    original = "0200" + "000123" + "0508103045" + "00000012345" + "00000000000"
    fields = {"t": "0400", "11": "000124", "70": "301", "90": original, "95": "0" * 42, "128": "00" * 8}
    raw, enc = codec.encode(dict(fields), spec)
    assert bytes(raw)[4] & 0x80  # secondary bitmap present
    assert enc["1"]["data"] == bytes.fromhex("0400004200000001")
    decoded, _ = codec.decode(bytes(raw), spec)
    assert decoded["90"] == original and decoded["128"] == "00" * 8


def test_decoded_dicts_do_not_depend_on_the_profile() -> None:
    fields = {
        "t": "0200", "2": PAN, "3": "000000", "4": "000000012345", "11": "000123", "12": "103045",
        "13": "0508", "22": "051", "37": "000000000001", "41": "TERM0001", "42": "MERCHANT0000001",
        "49": "978", "52": "0123456789ABCDEF", "55": "9F2701809F3602000A", "64": "A1B2C3D4E5F60718",
    }  # fmt: skip
    results = []
    for name in PROFILES:
        raw, _ = codec.encode(dict(fields), SPECS[name])
        decoded, _ = codec.decode(bytes(raw), SPECS[name])
        results.append(decoded)
    assert results[0] == results[1] == results[2]


def test_docs_document_every_switch_field_per_profile_and_mti() -> None:
    text = DOCS.read_text()
    assert markdown_table() in text, "regenerate the table: python -c 'from switch.codec.specs import *; ...'"
    for mti in ("0100", "0110", "0200", "0210", "0220", "0230", "0400", "0410", "0420", "0430", "0500",
                "0510", "0800", "0810"):  # fmt: skip
        assert mti in text
    usage = text.split("## Fields per MTI", 1)[1]
    for n in SWITCH_FIELDS:
        assert f"\n| {n} |" in usage, f"field {n} missing from the per-MTI table"
