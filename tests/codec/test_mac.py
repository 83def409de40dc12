"""MAC algorithms: public vectors, fast == reference == fallback, padding, keys kept out of text, verify."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.codec import mac
from switch.codec import mac_reference as ref

VECTORS_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "mac.json"


def _load_vectors() -> dict[str, Any]:
    if not VECTORS_PATH.is_file():
        raise FileNotFoundError(f"MAC vectors not found at {VECTORS_PATH} (../shared beside the checkout)")
    return json.loads(VECTORS_PATH.read_text())


VECTORS = _load_vectors()


def _data(vector: dict[str, Any]) -> bytes:
    if "data_ascii" in vector:
        return vector["data_ascii"].encode("ascii")
    return bytes.fromhex(vector["data_hex"])


def _cases(group: str) -> list[Any]:
    return [pytest.param(v, id=f"{group}-{i}") for i, v in enumerate(VECTORS[group])]


def _des_impls() -> list[Any]:
    impls = [
        pytest.param(lambda k, d, p: mac.cbc_mac(k, d, p), id="function"),
        pytest.param(lambda k, d, p: mac.DesMacKey(k, pure=True).mac(d, p), id="fallback"),
        pytest.param(lambda k, d, p: ref.cbc_mac(k, d, p), id="reference"),
    ]
    if mac.FAST_PATH:
        impls.append(pytest.param(lambda k, d, p: mac.DesMacKey(k, pure=False).mac(d, p), id="fast"))
    return impls


def _retail_impls() -> list[Any]:
    impls = [
        pytest.param(lambda k, d, p: mac.retail_mac(k, d, p), id="function"),
        pytest.param(lambda k, d, p: mac.RetailMacKey(k, pure=True).mac(d, p), id="fallback"),
        pytest.param(lambda k, d, p: ref.retail_mac(k, d, p), id="reference"),
    ]
    if mac.FAST_PATH:
        impls.append(pytest.param(lambda k, d, p: mac.RetailMacKey(k, pure=False).mac(d, p), id="fast"))
    return impls


def test_vectors_cover_every_algorithm() -> None:
    assert len(VECTORS["iso9797_1_alg1_des"]) >= 2
    assert len(VECTORS["iso9797_1_alg3_retail"]) >= 3
    assert len(VECTORS["aes_cmac"]) >= 4


@pytest.mark.parametrize("impl", _des_impls())
@pytest.mark.parametrize("vector", _cases("iso9797_1_alg1_des"))
def test_cbc_mac_vectors(vector: dict[str, Any], impl: Any) -> None:
    out = impl(bytes.fromhex(vector["key"]), _data(vector), vector.get("padding", 1))
    assert out.hex().upper() == vector["mac"].upper()


@pytest.mark.parametrize("impl", _retail_impls())
@pytest.mark.parametrize("vector", _cases("iso9797_1_alg3_retail"))
def test_retail_mac_vectors(vector: dict[str, Any], impl: Any) -> None:
    out = impl(bytes.fromhex(vector["key"]), _data(vector), vector.get("padding", 1))
    assert out.hex().upper() == vector["mac"].upper()


@pytest.mark.parametrize("impl", [mac.aes_cmac, ref.aes_cmac, lambda k, d: mac.AesCmacKey(k).mac(d)])
@pytest.mark.parametrize("vector", _cases("aes_cmac"))
def test_aes_cmac_vectors(vector: dict[str, Any], impl: Any) -> None:
    assert impl(bytes.fromhex(vector["key"]), _data(vector)).hex() == vector["mac"].lower()


def test_the_extension_is_built() -> None:
    """The switch runs its MACs in C; a missing build must be noticed, not silently slow."""
    import os

    if os.environ.get(mac.PURE_ENV, "") not in ("", "0"):
        assert not mac.FAST_PATH
    else:
        assert mac.FAST_PATH, "switch._speedups.mac is not built (python setup.py build_ext --inplace)"


keys8 = st.binary(min_size=8, max_size=8)
keys16 = st.binary(min_size=16, max_size=16)
paddings = st.sampled_from([1, 2])
messages = st.binary(max_size=300)


@given(keys16, messages, paddings)
def test_retail_mac_matches_reference(key: bytes, data: bytes, padding: int) -> None:
    expected = ref.retail_mac(key, data, padding)
    assert mac.retail_mac(key, data, padding) == expected
    assert mac.RetailMacKey(key, pure=True).mac(data, padding) == expected
    if mac.FAST_PATH:
        assert mac.RetailMacKey(key, pure=False).mac(data, padding) == expected


@given(keys8, messages, paddings)
def test_cbc_mac_matches_reference(key: bytes, data: bytes, padding: int) -> None:
    expected = ref.cbc_mac(key, data, padding)
    assert mac.cbc_mac(key, data, padding) == expected
    assert mac.DesMacKey(key, pure=True).mac(data, padding) == expected


@given(st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)), messages)
def test_aes_cmac_matches_reference(key: bytes, data: bytes) -> None:
    assert mac.aes_cmac(key, data) == ref.aes_cmac(key, data)


_SHARED_FALLBACK = mac.RetailMacKey(bytes(range(16)), pure=True)
_SHARED_FALLBACK_DES = mac.DesMacKey(bytes(range(8)), pure=True)


@given(st.lists(st.tuples(messages, paddings), min_size=1, max_size=8))
def test_fallback_key_objects_are_stateless_across_calls(calls: list[tuple[bytes, int]]) -> None:
    """The fallback keeps one CBC context per key for its lifetime; earlier MACs must not leak in."""
    for data, padding in calls:
        assert _SHARED_FALLBACK.mac(data, padding) == ref.retail_mac(bytes(range(16)), data, padding)
        assert _SHARED_FALLBACK_DES.mac(data, padding) == ref.cbc_mac(bytes(range(8)), data, padding)


@given(keys16, messages, paddings)
def test_buffer_types_give_the_same_mac(key: bytes, data: bytes, padding: int) -> None:
    expected = mac.retail_mac(key, data, padding)
    assert mac.retail_mac(bytearray(key), bytearray(data), padding) == expected
    assert mac.retail_mac(memoryview(key), memoryview(data), padding) == expected
    assert mac.RetailMacKey(key, pure=True).mac(memoryview(data), padding) == expected


def test_padding_method_1_empty_data_is_one_zero_block() -> None:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    assert mac.retail_mac(key, b"", 1) == mac.retail_mac(key, bytes(8), 1)
    assert mac.cbc_mac(key[:8], b"", 1) == mac.cbc_mac(key[:8], bytes(8), 1)
    assert mac.RetailMacKey(key, pure=True).mac(b"", 1) == mac.retail_mac(key, bytes(8), 1)


def test_padding_method_2_always_adds_a_marker() -> None:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    block = b"ABCDEFGH"
    assert mac.retail_mac(key, block, 2) == mac.retail_mac(key, block + b"\x80" + bytes(7), 1)
    assert mac.retail_mac(key, b"", 2) == mac.retail_mac(key, b"\x80" + bytes(7), 1)
    assert mac.retail_mac(key, b"abc", 2) != mac.retail_mac(key, b"abc", 1)


@pytest.mark.parametrize("padding", [0, 3, -1, 9])
def test_unknown_padding_is_a_clear_error(padding: int) -> None:
    key = bytes(16)
    for fn in (
        lambda: mac.retail_mac(key, b"data", padding),
        lambda: mac.cbc_mac(key[:8], b"data", padding),
        lambda: mac.RetailMacKey(key, pure=True).mac(b"data", padding),
        lambda: ref.retail_mac(key, b"data", padding),
    ):
        with pytest.raises(ValueError, match="padding method"):
            fn()


SECRET = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")


@pytest.mark.parametrize(
    ("call", "size"),
    [
        (lambda k: mac.retail_mac(k, b"x"), 16),
        (lambda k: mac.cbc_mac(k, b"x"), 8),
        (lambda k: mac.aes_cmac(k, b"x"), 16),
        (lambda k: mac.RetailMacKey(k), 16),
        (lambda k: mac.DesMacKey(k), 8),
    ],
)
def test_wrong_key_length_errors_never_show_the_key(call: Any, size: int) -> None:
    bad = SECRET[: size - 1] if size != 16 else SECRET + b"\x01"
    with pytest.raises(ValueError) as info:
        call(bad)
    text = str(info.value)
    assert "bytes" in text
    assert bad.hex() not in text.lower() and bad.hex().upper() not in text and repr(bad) not in text


def test_key_objects_hide_their_bytes() -> None:
    for obj in (mac.RetailMacKey(SECRET), mac.RetailMacKey(SECRET, pure=True), mac.DesMacKey(SECRET[:8]),
                mac.AesCmacKey(SECRET)):
        text = repr(obj) + str(obj)
        assert SECRET[:8].hex() not in text.lower()
        assert "hidden" in text
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_key_cache_is_bounded_and_still_correct() -> None:
    try:
        mac.set_key_cache_entries(2)
        keys = [bytes([i]) * 16 for i in range(5)]
        for key in keys * 2:
            assert mac.retail_mac(key, b"payload") == ref.retail_mac(key, b"payload")
        assert "2/2" in repr(mac._retail_keys)
        with pytest.raises(ValueError):
            mac.set_key_cache_entries(-1)
    finally:
        mac.set_key_cache_entries(mac.KEY_CACHE_ENTRIES)


def test_verify_mac_constant_time_compare_semantics() -> None:
    good = mac.retail_mac(SECRET, b"message")
    assert mac.verify_mac(good, mac.retail_mac(SECRET, b"message"))
    assert not mac.verify_mac(good, mac.retail_mac(SECRET, b"messagf"))
    assert not mac.verify_mac(good, good[:4])
    assert not mac.verify_mac(good, bytes(8))


@given(keys16, st.binary(min_size=1, max_size=200), st.data())
def test_tampered_data_or_mac_fails_verify(key: bytes, data: bytes, draw: st.DataObject) -> None:
    tag = mac.retail_mac(key, data)
    assert mac.verify_mac(tag, mac.retail_mac(key, data))
    i = draw.draw(st.integers(0, len(data) - 1))
    bit = draw.draw(st.integers(0, 7))
    tampered = bytearray(data)
    tampered[i] ^= 1 << bit
    assert not mac.verify_mac(tag, mac.retail_mac(key, bytes(tampered)))
    j = draw.draw(st.integers(0, 7))
    bad_tag = bytearray(tag)
    bad_tag[j] ^= 1 << bit
    assert not mac.verify_mac(bytes(bad_tag), mac.retail_mac(key, data))


def test_pure_switch_forces_the_fallback_in_a_fresh_process() -> None:
    import os
    import subprocess
    import sys

    code = (
        "from switch.codec import mac\n"
        "key = bytes.fromhex('0123456789ABCDEFFEDCBA9876543210')\n"
        "print(mac.FAST_PATH, mac.retail_mac(key, b'Now is the time for all ').hex().upper())\n"
    )
    env = {**os.environ, mac.PURE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "A1C72E74EA3FA9B6"]
