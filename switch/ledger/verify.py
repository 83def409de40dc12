"""`switch ledger verify`: recompute everything and name the first entry that was changed, removed or
reordered.

One streaming pass in seq order (bounded memory apart from the rule fold): each row must sit at the
next index, decode, agree with its indexed columns, balance, and hash (with its seq) to the stored leaf;
the recomputed tree must match every per-batch tree head, every signed checkpoint (signature checked
with the public key) and every stored Merkle node. The first failing index is reported. A consistent
rewrite of bodies AND leaf hashes is caught by the roots; it is then located to the smallest stored
subtree (2**NODE_MIN_LEVEL entries) or tree-head interval that disagrees, and the report says so.
"""

from __future__ import annotations

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from switch.ledger.backend import NODE_MIN_LEVEL, LedgerBackend
from switch.ledger.codec import decode_draft, entry_bytes
from switch.ledger.keys import checkpoint_valid, key_id
from switch.ledger.merkle import EMPTY_ROOT, Frontier, leaf_hash
from switch.ledger.queries import LedgerReader, row_problem

#: Highest Merkle level compared against stored nodes (2**40 entries).
MAX_NODE_LEVEL = 40


class VerifyReport(msgspec.Struct, frozen=True):
    ok: bool
    tree_size: int
    root_hex: str
    first_bad_index: int | None = None
    problem: str = ""
    tree_heads_checked: int = 0
    checkpoints_checked: int = 0
    signatures_checked: int = 0
    notes: list[str] = []


def verify_ledger(
    backend: LedgerBackend, public_key: Ed25519PublicKey | None = None, *, rebuild: bool = True
) -> VerifyReport:
    heads = {size: root for size, root, _ in backend.tree_heads()}
    checkpoints = backend.checkpoints()
    ckpt_roots = {size: root for size, root, *_ in checkpoints}
    stored_nodes: dict[tuple[int, int], bytes] = {}
    for level in range(NODE_MIN_LEVEL, MAX_NODE_LEVEL + 1):
        rows = backend.nodes(level, 0, 1 << (MAX_NODE_LEVEL + 1 - level))
        if not rows:
            break
        stored_nodes.update(((level, i), h) for i, h in rows)

    frontier = Frontier(NODE_MIN_LEVEL)
    closed: list[tuple[int, int, bytes]] = []
    expected = 0
    good_size = 0  # largest size whose root matched a tree head or checkpoint
    heads_checked = ckpts_checked = 0

    def fail(index: int, problem: str) -> VerifyReport:
        return VerifyReport(
            ok=False,
            tree_size=expected,
            root_hex=frontier.root().hex(),
            first_bad_index=index,
            problem=problem,
            tree_heads_checked=heads_checked,
            checkpoints_checked=ckpts_checked,
        )

    for row in backend.iter_entry_rows():
        seq = row.seq
        if seq != expected:
            return fail(expected, f"entry {expected} is missing (the next stored entry is {seq})")
        try:
            draft = decode_draft(row.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return fail(seq, f"entry {seq}: body is not a valid entry ({exc})")
        problem = row_problem(row, draft)
        if problem:
            return fail(seq, f"entry {seq}: {problem}")
        leaf = leaf_hash(entry_bytes(seq, row.body))
        if leaf != row.leaf_hash:
            return fail(seq, f"entry {seq}: its bytes do not hash to the stored leaf (changed or moved)")
        closed.clear()
        frontier.append(leaf, closed)
        for level, idx, h in closed:
            stored = stored_nodes.get((level, idx))
            if stored != h:
                lo = idx << level
                what = "missing" if stored is None else "different"
                return fail(
                    lo,
                    f"Merkle node ({level}, {idx}) is {what}: an entry in {lo}..{(idx + 1 << level) - 1} "
                    "was rewritten together with its leaf hash",
                )
        expected += 1
        for name, table in (("tree head", heads), ("checkpoint", ckpt_roots)):
            root = table.get(expected)
            if root is None:
                continue
            if root != frontier.root():
                return fail(
                    good_size,
                    f"{name} at size {expected} does not match the entries: an entry in "
                    f"{good_size}..{expected - 1} was changed",
                )
            if name == "tree head":
                heads_checked += 1
            else:
                ckpts_checked += 1
        if expected in heads or expected in ckpt_roots:
            good_size = expected

    size = expected
    recorded = max([*heads, *ckpt_roots, 0])
    if size < recorded:
        return fail(size, f"entry {size} is missing: the ledger recorded {recorded} entries")
    if size > recorded:
        return fail(
            recorded, f"entries from {recorded} on are not covered by any tree head (appended outside)"
        )
    extra_nodes = [k for k in stored_nodes if (k[1] + 1) << k[0] > size]
    if extra_nodes:
        return fail(size, f"Merkle nodes beyond the {size} entries: {sorted(extra_nodes)[:3]}")

    notes: list[str] = []
    sigs = 0
    if public_key is None:
        notes.append("checkpoint signatures not checked (no public key given)")
    else:
        kid = key_id(public_key)
        for tree_size, root, at_ms, ck_key_id, sig in checkpoints:
            if ck_key_id != kid or not checkpoint_valid(public_key, tree_size, root, at_ms, sig):
                return VerifyReport(
                    ok=False,
                    tree_size=size,
                    root_hex=frontier.root().hex(),
                    first_bad_index=None,
                    problem=f"checkpoint at size {tree_size} is not signed by key {kid}",
                    tree_heads_checked=heads_checked,
                    checkpoints_checked=ckpts_checked,
                    signatures_checked=sigs,
                )
            sigs += 1
    if not checkpoints and size:
        notes.append("no signed checkpoint yet")
    if rebuild:
        report = LedgerReader(backend).rebuild_check()
        if not report.ok:
            return VerifyReport(
                ok=False,
                tree_size=size,
                root_hex=frontier.root().hex(),
                problem="rebuild check: " + "; ".join(report.problems[:5]),
                tree_heads_checked=heads_checked,
                checkpoints_checked=ckpts_checked,
                signatures_checked=sigs,
            )
    return VerifyReport(
        ok=True,
        tree_size=size,
        root_hex=(frontier.root() if size else EMPTY_ROOT).hex(),
        tree_heads_checked=heads_checked,
        checkpoints_checked=ckpts_checked,
        signatures_checked=sigs,
        notes=notes,
    )
