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

from collections.abc import Iterable
from typing import Any, Protocol

from switch.ledger import fast

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
