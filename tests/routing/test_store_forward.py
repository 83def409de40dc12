"""Store-and-forward: durable before acknowledging, repeats as 0401, survives reopen and crashes,
never loses or duplicates an item, bounded by max_depth."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switch.codec.keys import Kek
from switch.config import StoreForwardConfig
from switch.routing.store_forward import (
    StoreForward,
    StoreForwardError,
    StoreForwardFullError,
)

PAN = "4111111111111111"
KEK_HEX = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"  # TEST-ONLY
KEK = Kek(bytes.fromhex(KEK_HEX))
CFG = StoreForwardConfig(retry_interval_ms=1000, max_retry_interval_ms=8000, max_depth=5)


def reversal(rrn: str = "000000000001") -> dict[str, str]:
    return {
        "t": "0400",
        "2": PAN,
        "4": "000000001234",
        "11": "000001",
        "37": rrn,
        "41": "T0000001",
        "35": PAN + "=2512101",
        "52": "0123456789ABCDEF",
        "64": "AABBCCDDEEFF0011",
    }


@pytest.fixture
def saf_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "saf.db"


def test_first_send_is_original_then_repeats_with_backoff(saf_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        item_id = q.append("acq", "0400", reversal(), now_ms=0)
        [item] = q.due(0)
        assert item.id == item_id and item.send_mti == "0400"
        sends = []
        now = 0
        for _ in range(6):
            [item] = q.due(now)
            sends.append((now, item.send_mti))
            q.mark_sent(item.id, now)
            assert q.due(now) == []
            now = q.next_due_ms()
        assert [m for _, m in sends] == ["0400"] + ["0401"] * 5
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(sends)]
        assert gaps == [1000, 2000, 4000, 8000, 8000]


def test_complete_removes_item_for_good(saf_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        item_id = q.append("acq", "0400", reversal(), 0)
        q.mark_sent(item_id, 0)
        assert q.complete(item_id, 50, "00")
        assert not q.complete(item_id, 60, "00")
        assert q.due(10**9) == [] and q.depth() == 0 and q.get(item_id) is None
        q.mark_sent(item_id, 70)  # an attempt racing the answer: harmless
        assert q.due(10**9) == []


def test_survives_reopen_and_repeat_is_sent_as_0401(saf_path: Path) -> None:
    q = StoreForward.open(CFG, saf_path, kek=KEK)
    sent = q.append("acq", "0400", reversal("1"), 0)
    unsent = q.append("acq", "0220", {"2": PAN, "4": "000000000500"}, 0)
    q.mark_sent(sent, 0)
    q.close()
    with StoreForward.open(CFG, saf_path, kek=KEK) as q2:
        assert q2.depth() == 2
        items = {i.id: i for i in q2.due(5000)}
        assert items[sent].send_mti == "0401"
        assert items[unsent].send_mti == "0220"
        assert items[sent].fields["37"] == "1"


def test_item_is_on_disk_when_append_returns_even_if_the_process_dies(saf_path: Path) -> None:
    script = (
        "import os\n"
        "from switch.codec.keys import Kek\n"
        "from switch.config import StoreForwardConfig\n"
        "from switch.routing.store_forward import StoreForward\n"
        f"kek = Kek(bytes.fromhex({KEK_HEX!r}))\n"
        f"q = StoreForward.open(StoreForwardConfig(), {str(saf_path)!r}, kek=kek)\n"
        "q.append('acq', '0400', {'2': '4111111111111111', '37': '42'}, 0)\n"
        "os._exit(0)\n"  # no close, no cleanup: like a kill -9 right after the acknowledgement
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        [item] = q.due(0)
        assert item.fields["37"] == "42"


def test_secret_fields_are_never_stored_and_repr_masks_the_pan(saf_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        q.append("acq", "0400", reversal(), 0)
        [item] = q.due(0)
        assert set(item.fields) == {"2", "4", "11", "37", "41"}
        assert PAN not in repr(item) and "411111******1111" in repr(item)
    raw = (
        saf_path.read_bytes() + (saf_path.parent / "saf.db-wal").read_bytes()
        if (saf_path.parent / "saf.db-wal").exists()
        else saf_path.read_bytes()
    )
    assert b"=2512101" not in raw and b"0123456789ABCDEF" not in raw


def test_dedup_key_makes_append_idempotent(saf_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        a = q.append("acq", "0400", reversal(), 0, dedup_key="reversal:1")
        b = q.append("acq", "0400", reversal(), 5, dedup_key="reversal:1")
        assert a == b and q.depth() == 1
        q.complete(a, 10)
        assert q.append("acq", "0400", reversal(), 20, dedup_key="reversal:1") == a
        assert q.depth() == 0
        assert q.prune_completed(11) == 1
        assert q.append("acq", "0400", reversal(), 30, dedup_key="reversal:1") != a


def test_max_depth_refuses_clearly_and_batches_are_all_or_nothing(saf_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        for i in range(4):
            q.append("acq", "0400", reversal(str(i)), 0)
        batch = [("acq", "0120", {"37": "a"}, None), ("acq", "0120", {"37": "b"}, None)]
        with pytest.raises(StoreForwardFullError, match="max_depth=5"):
            q.append_many(batch, 0)
        assert q.depth() == 4 and len(q.due(0)) == 4
        q.append("acq", "0400", reversal("x"), 0)
        with pytest.raises(StoreForwardFullError):
            q.append("acq", "0400", reversal("y"), 0)
        q.complete(q.due(0)[0].id, 1)
        q.append("acq", "0400", reversal("y"), 1)


def test_depth_oldest_age_and_per_acquirer_views(saf_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        assert q.oldest_age_ms(100) == 0 and q.next_due_ms() is None
        first = q.append("a", "0400", reversal("1"), 100)
        q.append("b", "0120", {"37": "2"}, 300)
        assert q.oldest_age_ms(1000) == 900
        assert q.depth() == 2 and q.depth("a") == 1
        assert [i.acquirer for i in q.due(1000, acquirer="b")] == ["b"]
        assert len(q.due(1000, max_items=1)) == 1
        q.complete(first, 400)
        assert q.oldest_age_ms(1000) == 700


def test_bad_input_and_bad_files_get_clear_errors(saf_path: Path, tmp_path: Path) -> None:
    with StoreForward.open(CFG, saf_path, kek=KEK) as q:
        with pytest.raises(ValueError, match="not MTI '0200'"):
            q.append("acq", "0200", {}, 0)
        with pytest.raises(ValueError, match="acquirer"):
            q.append("", "0400", {}, 0)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreForwardError, match=r"garbage\.db"):
        StoreForward.open(CFG, garbage, kek=KEK)
    with pytest.raises(StoreForwardError, match="retry_interval_ms"):
        bad = StoreForwardConfig(retry_interval_ms=10, max_retry_interval_ms=5)
        StoreForward.open(bad, saf_path, kek=KEK)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 3)),
        st.tuples(st.just("send"), st.integers(0, 50)),
        st.tuples(st.just("complete"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.integers(0, 5000)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=60)
@given(ops)
def test_never_loses_or_duplicates_across_reopens(tmp_path_factory, script) -> None:
    path = tmp_path_factory.mktemp("saf") / "saf.db"
    cfg = StoreForwardConfig(retry_interval_ms=100, max_retry_interval_ms=1000, max_depth=1000)
    q = StoreForward.open(cfg, path, kek=KEK)
    pending: dict[int, str] = {}  # id -> payload
    sent: set[int] = set()
    done: set[int] = set()
    now = 0
    n = 0
    try:
        for op, arg in script:
            if op == "append":
                key = f"k{arg}" if arg else None
                item_id = q.append("acq", "0400", {"37": f"p{n}"}, now, dedup_key=key)
                if item_id not in pending and item_id not in done:
                    pending[item_id] = f"p{n}"
                n += 1
            elif op == "send":
                due = q.due(now)
                if due:
                    item = due[arg % len(due)]
                    assert item.send_mti == ("0401" if item.id in sent else "0400")
                    q.mark_sent(item.id, now)
                    sent.add(item.id)
            elif op == "complete" and pending:
                item_id = sorted(pending)[arg % len(pending)]
                assert q.complete(item_id, now)
                del pending[item_id]
                done.add(item_id)
            elif op == "tick":
                now += arg
            elif op == "reopen":
                q.close()
                q = StoreForward.open(cfg, path, kek=KEK)
            everything = q.due(10**12, max_items=10_000)
            assert {i.id: i.fields["37"] for i in everything} == pending
            assert q.depth() == len(pending)
    finally:
        q.close()
