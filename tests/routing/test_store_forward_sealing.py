"""Store-and-forward card data at rest: the SQLite files hold no readable PAN, track data or PIN block
(pending, sent, completed, reopened, upgraded from clear rows); rows that do not open stop the start."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import msgspec
import pytest

from switch.codec.keys import Kek
from switch.codec.sealing import SealedRecord, decode_record
from switch.config import StoreForwardConfig
from switch.routing.store_forward import StoreForward, StoreForwardError

PANS = ["4761739001010119", "5425233430109903", "4263982640269299"]
TRACK2 = PANS[0] + "=25122011758928889"
PIN_BLOCK = "0412AC89ABCDEF67"
KEK = Kek(bytes.fromhex("F0E1D2C3B4A5968778695A4B3C2D1E0F00112233445566778899AABBCCDDEEFF"))  # TEST-ONLY
CFG = StoreForwardConfig(retry_interval_ms=100, max_retry_interval_ms=1000, max_depth=1000)


def reversal(pan: str, rrn: str) -> dict[str, str]:
    return {
        "t": "0400",
        "2": pan,
        "4": "000000001234",
        "14": "2512",
        "35": pan + "=25122011758928889",
        "37": rrn,
        "41": "T0000001",
        "52": PIN_BLOCK,
        "55": "9F2608AABBCCDDEEFF0011",
    }


def file_bytes(path: Path) -> bytes:
    """The database and everything SQLite keeps beside it (WAL, shared memory, journal)."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def assert_no_card_data(raw: bytes) -> None:
    for pan in PANS:
        assert pan.encode() not in raw, "full PAN in the file"
        assert pan[6:].encode() not in raw, "PAN digits beyond the BIN in the file"
    assert b"=25122011758928889" not in raw and PIN_BLOCK.encode() not in raw
    assert b"9F2608AABBCCDDEEFF0011" not in raw


def test_files_hold_no_pan_while_pending_sent_completed_and_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "saf.db"
    with StoreForward.open(CFG, path, kek=KEK) as q:
        ids = [q.append("alpha", "0400", reversal(pan, f"00000000000{i}"), 0) for i, pan in enumerate(PANS)]
        q.append("alpha", "0220", {"2": PANS[0], "4": "000000000500", "37": "000000000009"}, 0)
        assert_no_card_data(file_bytes(path))
        due = q.due(0)
        assert sorted(i.fields["2"] for i in due if i.mti == "0400") == sorted(PANS)  # opened to send
        q.mark_sent_many(ids, 0)
        q.complete(ids[0], 10, "00")
        assert_no_card_data(file_bytes(path))
    with StoreForward.open(CFG, path, kek=KEK) as q:
        assert {i.fields["2"] for i in q.due(10**9)} == {PANS[0], PANS[1], PANS[2]}
        for item in q.due(10**9):
            q.complete(item.id, 20, "00")
        assert_no_card_data(file_bytes(path))
    assert_no_card_data(file_bytes(path))


def test_completed_items_keep_no_sealed_part(tmp_path: Path) -> None:
    path = tmp_path / "saf.db"
    with StoreForward.open(CFG, path, kek=KEK) as q:
        done = q.append("alpha", "0400", reversal(PANS[0], "000000000001"), 0, dedup_key="reversal:1")
        pending = q.append("alpha", "0400", reversal(PANS[1], "000000000002"), 0)
        q.complete(done, 5)
    conn = sqlite3.connect(path)
    rows = dict(conn.execute("SELECT id, fields FROM saf_item").fetchall())
    conn.close()
    assert decode_record(rows[done]).sealed is None
    assert decode_record(rows[done]).clear["37"] == "000000000001"
    assert decode_record(rows[pending]).sealed is not None


def _swap_fields(path: Path, a: int, b: int) -> None:
    conn = sqlite3.connect(path)
    fa = conn.execute("SELECT fields FROM saf_item WHERE id = ?", (a,)).fetchone()[0]
    fb = conn.execute("SELECT fields FROM saf_item WHERE id = ?", (b,)).fetchone()[0]
    conn.execute("UPDATE saf_item SET fields = ? WHERE id = ?", (fb, a))
    conn.execute("UPDATE saf_item SET fields = ? WHERE id = ?", (fa, b))
    conn.commit()
    conn.close()


def test_rows_moved_or_altered_in_the_file_stop_the_start_naming_the_row(tmp_path: Path) -> None:
    path = tmp_path / "saf.db"
    with StoreForward.open(CFG, path, kek=KEK) as q:
        a = q.append("alpha", "0400", reversal(PANS[0], "000000000001"), 0)
        b = q.append("alpha", "0400", reversal(PANS[1], "000000000002"), 0)
    _swap_fields(path, a, b)  # each row now carries the other's PAN and RRN
    with pytest.raises(StoreForwardError, match=r"saf\.db.*saf/\d/alpha/0400") as err:
        StoreForward.open(CFG, path, kek=KEK)
    assert not any(pan in str(err.value) or pan[6:] in str(err.value) for pan in PANS)
    _swap_fields(path, a, b)
    conn = sqlite3.connect(path)
    data = conn.execute("SELECT fields FROM saf_item WHERE id = ?", (a,)).fetchone()[0]
    record = decode_record(data)
    forged = msgspec.json.encode(SealedRecord({**record.clear, "4": "000099999999"}, record.sealed))
    conn.execute("UPDATE saf_item SET fields = ? WHERE id = ?", (forged, a))
    conn.commit()
    conn.close()
    with pytest.raises(StoreForwardError, match="altered"):
        StoreForward.open(CFG, path, kek=KEK)


def test_wrong_kek_stops_the_start_and_a_previous_kek_is_resealed(tmp_path: Path) -> None:
    path = tmp_path / "saf.db"
    new = Kek(os.urandom(32))
    with StoreForward.open(CFG, path, kek=KEK) as q:
        q.append("alpha", "0400", reversal(PANS[0], "000000000001"), 0)
    with pytest.raises(StoreForwardError, match=f"{KEK.check_value}.*{new.check_value}"):
        StoreForward.open(CFG, path, kek=new)
    with StoreForward.open(CFG, path, kek=new, previous_keks=[KEK]) as q:
        assert q.due(0)[0].fields["2"] == PANS[0]
    with StoreForward.open(CFG, path, kek=new) as q:  # the old KEK is no longer needed
        assert q.due(0)[0].fields["2"] == PANS[0]


def test_schema_1_file_with_clear_pans_is_sealed_and_scrubbed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "saf.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """
        CREATE TABLE saf_item (
            id INTEGER PRIMARY KEY AUTOINCREMENT, dedup_key TEXT UNIQUE, acquirer TEXT NOT NULL,
            mti TEXT NOT NULL, fields BLOB NOT NULL, created_ms INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_due_ms INTEGER NOT NULL, last_sent_ms INTEGER,
            completed_ms INTEGER, response_code TEXT);
        PRAGMA user_version=1;
        """
    )
    enc = msgspec.json.Encoder()
    for i, pan in enumerate(PANS):
        fields = {"2": pan, "4": "000000001234", "37": f"00000000000{i}"}
        conn.execute(
            "INSERT INTO saf_item (acquirer, mti, fields, created_ms, next_due_ms, completed_ms) "
            "VALUES ('alpha', '0400', ?, 0, 0, ?)",
            (enc.encode(fields), 5 if i == 0 else None),
        )
    conn.close()  # the last connection checkpoints: the clear PANs are in the main file now
    assert PANS[0].encode() in file_bytes(path)
    with StoreForward.open(CFG, path, kek=KEK) as q:
        assert {i.fields["2"] for i in q.due(0)} == {PANS[1], PANS[2]}
        assert q.depth() == 2
        assert_no_card_data(file_bytes(path))
    assert_no_card_data(file_bytes(path))
    with StoreForward.open(CFG, path, kek=KEK) as q:
        assert {i.fields["37"] for i in q.due(0)} == {"000000000001", "000000000002"}


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "saf.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=9")
    conn.close()
    with pytest.raises(StoreForwardError, match="schema version 9"):
        StoreForward.open(CFG, path, kek=KEK)
