"""KEK rotation and link MAC keys in switch.codec.keys: a Kek with previous KEKs opens what they sealed
but seals only under itself; re-seal moves a value to the current KEK; the sealers of the SAF and armed
stores take the previous KEKs from the Kek; link MAC keys are bound to their acquirer and purpose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from switch.codec import keys
from switch.codec.sealing import FieldSealer, SealingError
from switch.config import KeysConfig

TMK = bytes.fromhex("239E9176D6080DAE1F57CDF449465204")
LINK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def test_previous_keks_open_but_never_seal() -> None:
    k1, k2 = keys.Kek(os.urandom(32)), keys.Kek(os.urandom(32))
    old = k1.seal("T1", TMK)
    ring = k2.with_previous([k1])
    assert ring.open("T1", old).value == TMK
    assert ring.check_value == k2.check_value and ring.previous[0].check_value == k1.check_value
    fresh = ring.seal("T1", TMK)
    assert k2.open("T1", fresh).value == TMK
    with pytest.raises(keys.KeyStoreError):
        k1.open("T1", fresh)
    with pytest.raises(keys.KeyStoreError, match=f"{k2.check_value}, {k1.check_value}"):
        ring.open("T2", old)  # bound to its terminal, whichever KEK
    assert k1.check_value in repr(ring) and k1.check_value not in repr(k2)


def test_reseal_moves_only_what_a_previous_kek_sealed() -> None:
    k1, k2 = keys.Kek(os.urandom(32)), keys.Kek(os.urandom(32))
    ring = k2.with_previous([k1])
    moved = ring.reseal("T1", k1.seal("T1", TMK))
    assert moved is not None and k2.open("T1", moved).value == TMK
    assert ring.reseal("T1", moved) is None  # already under the current KEK
    link = ring.reseal_link_mac_key("alpha", k1.seal_link_mac_key("alpha", LINK))
    assert link is not None and k2.open_link_mac_key("alpha", link).value == LINK
    with pytest.raises(keys.KeyStoreError):
        ring.reseal("T1", keys.Kek(os.urandom(32)).seal("T1", TMK))


def test_link_mac_keys_are_bound_to_their_acquirer_and_purpose() -> None:
    kek = keys.Kek(os.urandom(32))
    sealed = kek.seal_link_mac_key("alpha", LINK)
    assert LINK.hex() not in sealed.lower()
    assert kek.open_link_mac_key("alpha", sealed).value == LINK
    with pytest.raises(keys.KeyStoreError, match="another acquirer"):
        kek.open_link_mac_key("beta", sealed)
    with pytest.raises(keys.KeyStoreError):
        kek.open("alpha", sealed)  # not a terminal master key either
    with pytest.raises(ValueError, match="16 bytes"):
        kek.seal_link_mac_key("alpha", LINK[:8])


def test_load_kek_attaches_previous_keks_from_env_and_files(tmp_path: Path) -> None:
    cur, old1, old2 = keys.generate_kek(), keys.generate_kek(), keys.generate_kek()
    path = tmp_path / "old.hex"
    path.write_text(old2)
    path.chmod(0o600)
    cfg = KeysConfig(kek_env="K", previous_kek_envs=["OLD"], previous_kek_files=[str(path)])
    kek = keys.load_kek(cfg, {"K": cur, "OLD": old1})
    assert kek.check_value == keys.Kek(bytes.fromhex(cur)).check_value
    assert [k.check_value for k in kek.previous] == [
        keys.Kek(bytes.fromhex(old1)).check_value,
        keys.Kek(bytes.fromhex(old2)).check_value,
    ]
    path.chmod(0o644)
    with pytest.raises(keys.KeyStoreError, match="chmod 600"):
        keys.load_kek(cfg, {"K": cur, "OLD": old1})


def test_field_sealer_takes_previous_keks_from_the_kek() -> None:
    k1, k2 = keys.Kek(os.urandom(32)), keys.Kek(os.urandom(32))
    record = FieldSealer(k1, "saf").seal({"2": "4761739001010119", "4": "1000"}, b"row1")
    with pytest.raises(SealingError, match=k1.check_value):
        FieldSealer(k2, "saf").open(record, b"row1")
    sealer = FieldSealer(k2.with_previous([k1]), "saf")
    assert sealer.open(record, b"row1")["2"] == "4761739001010119"
    assert not sealer.sealed_under_current_kek(record)
    assert sealer.sealed_under_current_kek(sealer.seal({"2": "4761739001010119"}, b"row1"))
