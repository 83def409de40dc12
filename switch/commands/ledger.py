"""`switch ledger ...`: verify, proofs, queries and keys of the append-only ledger.

The database is named by --db PATH (SQLite), --dsn DSN (PostgreSQL) or --config switch.toml (its
[ledger] section). Read commands never create a database. Exit status: 0 ok, 1 verification or proof
failed, 2 usage or storage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from switch.config import ConfigError, LedgerConfig, load_config
from switch.ledger.backend import LedgerBackend, LedgerStorageError
from switch.ledger.factory import open_backend
from switch.ledger.keys import LedgerKeyError, load_signing_key, public_bytes, public_key_from_hex
from switch.ledger.merkle import ProofError, verify_consistency, verify_inclusion
from switch.ledger.queries import LedgerReader
from switch.ledger.rules import LedgerCorrupt, LedgerRejected
from switch.ledger.tree import StoredTree
from switch.ledger.verify import verify_ledger


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ledger", help="verify, prove and query the ledger")
    sub = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")

    def cmd(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        where = c.add_mutually_exclusive_group()
        where.add_argument("--db", help="SQLite ledger file")
        where.add_argument("--dsn", help="PostgreSQL connection string")
        c.add_argument("--config", help="switch.toml (uses its [ledger] section)")
        c.set_defaults(handler=handler)
        return c

    v = cmd("verify", _verify, "recompute hashes, tree, checkpoints and balances; name the first bad entry")
    v.add_argument("--public-key", help="checkpoint public key (hex); default: derived from the config's key")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    proof = sub.add_parser("proof", help="Merkle inclusion and consistency proofs (JSON)")
    psub = proof.add_subparsers(dest="proof_command", metavar="KIND")
    for name, handler, help_text in (
        ("inclusion", _proof_inclusion, "prove entry INDEX is in the tree of SIZE entries"),
        ("consistency", _proof_consistency, "prove the tree of FIRST entries is a prefix of SECOND"),
    ):
        c = psub.add_parser(name, help=help_text, description=help_text)
        where = c.add_mutually_exclusive_group()
        where.add_argument("--db")
        where.add_argument("--dsn")
        c.add_argument("--config")
        c.set_defaults(handler=handler)
        if name == "inclusion":
            c.add_argument("--index", type=int, required=True)
            c.add_argument("--size", type=int, help="tree size (default: the current size)")
        else:
            c.add_argument("--first", type=int, required=True)
            c.add_argument("--second", type=int, help="default: the current size")
    chk = psub.add_parser("check", help="check a proof JSON (file or - for stdin); exit 1 if it fails")
    chk.add_argument("file")
    chk.set_defaults(handler=_proof_check)

    b = cmd("balance", _balance, "balance (debits minus credits) of an account")
    b.add_argument("--account", required=True)
    b.add_argument("--currency", required=True)
    b.add_argument("--through-seq", type=int, help="as of this entry (inclusive)")
    e = cmd("entries", _entries, "entries of a transaction reference (RRN)")
    e.add_argument("--rrn", required=True)
    r = cmd("refundable", _refundable, "refundable remainder of a sale")
    r.add_argument("--rrn", required=True)
    t = cmd("totals", _totals, "per-merchant totals between two times (ms since the epoch)")
    t.add_argument("--merchant", required=True)
    t.add_argument("--from-ms", type=int, required=True)
    t.add_argument("--to-ms", type=int, required=True)
    h = cmd("holds", _holds, "open pre-authorisation holds")
    h.add_argument("--placed-before-ms", type=int)
    cmd("rebuild-check", _rebuild, "refold the log and compare balances and rules")
    k = sub.add_parser(
        "keygen",
        help="write a new Ed25519 checkpoint signing key to a 0600 file; print its public key",
        description="Write a new Ed25519 checkpoint signing seed (64 hex digits) to OUT, created with mode "
        "0600, and print the public key and the path. The seed is never printed: point "
        "ledger.checkpoint_key_file at OUT (or load the file into $SWITCH_CHECKPOINT_KEY).",
    )
    k.add_argument("--out", required=True, help="file to create for the signing seed (mode 0600)")
    k.add_argument("--force", action="store_true", help="replace OUT if it exists (the old key is lost)")
    k.set_defaults(handler=_guard(_keygen))


# --- helpers ------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> LedgerConfig:
    cfg = load_config(args.config).ledger if getattr(args, "config", None) else LedgerConfig()
    if getattr(args, "db", None):
        cfg = LedgerConfig(**{**_fields(cfg), "backend": "sqlite", "path": args.db})
    elif getattr(args, "dsn", None):
        cfg = LedgerConfig(**{**_fields(cfg), "backend": "postgres", "dsn": args.dsn})
    elif not getattr(args, "config", None):
        raise ConfigError("name the ledger with --db PATH, --dsn DSN or --config FILE")
    return cfg


def _fields(cfg: LedgerConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__struct_fields__}


def _open(args: argparse.Namespace) -> LedgerBackend:
    return open_backend(_config(args), create=False)


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except LedgerCorrupt as exc:
            sys.stderr.write(f"switch ledger: ledger is corrupt: {exc}\n")
            return 1
        except (ConfigError, LedgerStorageError, LedgerKeyError, ProofError, ValueError) as exc:
            sys.stderr.write(f"switch ledger: {exc}\n")
            return 2
        except Exception as exc:  # a database driver error: say what, never a traceback
            sys.stderr.write(f"switch ledger: storage error: {type(exc).__name__}: {exc}\n")
            return 2

    return run


def _current_size(backend: LedgerBackend) -> int:
    head = backend.last_tree_head()
    return 0 if head is None else head[0]


# --- handlers -----------------------------------------------------------------------------------------


@_guard
def _verify(args: argparse.Namespace) -> int:
    public: Ed25519PublicKey | None = None
    if args.public_key:
        public = public_key_from_hex(args.public_key)
    else:
        try:
            public = load_signing_key(_config(args)).public_key()
        except LedgerKeyError:
            public = None
    backend = _open(args)
    try:
        report = verify_ledger(backend, public)
    finally:
        backend.close()
    if args.json:
        _print({f: getattr(report, f) for f in report.__struct_fields__})
    elif report.ok:
        print(f"verified {report.tree_size} entries, root {report.root_hex}")
        print(
            f"  {report.tree_heads_checked} tree heads, {report.checkpoints_checked} checkpoints, "
            f"{report.signatures_checked} signatures checked"
        )
        for note in report.notes:
            print(f"  note: {note}")
    else:
        where = "" if report.first_bad_index is None else f"first bad entry index {report.first_bad_index}: "
        print(f"NOT VERIFIED: {where}{report.problem}")
    return 0 if report.ok else 1


@_guard
def _proof_inclusion(args: argparse.Namespace) -> int:
    backend = _open(args)
    try:
        size = _current_size(backend) if args.size is None else args.size
        if size > _current_size(backend):
            raise ProofError(f"tree size {size} is larger than the ledger ({_current_size(backend)})")
        tree = StoredTree(backend, size)
        path = tree.inclusion(args.index)
        leaf = backend.leaf_hashes(args.index, args.index + 1)[0]
        _print(
            {
                "type": "inclusion",
                "leaf_index": args.index,
                "tree_size": size,
                "leaf_hash": leaf.hex(),
                "root": tree.root().hex(),
                "path": [h.hex() for h in path],
            }
        )
    finally:
        backend.close()
    return 0


@_guard
def _proof_consistency(args: argparse.Namespace) -> int:
    backend = _open(args)
    try:
        second = _current_size(backend) if args.second is None else args.second
        if second > _current_size(backend):
            raise ProofError(f"tree size {second} is larger than the ledger ({_current_size(backend)})")
        tree = StoredTree(backend, second)
        proof = tree.consistency(args.first)
        first_root = StoredTree(backend, args.first).root()
        _print(
            {
                "type": "consistency",
                "first": args.first,
                "second": second,
                "first_root": first_root.hex(),
                "second_root": tree.root().hex(),
                "proof": [h.hex() for h in proof],
            }
        )
    finally:
        backend.close()
    return 0


def check_proof(doc: dict[str, Any]) -> bool:
    """Check a proof document as printed by `switch ledger proof`; False for any malformed input."""
    try:
        if doc["type"] == "inclusion":
            return verify_inclusion(
                bytes.fromhex(doc["leaf_hash"]),
                int(doc["leaf_index"]),
                int(doc["tree_size"]),
                [bytes.fromhex(h) for h in doc["path"]],
                bytes.fromhex(doc["root"]),
            )
        if doc["type"] == "consistency":
            return verify_consistency(
                int(doc["first"]),
                int(doc["second"]),
                bytes.fromhex(doc["first_root"]),
                bytes.fromhex(doc["second_root"]),
                [bytes.fromhex(h) for h in doc["proof"]],
            )
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return False


def _proof_check(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        doc = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        sys.stderr.write(f"switch ledger: cannot read proof: {exc}\n")
        return 2
    ok = isinstance(doc, dict) and check_proof(doc)
    print("proof OK" if ok else "proof FAILED")
    return 0 if ok else 1


@_guard
def _balance(args: argparse.Namespace) -> int:
    reader = LedgerReader(_open(args))
    try:
        print(reader.balance(args.account, args.currency, args.through_seq))
    finally:
        reader.close()
    return 0


@_guard
def _entries(args: argparse.Namespace) -> int:
    reader = LedgerReader(_open(args))
    try:
        out = []
        for e in reader.entries_by_rrn(args.rrn):
            d = e.draft
            out.append(
                {
                    "seq": e.seq,
                    "kind": d.kind.value,
                    "rrn": d.rrn,
                    "original_rrn": d.original_rrn,
                    "at_ms": d.at_ms,
                    "response_code": d.response_code,
                    "merchant_id": d.merchant_id,
                    "terminal_id": d.terminal_id,
                    "pan_masked": d.pan_masked,
                    "amount_minor": d.amount_minor,
                    "currency": d.currency,
                    "postings": [[p.account, p.side.value, p.amount_minor, p.currency] for p in d.postings],
                }
            )
        _print(out)
    finally:
        reader.close()
    return 0


@_guard
def _refundable(args: argparse.Namespace) -> int:
    reader = LedgerReader(_open(args))
    try:
        print(reader.refundable_remainder(args.rrn))
    except LedgerRejected as exc:
        sys.stderr.write(f"switch ledger: {exc}\n")
        return 2
    finally:
        reader.close()
    return 0


@_guard
def _totals(args: argparse.Namespace) -> int:
    reader = LedgerReader(_open(args))
    try:
        rows = reader.merchant_totals(args.merchant, args.from_ms, args.to_ms)
        _print([{f: getattr(r, f) for f in r.__struct_fields__} for r in rows])
    finally:
        reader.close()
    return 0


@_guard
def _holds(args: argparse.Namespace) -> int:
    reader = LedgerReader(_open(args))
    try:
        rows = reader.open_holds(args.placed_before_ms)
        _print([{f: getattr(r, f) for f in r.__struct_fields__} for r in rows])
    finally:
        reader.close()
    return 0


@_guard
def _rebuild(args: argparse.Namespace) -> int:
    reader = LedgerReader(_open(args))
    try:
        report = reader.rebuild_check()
    finally:
        reader.close()
    if report.ok:
        print(f"rebuild check OK: {report.entries} entries, {report.accounts} account balances agree")
        return 0
    for p in report.problems:
        print(f"MISMATCH: {p}")
    return 1


def _keygen(args: argparse.Namespace) -> int:
    """The seed goes to a 0600 file only: printed, it would live on in scroll-back and shell logs."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from switch.commands.secret_files import write_secret_file

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    path = write_secret_file(args.out, seed.hex() + "\n", force=args.force)
    print(f"checkpoint signing key written to {path} (mode 0600); set ledger.checkpoint_key_file to it")
    print(f"public key (for `switch ledger verify --public-key`): {public_bytes(key.public_key()).hex()}")
    return 0
