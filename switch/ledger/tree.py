"""The Merkle tree as stored: subtree hashes read from `merkle_nodes` (levels >= NODE_MIN_LEVEL) or
rebuilt from `entries.leaf_hash` (lower levels, at most 2**NODE_MIN_LEVEL leaves, read a chunk at a
time and cached), and the proofs built on them."""

from __future__ import annotations

from switch.ledger.backend import NODE_MIN_LEVEL, LedgerBackend
from switch.ledger.merkle import Frontier, ProofError, consistency_path, inclusion_path, root_of
from switch.ledger.rules import LedgerCorrupt

#: Chunks of leaf hashes cached by one StoredTree (each 2**NODE_MIN_LEVEL hashes).
MAX_CACHED_CHUNKS = 64


class StoredTree:
    """Read-only view of the tree of the first `size` entries (one use: a proof, a restart)."""

    def __init__(self, backend: LedgerBackend, size: int) -> None:
        self.backend = backend
        self.size = size
        self._chunks: dict[int, list[bytes]] = {}

    def _leaves(self, chunk: int) -> list[bytes]:
        leaves = self._chunks.get(chunk)
        if leaves is None:
            span = 1 << NODE_MIN_LEVEL
            start = chunk * span
            leaves = self.backend.leaf_hashes(start, min(start + span, self.size))
            if len(self._chunks) >= MAX_CACHED_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[chunk] = leaves
        return leaves

    def subtree(self, level: int, idx: int) -> bytes:
        lo, hi = idx << level, (idx + 1) << level
        if hi > self.size:
            raise ProofError(f"subtree ({level}, {idx}) is beyond tree size {self.size}")
        if level >= NODE_MIN_LEVEL:
            rows = self.backend.nodes(level, idx, idx + 1)
            if not rows:
                raise LedgerCorrupt(f"Merkle node ({level}, {idx}) is missing")
            return rows[0][1]
        span = 1 << NODE_MIN_LEVEL
        leaves = self._leaves(lo // span)
        part = leaves[lo % span : lo % span + (hi - lo)]
        if len(part) != hi - lo:
            raise LedgerCorrupt(f"leaf hashes {lo}..{hi} are missing")
        return root_of(part)

    def frontier(self) -> Frontier:
        return Frontier.from_subtrees(NODE_MIN_LEVEL, self.size, self.subtree)

    def root(self) -> bytes:
        return self.frontier().root()

    def inclusion(self, index: int) -> list[bytes]:
        return inclusion_path(self.subtree, index, self.size)

    def consistency(self, first: int) -> list[bytes]:
        return consistency_path(self.subtree, first, self.size)
