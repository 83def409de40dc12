"""Retrieval reference numbers (field 37): unique for ever, across restarts and across processes.

Why blocks: an RRN must never repeat, even after a crash, and several switch processes may run side by
side (SO_REUSEPORT). Each process asks for a block (`ReserveRrns(count)`); the server advances a
durable high-water mark (fsync) and only then feeds `RrnsReserved(start, count)`. After a restart the
unused rest of the last block is simply skipped: gaps are harmless, repeats are not. The core asks for
the next block when no more than `low_water` remain, so traffic never waits for the reservation.

Format: 12 decimal digits (ISO 8583 field 37 is an..12), zero-padded: 10^12 RRNs.
"""

from __future__ import annotations

from collections import deque

RRN_DIGITS = 12
RRN_LIMIT = 10**RRN_DIGITS


class RrnError(ValueError):
    """A reserved block that cannot be used (overlaps, exceeds 12 digits)."""


class RrnAllocator:
    __slots__ = ("_blocks", "_end", "_high", "_next", "_queued", "block_size", "low_water", "requested")

    def __init__(self, block_size: int, low_water: int) -> None:
        if block_size < 1 or not 0 <= low_water < block_size:
            raise RrnError(f"rrn_block_size={block_size} must be >= 1 and > rrn_low_water={low_water} >= 0")
        self.block_size = block_size
        self.low_water = low_water
        self._next = 0
        self._end = 0
        self._high = 0  # highest RRN ever granted + 1, to refuse overlapping blocks
        self._blocks: deque[tuple[int, int]] = deque()
        self._queued = 0  # RRNs in _blocks (kept so `remaining` is O(1): it runs per request)
        self.requested = False

    @property
    def remaining(self) -> int:
        return (self._end - self._next) + self._queued

    def grant(self, start: int, count: int) -> None:
        if count < 1 or start < 1 or start + count > RRN_LIMIT:
            raise RrnError(f"RRN block {start}+{count} outside 1..{RRN_LIMIT - 1}")
        if start < self._high:
            raise RrnError(f"RRN block {start}+{count} overlaps RRNs already granted (below {self._high})")
        self._high = start + count
        self._blocks.append((start, start + count))
        self._queued += count
        self.requested = False

    def allocate(self) -> str | None:
        """The next RRN, or None when every reserved block is used up."""
        if self._next >= self._end:
            if not self._blocks:
                return None
            self._next, self._end = self._blocks.popleft()
            self._queued -= self._end - self._next
        n = self._next
        self._next = n + 1
        return f"{n:012d}"

    def wants_more(self) -> bool:
        """True once when the reserve runs low; the caller emits ReserveRrns(block_size)."""
        if self.requested or self.remaining > self.low_water:
            return False
        self.requested = True
        return True
