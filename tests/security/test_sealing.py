"""Field sealing (switch.codec.sealing): what a stored record hides, what it binds, how keys rotate."""

from __future__ import annotations

import os
import pickle

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.codec.keys import Kek
from switch.codec.masking import WIPED_FIELDS
from switch.codec.sealing import (
    HEADER_BYTES,
    KEY_ID_BYTES,
    SEALED_FIELDS,
    FieldSealer,
    SealedRecord,
    SealingError,
    decode_record,
    is_legacy,
    row_context,
    strip_sealed,
)

PAN = "4761739001010119"
TRACK2 = PAN + "=25122011758928889"
PIN_BLOCK = "0412AC89ABCDEF67"
TRACK1 = f"B{PAN}^CARDHOLDER/TEST^2512201100000438000000"
KEK = Kek(bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F"))  # TEST-ONLY
CTX = row_context("test", "alpha", "000000000001")


def message() -> dict[str, str]:
    return {
        "t": "0400",
        "2": PAN,
        "3": "000000",
        "4": "000000001234",
        "14": "2512",
        "35": TRACK2,
        "37": "000000000001",
        "41": "T0000001",
        "45": TRACK1,
        "52": PIN_BLOCK,
        "55": "9F2608AABBCCDDEEFF0011",
        "64": "0011223344556677",
    }


def test_record_hides_the_pan_and_never_holds_wiped_fields() -> None:
    sealer = FieldSealer(KEK, "test")
    data = sealer.seal(message(), CTX)
    secrets = (PAN, PAN[-10:], TRACK2, TRACK1, "CARDHOLDER", PIN_BLOCK, "2512", "9F2608AABBCCDDEEFF0011")
    for secret in (*secrets, "0011223344556677"):
        assert secret.encode() not in data
    record = decode_record(data)
    assert set(record.clear) == {"t", "3", "4", "37", "41"}  # readable for operators
    opened = sealer.open(data, CTX)
    assert opened == {k: v for k, v in message().items() if k not in WIPED_FIELDS}


@given(
    st.dictionaries(
        st.sampled_from(sorted({"2", "3", "4", "7", "11", "14", "37", "41", "42", "90", "102", "t"})),
        st.text(max_size=40),
    )
)
def test_any_field_dict_round_trips_without_its_wiped_fields(fields: dict[str, str]) -> None:
    sealer = FieldSealer(KEK, "test")
    assert sealer.open(sealer.seal(fields, CTX), CTX) == fields


def test_values_that_are_not_text_are_stored_as_text() -> None:
    sealer = FieldSealer(KEK, "test")
    assert sealer.open(sealer.seal({"2": 4761739001010119, "4": 12}, CTX), CTX) == {"2": PAN, "4": "12"}


def test_a_sealed_part_does_not_open_for_another_row_or_store() -> None:
    sealer = FieldSealer(KEK, "test")
    data = sealer.seal(message(), CTX)
    with pytest.raises(SealingError, match="test record test/alpha/000000000002") as err:
        sealer.open(data, row_context("test", "alpha", "000000000002"))
    assert PAN not in str(err.value)
    with pytest.raises(SealingError):
        FieldSealer(KEK, "other").open(data, CTX)


def test_an_altered_clear_field_does_not_open() -> None:
    sealer = FieldSealer(KEK, "test")
    record = decode_record(sealer.seal(message(), CTX))
    forged = msgspec.json.encode(SealedRecord({**record.clear, "4": "000099991234"}, record.sealed))
    with pytest.raises(SealingError, match="altered"):
        sealer.open(forged, CTX)
    dropped = msgspec.json.encode(
        SealedRecord({k: v for k, v in record.clear.items() if k != "4"}, record.sealed)
    )
    with pytest.raises(SealingError):
        sealer.open(dropped, CTX)


def test_a_flipped_ciphertext_bit_does_not_open() -> None:
    sealer = FieldSealer(KEK, "test")
    record = decode_record(sealer.seal(message(), CTX))
    assert record.sealed is not None
    blob = bytearray(record.sealed)
    blob[-1] ^= 1
    with pytest.raises(SealingError):
        sealer.open(msgspec.json.encode(SealedRecord(record.clear, bytes(blob))), CTX)


def test_wrong_kek_is_named_by_check_value_and_previous_keks_open() -> None:
    other = Kek(os.urandom(32))
    data = FieldSealer(KEK, "test").seal(message(), CTX)
    with pytest.raises(SealingError, match=KEK.check_value) as err:
        FieldSealer(other, "test").open(data, CTX)
    assert other.check_value in str(err.value)
    rotating = FieldSealer(other, "test", previous=[KEK])
    assert rotating.open(data, CTX)["2"] == PAN
    assert not rotating.sealed_under_current_kek(data)
    resealed = rotating.seal(rotating.open(data, CTX), CTX)
    assert rotating.sealed_under_current_kek(resealed)
    assert FieldSealer(other, "test").open(resealed, CTX)["2"] == PAN


def test_each_sealer_draws_its_own_key_and_rotates_after_its_budget() -> None:
    a, b = FieldSealer(KEK, "test"), FieldSealer(KEK, "test")
    assert a.key_header != b.key_header  # every start seals under a fresh key
    small = FieldSealer(KEK, "test", max_seals_per_key=3)
    seen = []
    records = []
    for _ in range(7):
        records.append(small.seal(message(), CTX))
        seen.append(decode_record(records[-1]).sealed[:HEADER_BYTES])  # type: ignore[index]
    assert len(set(seen)) == 3 and seen[0] == seen[2] != seen[3] == seen[5] != seen[6]
    # records under retired keys still open
    assert all(small.open(r, CTX)["2"] == PAN for r in records)
    # and so does a fresh sealer of the same KEK (after a restart)
    assert all(FieldSealer(KEK, "test").open(r, CTX)["2"] == PAN for r in records)


def test_nonces_never_repeat_under_one_key() -> None:
    sealer = FieldSealer(KEK, "test")
    nonces = {
        decode_record(sealer.seal(message(), CTX)).sealed[HEADER_BYTES : HEADER_BYTES + 12]
        for _ in range(500)
    }  # type: ignore[index]
    assert len(nonces) == 500


def test_data_keys_differ_by_purpose_and_key_id_and_hide_in_reprs() -> None:
    key_id = bytes(KEY_ID_BYTES)
    k1 = KEK.derive_data_key("saf", key_id)
    assert k1 == KEK.derive_data_key("saf", key_id)
    assert k1 != KEK.derive_data_key("armed", key_id)
    assert k1 != KEK.derive_data_key("saf", b"\x01" * KEY_ID_BYTES)
    assert len(k1) == 32
    assert k1.value.hex() not in repr(k1).lower() and k1.value.hex().upper() not in repr(k1)
    sealer = FieldSealer(KEK, "saf")
    assert "kcv=" in repr(sealer) and k1.value.hex() not in repr(sealer).lower()
    with pytest.raises(TypeError):
        pickle.dumps(sealer)
    with pytest.raises(ValueError):
        KEK.derive_data_key("", key_id)


def test_bad_input_gets_clear_errors() -> None:
    sealer = FieldSealer(KEK, "test")
    with pytest.raises(SealingError, match="not a sealed record"):
        sealer.open(b"not json", CTX)
    with pytest.raises(SealingError, match="removed"):
        sealer.open(strip_sealed(sealer.seal(message(), CTX)), CTX)
    with pytest.raises(SealingError, match="version"):
        sealer.open(msgspec.json.encode(SealedRecord({}, b"\x09" * 60)), CTX)
    with pytest.raises(SealingError, match="version"):
        sealer.open(msgspec.json.encode(SealedRecord({}, b"\x01")), CTX)
    with pytest.raises(ValueError, match="NUL"):
        row_context("a\x00b")
    with pytest.raises(ValueError, match="purpose"):
        FieldSealer(KEK, "")
    with pytest.raises(ValueError, match="max_seals_per_key"):
        FieldSealer(KEK, "test", max_seals_per_key=0)


def test_row_context_keeps_parts_apart() -> None:
    assert row_context("a:b", "c") != row_context("a", "b:c")


def test_legacy_rows_are_recognised_and_stripping_keeps_only_clear_fields() -> None:
    sealer = FieldSealer(KEK, "test")
    assert is_legacy(msgspec.json.encode({"2": PAN, "37": "1"}))
    data = sealer.seal(message(), CTX)
    assert not is_legacy(data) and not is_legacy(b"garbage")
    stripped = strip_sealed(data)
    assert decode_record(stripped) == SealedRecord(decode_record(data).clear, None)
    assert SEALED_FIELDS.isdisjoint(decode_record(stripped).clear)
