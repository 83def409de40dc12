"""Armed-reversal store card data at rest: the PAN is sealed in the file (both write paths), opened for
recovery, and the rows of an older (SQLite) file, even clear ones, are sealed into the log and the old
file scrubbed when it is opened."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import msgspec
import pytest

from switch.codec.keys import Kek
from switch.server import armed
from switch.server.armed import ArmedStore, ArmedStoreError

PANS = ["4761739001010119", "5425233430109903", "4263982640269299"]
PIN_BLOCK = "0412AC89ABCDEF67"
KEK = Kek(bytes.fromhex("00112233445566778899AABBCCDDEEFFF0E1D2C3B4A5968778695A4B3C2D1E0F"))  # TEST-ONLY


def reversal(pan: str, rrn: str) -> dict[str, str]:
    return {
        "t": "0400",
        "2": pan,
        "4": "000000001234",
        "35": pan + "=25122011758928889",
        "37": rrn,
        "52": PIN_BLOCK,
        "55": "9F2608AABBCCDDEEFF0011",
    }


def file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def assert_no_card_data(raw: bytes) -> None:
    for pan in PANS:
        assert pan[6:].encode() not in raw, "PAN digits beyond the BIN in the file"
    assert b"=25122011758928889" not in raw and PIN_BLOCK.encode() not in raw
    assert b"9F2608AABBCCDDEEFF0011" not in raw


def test_both_write_paths_seal_and_recovery_opens(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK)
    store.arm_many([("alpha", "000000000001", reversal(PANS[0], "000000000001"))], 0)
    store.apply(
        [
            (True, ("beta", "000000000002", reversal(PANS[1], "000000000002"), 1)),
            (True, ("beta", "000000000003", reversal(PANS[2], "000000000003"), 2)),
            (False, ("beta", "000000000003")),
        ]
    )
    assert_no_card_data(file_bytes(path))
    store.close()
    reopened = ArmedStore(path, kek=KEK)
    got = {(a, r): f for a, r, f in reopened.all()}
    assert set(got) == {("alpha", "000000000001"), ("beta", "000000000002")}
    assert got["alpha", "000000000001"] == {
        "t": "0400",
        "2": PANS[0],
        "4": "000000001234",
        "37": "000000000001",
    }
    reopened.release_many([("alpha", "000000000001"), ("beta", "000000000002")])
    assert len(reopened) == 0
    reopened.close()
    assert_no_card_data(file_bytes(path))


def test_a_record_moved_to_another_rrn_stops_the_start(tmp_path: Path) -> None:
    """Someone who can write the file forges a record under another RRN (CRC and all): the seal,
    bound to acquirer and RRN, does not open there, and the start stops naming the record."""
    path = tmp_path / "armed.db"
    store = ArmedStore(path, kek=KEK)
    store.arm_many([("alpha", "000000000001", reversal(PANS[0], "000000000001"))], 0)
    store.close()
    raw = path.read_bytes()  # the first generation is in the first slot
    epoch = armed._header_epoch(raw[: armed.HEADER_BYTES])
    assert epoch and epoch[0] == 1
    live, _ = armed._replay(raw, epoch)
    ((sealed, created),) = live.values()
    forged = armed._encode([(True, "alpha", "000000000777", sealed, created)], epoch)
    with open(path, "r+b") as f:
        f.seek(armed.HEADER_BYTES)
        f.write(forged + bytes(64))
    with pytest.raises(ArmedStoreError, match=r"armed\.db.*armed/alpha/000000000777") as err:
        ArmedStore(path, kek=KEK)
    assert PANS[0][6:] not in str(err.value)


def test_wrong_kek_stops_the_start_and_previous_kek_reseals(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    new = Kek(os.urandom(32))
    store = ArmedStore(path, kek=KEK)
    store.arm_many([("alpha", "000000000001", reversal(PANS[0], "000000000001"))], 0)
    store.close()
    with pytest.raises(ArmedStoreError, match=KEK.check_value):
        ArmedStore(path, kek=new)
    ArmedStore(path, kek=new, previous_keks=[KEK]).close()
    store = ArmedStore(path, kek=new)
    assert store.all()[0][2]["2"] == PANS[0]
    store.close()


def test_clear_rows_of_an_older_file_are_sealed_and_scrubbed(tmp_path: Path) -> None:
    path = tmp_path / "armed.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE armed (acquirer TEXT NOT NULL, rrn TEXT NOT NULL, fields BLOB NOT NULL, "
        "created_ms INTEGER NOT NULL, PRIMARY KEY (acquirer, rrn))"
    )
    for i, pan in enumerate(PANS):
        body = msgspec.json.encode({"2": pan, "4": "000000000100", "37": f"00000000000{i}"})
        conn.execute("INSERT INTO armed VALUES ('alpha', ?, ?, ?)", (f"00000000000{i}", body, i))
    conn.close()
    assert PANS[0].encode() in file_bytes(path)
    store = ArmedStore(path, kek=KEK)
    assert_no_card_data(file_bytes(path))
    assert sorted(f["2"] for _, _, f in store.all()) == sorted(PANS)
    store.close()
