"""The server's durable-writer thread (switch.server.durable): arms are durable when their callback runs,
a store-and-forward item's armed reversal is released only after the item is stored, RRN blocks never
overlap, and arms past the configured limit are refused while owed work is always taken."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from switch.codec import keys as keymod
from switch.config import StoreForwardConfig
from switch.routing.store_forward import StoreForward
from switch.server.armed import ArmedStore
from switch.server.durable import DurableBusy, DurableWriter
from switch.server.rrn_store import RrnStore

KEK = keymod.Kek(bytes(range(32)))
REVERSAL = {"t": "0400", "2": "4000000000000002", "4": "000000000500", "37": "000000000001", "52": "AB" * 8}


@pytest.fixture
def stores(tmp_path: Path):
    armed = ArmedStore(tmp_path / "armed.db", kek=KEK)
    saf = StoreForward.open(StoreForwardConfig(path=str(tmp_path / "saf.db")), kek=KEK)
    rrns = RrnStore(tmp_path / "rrn.hwm")
    yield armed, saf, rrns, tmp_path
    saf.close()
    armed.close()


def _writer(stores, limit: int = 1_000) -> tuple[DurableWriter, queue.Queue]:
    armed, saf, rrns, _ = stores
    delivered: queue.Queue = queue.Queue()
    w = DurableWriter(armed, saf, rrns, delivered.put, max_pending_items=limit)
    w.start()
    return w, delivered


def _results(delivered: queue.Queue, n: int) -> list:
    """Run the callbacks of n completions (as the trio thread would); returns their (error, value)."""
    out: list = []
    while len(out) < n:
        for callback, error, value in delivered.get(timeout=10):
            callback(error, value)
            out.append((error, value))
    return out


def test_an_arm_is_durable_when_its_callback_runs(stores) -> None:
    w, delivered = _writer(stores)
    seen: list = []
    both = [("alpha", "000000000001", REVERSAL), ("alpha", "000000000002", REVERSAL)]
    w.arm(both, 5, lambda e, v: seen.append(e))
    _results(delivered, 1)
    assert seen == [None]
    w.close()
    # a fresh connection (as after a crash) finds both, without the PIN block
    reopened = ArmedStore(stores[3] / "armed.db", kek=KEK)
    rows = reopened.all()
    reopened.close()
    assert [r[1] for r in rows] == ["000000000001", "000000000002"]
    assert all("52" not in r[2] and r[2]["2"] == REVERSAL["2"] for r in rows)


def test_release_after_a_store_and_forward_append_and_plain_releases(stores) -> None:
    armed, saf, _, _ = stores
    w, delivered = _writer(stores)
    w.arm([("alpha", "000000000001", REVERSAL), ("alpha", "000000000002", REVERSAL)], 5, lambda e, v: None)
    w.append_saf(
        [("alpha", "0400", REVERSAL, "reversal:alpha:000000000001")],
        6,
        [("alpha", "000000000001")],
        lambda e, v: None,
    )
    w.release([("alpha", "000000000002")])
    _results(delivered, 2)
    w.close()
    assert armed.all() == []
    assert [i.fields["37"] for i in saf.due(10**12, 10)] == ["000000000001"]


def test_a_failed_store_and_forward_append_keeps_the_arm(stores) -> None:
    armed = stores[0]
    w, delivered = _writer(stores)
    w.arm([("alpha", "000000000001", REVERSAL)], 5, lambda e, v: None)
    errors: list = []
    bad = [("alpha", "0999", REVERSAL, None)]
    w.append_saf(bad, 6, [("alpha", "000000000001")], lambda e, v: errors.append(e))
    _results(delivered, 2)
    w.close()
    assert isinstance(errors[0], ValueError)  # not a store-and-forward MTI
    assert [r[1] for r in armed.all()] == ["000000000001"]  # still armed: recovery will fire it


def test_rrn_blocks_follow_each_other(stores) -> None:
    w, delivered = _writer(stores)
    starts: list = []
    for _ in range(3):
        w.reserve_rrns(100, lambda e, v: starts.append(v))
    _results(delivered, 3)
    w.close()
    assert starts == [1, 101, 201]


def test_arms_beyond_the_limit_are_refused_but_owed_work_is_taken(stores) -> None:
    armed, saf, rrns, _ = stores
    w = DurableWriter(armed, saf, rrns, lambda done: None, max_pending_items=2)  # not started: nothing drains
    w.arm([("alpha", "000000000001", REVERSAL), ("alpha", "000000000002", REVERSAL)], 5, lambda e, v: None)
    with pytest.raises(DurableBusy, match="max_pending_durable_items"):
        w.arm([("alpha", "000000000003", REVERSAL)], 5, lambda e, v: None)
    w.release([("alpha", "000000000001")])
    w.append_saf([("alpha", "0400", REVERSAL, None)], 6, [], lambda e, v: None)
    assert w.pending_items == 4
    w.start()
    w.close()
    assert [r[1] for r in armed.all()] == ["000000000002"]
