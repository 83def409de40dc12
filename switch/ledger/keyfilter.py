"""A Bloom filter over the idempotency keys already in the key index: which keys need the indexed
lookup at all.

Why: every outcome's idempotency key must be checked against every earlier one. Keys newer than the
last index run are in the writer's memory (`_tail`); the older ones are in the key index, and asking
storage for them cost ~7.5 us per key on SQLite (a B-tree descent per key, the whole batch in one
statement) -- a quarter of the writer's time per entry, spent to learn, nearly always, that a fresh
key is not there. The filter answers "certainly not indexed" from memory for all but ~1% of fresh
keys; a repeat (a key that IS indexed) is always passed on to the lookup, which stays the authority.

Correctness rests on one invariant: every key in the key index was added to the filter. The writer
fills it at start from the index (`backend.indexed_keys()`), and adds a run's keys when the run's
commit is known (the same keys the run copied: the tail it handed over). A filter that missed a key
would let a repeat through as a new entry (a double posting), so nothing else removes keys or builds
filters, and tests repeat keys across index runs and restarts on both backends.

Size: 10 bits per key and 7 probes (false positives ~1%): 12 MB per 10 million keys. Stages double in
capacity as keys arrive (a scalable Bloom filter), so no rebuild and no re-read of the index is ever
needed; a lookup asks every stage (a few at most: the first is sized for twice the keys at start).
Probes come from Python's str hash (SipHash; randomised per process, and the filter lives in one
process only). The Cython stage (switch._speedups.ledger.KeyFilterStage) and `_PyStage` set the
same bits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

from switch.ledger import fast

log = logging.getLogger(__name__)

BITS_PER_KEY = 10
PROBES = 7
#: Capacity of the first stage at least (keys); smaller ledgers still get this much.
MIN_STAGE_KEYS = 1 << 16


class _Stage(Protocol):
    capacity: int
    count: int

    def add_all(self, keys: Iterable[str]) -> int: ...
    def filter(self, keys: list[str]) -> list[str]: ...


class _PyStage:
    """The reference of switch._speedups.ledger.KeyFilterStage (same probes, same bits)."""

    def __init__(self, capacity: int, bits_per_key: int, probes: int) -> None:
        nbits = 64
        while nbits < capacity * bits_per_key:
            nbits <<= 1
        self.nbits = nbits
        self._bits = bytearray(nbits // 8)
        self._mask = nbits - 1
        self._probes = probes
        self.capacity = capacity
        self.count = 0

    def _positions(self, key: str) -> list[int]:
        h = hash(key) & 0xFFFF_FFFF_FFFF_FFFF
        h1, h2 = h & 0xFFFF_FFFF, (h >> 32) | 1
        return [(h1 + i * h2) & self._mask for i in range(self._probes)]

    def add(self, key: str) -> None:
        bits = self._bits
        for p in self._positions(key):
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def add_all(self, keys: Iterable[str]) -> int:
        n = 0
        for key in keys:
            self.add(key)
            n += 1
            if self.count >= self.capacity:
                break
        return n

    def may_contain(self, key: str) -> bool:
        bits = self._bits
        return all((bits[p >> 3] >> (p & 7)) & 1 for p in self._positions(key))

    def filter(self, keys: list[str]) -> list[str]:
        return [k for k in keys if self.may_contain(k)]


def _new_stage(capacity: int) -> _Stage:
    ext: Any = fast.key_filter_stage_ext()
    cls = ext if ext is not None else _PyStage
    return cls(capacity, BITS_PER_KEY, PROBES)  # type: ignore[no-any-return]


class KeyFilter:
    """Keys added so far, as a Bloom filter: `maybe_present` never drops a key that was added."""

    def __init__(self, expected_keys: int = 0) -> None:
        self._stages: list[_Stage] = [_new_stage(max(MIN_STAGE_KEYS, 2 * expected_keys))]

    @property
    def count(self) -> int:
        return sum(s.count for s in self._stages)

    @property
    def stages(self) -> int:
        return len(self._stages)

    def add_all(self, keys: Iterable[str]) -> None:
        it = iter(keys)
        while True:
            stage = self._stages[-1]
            if stage.count >= stage.capacity:
                stage = _new_stage(2 * stage.capacity)
                self._stages.append(stage)
            stage.add_all(it)  # until `it` ends or the stage is full; drops no key
            if stage.count < stage.capacity:
                return

    def maybe_present(self, keys: list[str]) -> list[str]:
        """The keys that may have been added (all that were, ~1% of the others), in order."""
        stages = self._stages
        if len(stages) == 1:
            return stages[0].filter(keys)
        maybe: set[str] = set()
        for stage in stages:
            maybe.update(stage.filter(keys))
        return [k for k in keys if k in maybe]


class LedgerFilters:
    """The writer's two filters -- idempotency keys in the key index, rrns and original_rrns of the
    entries -- built in the background at start.

    Why in the background: filling them reads every key and rrn of the ledger, ~2 s per million
    entries; done before the first batch, a restart of a large ledger would keep terminals waiting
    for minutes. Until they are ready every key and rrn is passed on to the lookups (exact, only
    slower), and what the writer commits meanwhile is kept in a pending list.

    Why that is complete: the build reads the key index at some moment after start, which holds every
    key below the watermark at start; the tail's keys at start are given to it; everything committed
    after start is in the pending list, added before the filters are used. The rrn filter reads the
    entries themselves (every entry committed up to its snapshot) plus the same pending list.
    `source` is a connection of the builder's own (closed when done), or None to build in line
    from `inline` (an in-memory ledger, small by nature); both None: no filters at all (every lookup
    goes to storage, as before they existed)."""

    def __init__(self, source: Any, inline: Any, tail_keys: Iterable[str], expected: int) -> None:
        self._tail_keys = list(tail_keys)
        self._expected = expected
        self.keys: KeyFilter | None = None
        self.rrns: KeyFilter | None = None
        self._pending_keys: list[str] = []
        self._pending_rrns: list[str] = []
        self._built: tuple[KeyFilter, KeyFilter] | None = None
        self._error: BaseException | None = None
        self._stop = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        if source is None:
            if inline is not None:
                self._build(inline)
                self.poll()
            self._done.set()
            return
        self._thread = threading.Thread(target=self._run, args=(source,), name="ledger-filters", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.keys is not None

    def wait_built(self, timeout_s: float) -> bool:
        """Wait for the background build to end (built or failed); the writer adopts at its next batch."""
        return self._done.wait(timeout_s) and self._built is not None

    def keys_maybe_indexed(self, keys: list[str]) -> list[str]:
        return keys if self.keys is None else self.keys.maybe_present(keys)

    def rrns_maybe_stored(self, rrns: list[str]) -> list[str]:
        return rrns if self.rrns is None else self.rrns.maybe_present(rrns)

    def add(self, keys: Iterable[str], rrns: Iterable[str]) -> None:
        """Committed (or about to be): from now on they may be found."""
        if self.keys is None or self.rrns is None:
            self._pending_keys.extend(keys)
            self._pending_rrns.extend(rrns)
            return
        self.keys.add_all(keys)
        self.rrns.add_all(rrns)

    def poll(self) -> None:
        """On the writer's thread, between batches: adopt the filters once built."""
        built = self._built
        if built is None or self.keys is not None:
            if self._error is not None:
                log.warning("ledger filters not built (lookups stay exact, only slower): %s", self._error)
                self._error = None
            return
        keys, rrns = built
        keys.add_all(self._pending_keys)
        rrns.add_all(self._pending_rrns)
        self._pending_keys, self._pending_rrns = [], []
        self.keys, self.rrns = keys, rrns

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join()

    def _run(self, source: Any) -> None:
        try:
            self._build(source)
        except BaseException as exc:  # the writer logs it; lookups stay exact without filters
            self._error = exc
        finally:
            self._done.set()
            try:
                source.close()
            except Exception:
                log.exception("closing the ledger filters' connection failed")

    def _build(self, source: Any) -> None:
        started = time.monotonic()
        keys, rrns = KeyFilter(self._expected), KeyFilter(self._expected)
        for name, target, values in (
            ("keys", keys, source.indexed_keys()),
            ("rrns", rrns, source.entry_rrns()),
        ):
            for page in _pages(values, 50_000):
                if self._stop:
                    return
                target.add_all(page)
            log.debug("ledger %s filter: %d values", name, target.count)
        keys.add_all(self._tail_keys)
        self._tail_keys = []
        self._built = (keys, rrns)
        if self._expected >= 1_000_000:
            log.info(
                "ledger filters built over %d entries in %.1f s", self._expected, time.monotonic() - started
            )


def _pages(values: Iterable[str], size: int) -> Iterable[list[str]]:
    page: list[str] = []
    for v in values:
        page.append(v)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page
