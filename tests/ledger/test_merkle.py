"""RFC 6962 tree: incremental edge == recursive definition, proofs verify, forged proofs do not."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from switch.ledger.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_path,
    inclusion_path,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# Certificate Transparency's reference vectors (the leaves used by the RFC 6962 implementations' tests).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _tree(n: int, min_level: int = 2) -> tuple[list[bytes], Frontier, list[tuple[int, int, bytes]]]:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    f = Frontier(min_level)
    closed: list[tuple[int, int, bytes]] = []
    for leaf in leaves:
        f.append(leaf, closed)
    return leaves, f, closed


def _subtree_of(leaves: list[bytes]):
    def subtree(level: int, idx: int) -> bytes:
        return root_of(leaves[idx << level : (idx + 1) << level])

    return subtree


def test_certificate_transparency_reference_roots() -> None:
    f = Frontier(0)
    for i, data in enumerate(CT_LEAVES):
        f.append(leaf_hash(data))
        assert f.root().hex() == CT_ROOTS[i]
    assert Frontier(0).root() == EMPTY_ROOT == hashlib.sha256(b"").digest()


@given(st.integers(0, 300))
def test_incremental_root_and_closed_subtrees_match_the_definition(n: int) -> None:
    leaves, f, closed = _tree(n)
    assert f.root() == root_of(leaves)
    for level, idx, h in closed:
        assert level >= 2
        assert h == root_of(leaves[idx << level : (idx + 1) << level])
    # the edge rebuilt from stored subtrees is the same edge
    assert Frontier.from_subtrees(2, n, _subtree_of(leaves)).root() == f.root()


@given(st.integers(1, 200), st.data())
def test_inclusion_proofs_verify_and_forgeries_fail(n: int, data: st.DataObject) -> None:
    leaves, f, _ = _tree(n)
    root = f.root()
    i = data.draw(st.integers(0, n - 1))
    path = inclusion_path(_subtree_of(leaves), i, n)
    assert verify_inclusion(leaves[i], i, n, path, root)
    other = leaf_hash(b"not in the tree")
    assert not verify_inclusion(other, i, n, path, root)
    if n > 1:
        assert not verify_inclusion(leaves[i], (i + 1) % n, n, path, root)
    if path:
        k = data.draw(st.integers(0, len(path) - 1))
        bit = data.draw(st.integers(0, 255))
        forged = list(path)
        forged[k] = bytes(b ^ (1 << (bit % 8)) if j == bit // 8 else b for j, b in enumerate(forged[k]))
        assert not verify_inclusion(leaves[i], i, n, forged, root)
        assert not verify_inclusion(leaves[i], i, n, path[:-1], root)
        assert not verify_inclusion(leaves[i], i, n, [*path, path[0]], root)


@given(st.integers(1, 200), st.data())
def test_consistency_proofs_verify_and_forgeries_fail(n: int, data: st.DataObject) -> None:
    leaves, f, _ = _tree(n)
    m = data.draw(st.integers(0, n))
    proof = consistency_path(_subtree_of(leaves), m, n)
    old_root = root_of(leaves[:m])
    assert verify_consistency(m, n, old_root, f.root(), proof)
    if 0 < m < n:
        assert not verify_consistency(m, n, root_of([*leaves[: m - 1], leaf_hash(b"x")]), f.root(), proof)
        assert not verify_consistency(m, n, old_root, leaf_hash(b"other root"), proof)
        assert not verify_consistency(m, n, old_root, f.root(), proof[:-1])
        if m > 1:
            assert not verify_consistency(m - 1, n, root_of(leaves[: m - 1]), f.root(), proof)
    assert not verify_consistency(n, m, f.root(), old_root, proof) or m == n
