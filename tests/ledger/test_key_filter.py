"""The writer's idempotency key filter (switch.ledger.keyfilter): never loses a key it was given, so
a repeat is always looked up; and spares storage the lookup of nearly every fresh key."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger import fast, keyfilter
from switch.ledger.backend import LedgerStorageError
from switch.ledger.keyfilter import KeyFilter
from switch.ledger.model import EntryKind, IdempotencyConflict
from switch.ledger.rules import LedgerRejected
from switch.ledger.writer import LedgerWriter
from tests.ledger.conftest import LedgerDb
from tests.ledger.drafts import draft


@pytest.fixture(params=[True, False], ids=["cython", "pure"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[bool]:
    previous = fast.use_fast_path(request.param)
    yield request.param
    fast.use_fast_path(previous)


def _keys(n: int, prefix: str) -> list[str]:
    rnd = random.Random(prefix)
    return [f"{prefix}:T{rnd.randrange(5000):07d}/{i:06d}:out" for i in range(n)]


def test_every_added_key_passes_across_stage_growth(fast_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfilter, "MIN_STAGE_KEYS", 1_000)
    f = KeyFilter()
    added = _keys(20_000, "added")
    f.add_all(added[:10])  # a partial stage, then a long run that fills several
    f.add_all(iter(added[10:]))
    assert f.count == len(added)
    assert f.stages >= 4, "1,000 + 2,000 + 4,000 + 8,000 keys before the last stage"
    assert f.maybe_present(added) == added, "no added key may ever be dropped"
    fresh = _keys(20_000, "fresh")
    passed = f.maybe_present(fresh)
    assert len(passed) < 0.05 * len(fresh), f"{len(passed)} false positives out of {len(fresh)}"


def test_the_cython_and_pure_stages_set_the_same_bits() -> None:
    previous = fast.use_fast_path(True)  # raises if the extension is not built: never passes idly
    try:
        ext = fast.key_filter_stage_ext()
    finally:
        fast.use_fast_path(previous)
    added, probe = _keys(5_000, "a"), _keys(50_000, "p")
    c, p = ext(4_096, 10, 7), keyfilter._PyStage(4_096, 10, 7)
    assert c.add_all(iter(added)) == p.add_all(iter(added)) == 4_096, "a full stage stops taking keys"
    assert c.nbits == p.nbits
    assert c.filter(probe) == p.filter(probe)
    assert c.filter(added[:4_096]) == added[:4_096]


def _sale(i: int, amount: int = 100) -> object:
    return draft(f"tk:T{i % 5}/M1/{i:06d}:out", EntryKind.PURCHASE, f"{i:012d}", amount, at_ms=1_000 + i)


def _asked_of_storage(w: LedgerWriter, lookup: str) -> list[str]:
    """Every key or rrn the writer passes to the backend's `lookup` from now on (on the pipeline's
    read connection if it has one)."""
    backend: Any = w._reader or w._backend
    asked: list[str] = []
    real = getattr(backend, lookup)

    def counting(values: Any) -> Any:
        values = list(values)
        asked.extend(values)
        return real(values)

    setattr(backend, lookup, counting)
    return asked


def _filters_built(w: LedgerWriter) -> None:
    """The filters are built in the background (adopted at the next batch): wait for the build."""
    assert w._filters is not None and w._filters.wait_built(10), "the ledger filters were never built"


#: Small batches and runs: the tests cross several index runs.
SMALL = LedgerConfig(batch_window_ms=0, max_batch_entries=50, index_run_entries=40)


def _writer_with_filters(db: LedgerDb, key: Ed25519PrivateKey) -> LedgerWriter:
    w = LedgerWriter(db.open(), signing_key=key, config=SMALL)
    _filters_built(w)
    return w


def test_fresh_keys_skip_the_indexed_lookup_and_repeats_still_find_their_original(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    w = _writer_with_filters(ledger_backend, signing_key)
    asked = _asked_of_storage(w, "find_idempotency_indexed")
    try:
        for lo in range(0, 400, 50):
            w.append([_sale(i) for i in range(lo, lo + 50)])  # type: ignore[misc]
        assert len(asked) < 40, f"{len(asked)} of 400 fresh keys went to storage"
        asked.clear()
        for i in (0, 7, 39):  # long indexed by now
            assert w.append([_sale(i)])[0].seq == i  # type: ignore[list-item]
            with pytest.raises(IdempotencyConflict):
                w.append([_sale(i, amount=555)])  # type: ignore[list-item]
        assert len(asked) >= 6, "every repeat of an indexed key is asked of storage"
        assert w.size == 400
    finally:
        w.close()

    # After a restart the filter is refilled from the index: a repeat is still found.
    w = _writer_with_filters(ledger_backend, signing_key)
    try:
        assert w.append([_sale(3)])[0].seq == 3  # type: ignore[list-item]
        assert w.append([_sale(400)])[0].seq == 400  # type: ignore[list-item]
    finally:
        w.close()


def test_fresh_rrns_skip_the_family_lookup_and_refunds_still_find_their_sale(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    w = _writer_with_filters(ledger_backend, signing_key)
    asked = _asked_of_storage(w, "txn_rows")
    try:
        for lo in range(0, 200, 50):
            w.append([_sale(i) for i in range(lo, lo + 50)])  # type: ignore[misc]
        assert len(asked) < 20, f"{len(asked)} of 200 fresh rrns went to storage"
        refund = draft("refund-7", EntryKind.REFUND, "F7", 60, f"{7:012d}")
        assert w.append([refund])[0].seq == 200
        assert f"{7:012d}" in asked, "an rrn that exists is always asked of storage"
    finally:
        w.close()

    w = _writer_with_filters(ledger_backend, signing_key)
    try:  # after a restart the filter is refilled from the entries: the refund is still capped
        with pytest.raises(LedgerRejected):
            w.append([draft("refund-7b", EntryKind.REFUND, "F7B", 41, f"{7:012d}")])
        assert w.append([draft("refund-7c", EntryKind.REFUND, "F7C", 40, f"{7:012d}")])[0].seq == 201
    finally:
        w.close()


def _wait_for_index_run(w: LedgerWriter) -> None:
    """The background indexer starts a run after a batch; wait until that run has ended."""
    assert w._indexer is not None
    deadline = time.monotonic() + 10
    while w._indexer.busy:
        assert time.monotonic() < deadline, "the index run did not end in 10 s"
        time.sleep(0.005)


def test_lookups_stay_exact_while_the_filters_are_built(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the background build is adopted every key and rrn goes to storage; what is committed
    meanwhile reaches the filters too (here: indexed by a run before they are adopted, so only the
    filter's pending list keeps its repeat from being posted twice)."""
    cfg = LedgerConfig(batch_window_ms=0, max_batch_entries=50, index_run_entries=20)
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key, config=cfg)
    for lo in range(0, 60, 20):
        w.append([_sale(i) for i in range(lo, lo + 20)])  # type: ignore[misc]
    w.close()

    release = threading.Event()
    real_build = keyfilter.LedgerFilters._build

    def slow_build(self: keyfilter.LedgerFilters, source: Any) -> None:
        assert release.wait(10)
        real_build(self, source)

    monkeypatch.setattr(keyfilter.LedgerFilters, "_build", slow_build)
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key, config=cfg)
    try:
        assert w._filters is not None and not w._filters.ready
        assert w.append([_sale(5)])[0].seq == 5, "an indexed key is found without the filter"
        with pytest.raises(LedgerRejected):
            w.append([draft("refund-9", EntryKind.REFUND, "F9", 101, f"{9:012d}")])
        for lo in range(60, 120, 20):  # committed while the filters are built; runs index them
            w.append([_sale(i) for i in range(lo, lo + 20)])  # type: ignore[misc]
            _wait_for_index_run(w)  # else the next run starts a batch later, and may not have ended
        release.set()
        assert w._filters.wait_built(10)
        w.append([_sale(500)])  # the next batch adopts the filters
        assert w._filters.ready
        reader = ledger_backend.open()
        try:
            assert reader.index_watermark() >= 100, "the keys of 60..99 are in the key index"
        finally:
            reader.close()
        for i in (61, 80, 99):
            assert w.append([_sale(i)])[0].seq == i, f"key {i}, committed while building, found"
        assert w.append([draft("refund-70", EntryKind.REFUND, "F70", 30, f"{70:012d}")])[0].seq == 121
        assert w.size == 122
    finally:
        w.close()


def test_without_a_connection_for_the_filters_the_writer_runs_exact_without_them(
    ledger_backend: LedgerDb, signing_key: Ed25519PrivateKey
) -> None:
    """PostgreSQL at its connection limit when the writer starts: no filters, every lookup asked."""
    w = LedgerWriter(ledger_backend.open(), signing_key=signing_key, config=SMALL)
    for lo in range(0, 100, 50):
        w.append([_sale(i) for i in range(lo, lo + 50)])  # type: ignore[misc]
    w.close()
    backend: Any = ledger_backend.open()
    real_open_reader, calls = backend.open_reader, [0]

    def refused_once() -> Any:  # the filters ask first (then the indexer, which gets its session)
        calls[0] += 1
        if calls[0] == 1:
            raise LedgerStorageError("too many connections")
        return real_open_reader()

    backend.open_reader = refused_once
    w = LedgerWriter(backend, signing_key=signing_key, config=SMALL)
    try:
        assert w._filters is not None and not w._filters.wait_built(0.1) and not w._filters.ready
        asked = _asked_of_storage(w, "find_idempotency_indexed")
        assert w.append([_sale(3)])[0].seq == 3, "an indexed key is still found"
        assert w.append([_sale(100)])[0].seq == 100
        assert len(asked) == 2, "without filters every key is asked of storage"
    finally:
        w.close()
