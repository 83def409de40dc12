"""Sign-on key exchange and master-key storage: round trips, wrong KCVs/KEKs refused, no key in text."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import iso8583
import pytest
from hypothesis import given
from hypothesis import strategies as st
from iso8583.specs import default

from switch.codec import keys
from switch.config import KeysConfig, TerminalConfig

# ANSI/ISO test key; its KCV 08D7B4 is published widely (e.g. in HSM manuals).
TEST_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
keys16 = st.binary(min_size=16, max_size=16)


def test_known_check_value() -> None:
    assert keys.kcv(TEST_KEY).hex().upper() == "08D7B4"
    assert keys.kcv(TEST_KEY, 4).hex().upper().startswith("08D7B4")
    # A double-length key with equal halves is single DES: its KCV is the single-DES one.
    assert keys.kcv(TEST_KEY[:8] * 2) == keys.kcv(TEST_KEY[:8])


def test_generated_working_keys_are_usable_3des_keys() -> None:
    seen = set()
    for _ in range(50):
        key = keys.generate_working_key()
        assert len(key) == 16
        assert keys.has_odd_parity(key)
        assert key[:8] != key[8:]
        assert key[:8] not in keys.WEAK_DES_KEYS and key[8:] not in keys.WEAK_DES_KEYS
        seen.add(key)
    assert len(seen) == 50


def test_generation_skips_weak_and_single_length_candidates() -> None:
    weak = bytes.fromhex("0101010101010101")
    candidates = iter([weak + os.urandom(8), TEST_KEY[:8] * 2, TEST_KEY])
    assert keys.generate_working_key(lambda n: next(candidates)) == keys.set_odd_parity(TEST_KEY)


@given(st.binary(min_size=1, max_size=32))
def test_odd_parity_keeps_the_key_bits(raw: bytes) -> None:
    fixed = keys.set_odd_parity(raw)
    assert keys.has_odd_parity(fixed)
    assert bytes(b & 0xFE for b in fixed) == bytes(b & 0xFE for b in raw)
    assert keys.set_odd_parity(fixed) == fixed


@given(keys16, keys16)
def test_key_encryption_round_trip(kek: bytes, key: bytes) -> None:
    enc = keys.encrypt_key(kek, key)
    assert len(enc) == 16
    assert keys.decrypt_key(kek, enc) == key
    assert keys.decrypt_key(keys.SecretKey(kek), enc) == key


@given(keys16, keys16, keys16)
def test_signon_field_round_trip(tmk: bytes, pin: bytes, mac_key: bytes) -> None:
    field = keys.build_signon_field(tmk, pin, mac_key)
    assert len(field) == keys.SIGNON_FIELD_BYTES == 40
    assert field[16:20] == keys.kcv(pin, 4) and field[36:40] == keys.kcv(mac_key, 4)
    assert field[:16] == keys.encrypt_key(tmk, pin)
    for form in (field, field.hex().upper(), field.hex()):
        got = keys.parse_signon_field(tmk, form)
        assert got.pin_key.value == pin and got.mac_key.value == mac_key


def test_signon_field_travels_in_an_iso_message() -> None:
    """Field 62 as a binary field: pyiso8583 hands it back as hex text, which parse accepts."""
    tmk, pin, mac_key = (keys.generate_working_key() for _ in range(3))
    spec = {**default, "62": {**default["62"], "data_enc": "b", "len_type": 3, "max_len": 999}}
    fields = {"t": "0810", "39": "00", "62": keys.build_signon_field(tmk, pin, mac_key).hex().upper()}
    raw, _ = iso8583.encode(fields, spec)
    decoded, _ = iso8583.decode(bytes(raw), spec)
    got = keys.parse_signon_field(tmk, decoded["62"])
    assert got.mac_key.value == mac_key


def test_wrong_tmk_is_refused_by_kcv() -> None:
    tmk, other, pin, mac_key = (keys.generate_working_key() for _ in range(4))
    field = keys.build_signon_field(tmk, pin, mac_key)
    with pytest.raises(keys.KeyCheckError, match="PIN key check value mismatch") as info:
        keys.parse_signon_field(other, field)
    assert pin.hex() not in str(info.value).lower() and tmk.hex() not in str(info.value).lower()


@given(st.integers(0, 39), st.integers(0, 7))
def test_any_damaged_bit_is_refused(byte: int, bit: int) -> None:
    rnd = random.Random(byte * 8 + bit)
    tmk, pin, mac_key = (keys.set_odd_parity(rnd.randbytes(16)) for _ in range(3))
    field = bytearray(keys.build_signon_field(tmk, pin, mac_key))
    field[byte] ^= 1 << bit
    with pytest.raises(keys.KeyCheckError, match="check value mismatch"):
        keys.parse_signon_field(tmk, bytes(field))


@pytest.mark.parametrize("bad", [b"\x00" * 39, b"\x00" * 41, "ZZ" * 40, "00" * 20])
def test_malformed_field_62_is_a_clear_error(bad: bytes | str) -> None:
    with pytest.raises(ValueError, match="field 62"):
        keys.parse_signon_field(TEST_KEY, bad)


def test_key_containers_hide_their_bytes() -> None:
    pin, mac_key = keys.generate_working_key(), keys.generate_working_key()
    working = keys.parse_signon_field(TEST_KEY, keys.build_signon_field(TEST_KEY, pin, mac_key))
    kek = keys.Kek(bytes(range(32)))
    for obj in (working, working.pin_key, keys.SecretKey(TEST_KEY), kek):
        text = repr(obj) + str(obj) + repr([obj])
        for secret in (pin, mac_key, TEST_KEY, bytes(range(32))):
            assert secret.hex() not in text.lower()
        with pytest.raises(TypeError):
            pickle.dumps(obj)
    assert "08D7B4" in repr(keys.SecretKey(TEST_KEY))


def test_secret_key_equality_and_no_hash() -> None:
    assert keys.SecretKey(TEST_KEY) == keys.SecretKey(bytearray(TEST_KEY))
    assert keys.SecretKey(TEST_KEY) != keys.SecretKey(bytes(16))
    with pytest.raises(TypeError):
        hash(keys.SecretKey(TEST_KEY))


@pytest.mark.parametrize("size", [0, 7, 15, 17, 32])
def test_bad_key_lengths_are_named(size: int) -> None:
    with pytest.raises(ValueError, match="DES key"):
        keys.kcv(bytes(size))
    with pytest.raises(ValueError):
        keys.encrypt_key(bytes(size), TEST_KEY)


# ---- master keys at rest ----


def test_seal_and_open_round_trip() -> None:
    kek = keys.Kek(bytes.fromhex(keys.generate_kek()))
    tmk = keys.generate_working_key()
    sealed = kek.seal("T0000001", tmk)
    assert tmk.hex() not in sealed.lower()
    assert kek.open("T0000001", sealed).value == tmk
    assert kek.seal("T0000001", tmk) != sealed  # fresh nonce each time


def test_wrong_kek_or_wrong_terminal_does_not_open() -> None:
    kek, other = keys.Kek(os.urandom(32)), keys.Kek(os.urandom(32))
    sealed = kek.seal("T1", TEST_KEY)
    with pytest.raises(keys.KeyStoreError, match="does not open under the KEK"):
        other.open("T1", sealed)
    with pytest.raises(keys.KeyStoreError, match="another terminal"):
        kek.open("T2", sealed)
    tampered = sealed[:-2] + ("00" if sealed[-2:] != "00" else "01")
    with pytest.raises(keys.KeyStoreError):
        kek.open("T1", tampered)
    with pytest.raises(keys.KeyStoreError, match="not hex"):
        kek.open("T1", "xyz")
    with pytest.raises(keys.KeyStoreError, match="version"):
        kek.open("T1", "02" + sealed[2:])


def test_load_kek_from_environment() -> None:
    text = keys.generate_kek()
    kek = keys.load_kek(KeysConfig(kek_env="MY_KEK"), {"MY_KEK": text})
    assert kek.check_value == keys.Kek(bytes.fromhex(text)).check_value
    with pytest.raises(keys.KeyStoreError, match="set the environment variable MY_KEK"):
        keys.load_kek(KeysConfig(kek_env="MY_KEK"), {})
    with pytest.raises(keys.KeyStoreError, match="not hex") as info:
        keys.load_kek(KeysConfig(kek_env="MY_KEK"), {"MY_KEK": "G" + text[1:]})
    assert text[1:] not in str(info.value)
    with pytest.raises(keys.KeyStoreError, match="16, 24 or 32 bytes"):
        keys.load_kek(KeysConfig(kek_env="MY_KEK"), {"MY_KEK": text[:20]})


def test_load_kek_from_a_private_file(tmp_path: Path) -> None:
    text = keys.generate_kek()
    path = tmp_path / "kek.hex"
    path.write_text(text + "\n")
    path.chmod(0o600)
    kek = keys.load_kek(KeysConfig(kek_file=str(path)), {})
    assert kek.check_value == keys.Kek(bytes.fromhex(text)).check_value
    path.chmod(0o644)
    with pytest.raises(keys.KeyStoreError, match="chmod 600"):
        keys.load_kek(KeysConfig(kek_file=str(path)), {})
    with pytest.raises(keys.KeyStoreError, match="cannot read KEK file"):
        keys.load_kek(KeysConfig(kek_file=str(tmp_path / "missing")), {})


def test_load_master_keys_from_config() -> None:
    kek = keys.Kek(os.urandom(32))
    tmk1, tmk2 = keys.generate_working_key(), keys.generate_working_key()
    terminals = [
        TerminalConfig(id="T1", merchant_id="M1", master_key_encrypted_hex=kek.seal("T1", tmk1)),
        TerminalConfig(id="T2", merchant_id="M1", master_key_encrypted_hex=kek.seal("T2", tmk2)),
        TerminalConfig(id="T3", merchant_id="M1"),
    ]
    loaded = keys.load_master_keys(terminals, kek)
    assert sorted(loaded) == ["T1", "T2"]
    assert loaded["T1"].value == tmk1 and loaded["T2"].value == tmk2
    assert tmk1.hex() not in repr(loaded).lower()
    with pytest.raises(keys.KeyStoreError, match="'T1'"):
        keys.load_master_keys(terminals, keys.Kek(os.urandom(32)))
