"""RFC 6962 / RFC 9162 Merkle tree: hashing, the incremental right edge, proofs and their verifiers.

leaf = SHA-256(0x00 || entry bytes), node = SHA-256(0x01 || left || right); the root of n leaves splits
at the largest power of two below n (RFC 6962 section 2.1). The writer keeps only the right edge of the
tree ("compact range": one hash per set bit of the size) and appends in O(1) amortised hashes per leaf;
`Frontier.append` reports every complete subtree it closes so the backend can store the ones at
levels >= NODE_MIN_LEVEL and proofs stay cheap. Proof construction takes a `subtree(level, idx)`
callback so it works over any storage; the verifiers are the RFC 9162 algorithms and trust nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof that does not check out, or a request for one that cannot exist."""


def leaf_hash(entry_bytes: bytes) -> bytes:
    return _sha256(b"\x00" + entry_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes, by the RFC's recursive definition (reference; O(n))."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The right edge of a tree: hashes of the perfect subtrees whose sizes are the set bits of `size`,
    largest first. Append a leaf, get the root; `append` returns the (level, idx, hash) of every complete
    subtree it closed at level >= `min_level` (idx counts subtrees of that level from the left)."""

    __slots__ = ("hashes", "levels", "min_level", "size")

    def __init__(self, min_level: int) -> None:
        self.levels: list[int] = []
        self.hashes: list[bytes] = []
        self.size = 0
        self.min_level = min_level

    def copy(self) -> Frontier:
        f = Frontier(self.min_level)
        f.levels = list(self.levels)
        f.hashes = list(self.hashes)
        f.size = self.size
        return f

    @classmethod
    def from_subtrees(cls, min_level: int, size: int, subtree: Callable[[int, int], bytes]) -> Frontier:
        """Rebuild the edge for a tree of `size` leaves from stored subtree hashes."""
        f = cls(min_level)
        start = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                f.levels.append(level)
                f.hashes.append(subtree(level, start >> level))
                start += 1 << level
        f.size = size
        return f

    def append(self, leaf: bytes, out: list[tuple[int, int, bytes]] | None = None) -> None:
        levels, hashes = self.levels, self.hashes
        level, h = 0, leaf
        index = self.size  # index of the leaf; the closed subtree at `level` is index >> level
        while levels and levels[-1] == level:
            levels.pop()
            h = node_hash(hashes.pop(), h)
            level += 1
            if out is not None and level >= self.min_level:
                out.append((level, index >> level, h))
        levels.append(level)
        hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        hashes = self.hashes
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        for h in reversed(hashes[:-1]):
            r = node_hash(h, r)
        return r


# --- proofs over any storage ------------------------------------------------------------------------

SubtreeFn = Callable[[int, int], bytes]


def range_hash(subtree: SubtreeFn, lo: int, hi: int) -> bytes:
    """MTH of leaves [lo, hi), where lo is aligned as RFC 6962's recursion guarantees."""
    n = hi - lo
    if n <= 0:
        raise ProofError(f"empty range [{lo}, {hi})")
    if n & (n - 1) == 0 and lo % n == 0:
        level = n.bit_length() - 1
        return subtree(level, lo >> level)
    k = _split(n)
    return node_hash(range_hash(subtree, lo, lo + k), range_hash(subtree, lo + k, hi))


def inclusion_path(subtree: SubtreeFn, index: int, size: int) -> list[bytes]:
    """RFC 6962 PATH(index, D[size])."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(range_hash(subtree, lo + k, hi))
            hi = lo + k
        else:
            path.append(range_hash(subtree, lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_path(subtree: SubtreeFn, first: int, second: int) -> list[bytes]:
    """RFC 6962 PROOF(first, D[second])."""
    if not 0 <= first <= second:
        raise ProofError(f"no consistency proof from size {first} to {second}")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, second, first, True
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                proof.append(range_hash(subtree, lo, hi))
            break
        k = _split(n)
        if m <= k:
            proof.append(range_hash(subtree, lo + k, hi))
            hi = lo + k
        else:
            proof.append(range_hash(subtree, lo, lo + k))
            lo += k
            m -= k
            complete = False
    proof.reverse()
    return proof


# --- verifiers (RFC 9162 sections 2.1.3.2 and 2.1.4.2) ----------------------------------------------


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """True iff `path` proves leaf hash `leaf` is at `index` of the tree of `size` with `root`."""
    if not 0 <= index < size or any(len(p) != HASH_BYTES for p in path):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True iff `proof` shows the tree of `first` leaves with `first_root` is a prefix of the tree of
    `second` leaves with `second_root`."""
    if not 0 <= first <= second or any(len(p) != HASH_BYTES for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
