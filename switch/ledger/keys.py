"""Keys of the ledger: the HMAC key for PAN hashes and the Ed25519 checkpoint signing key.

Both come from an environment variable or a file named in LedgerConfig, as hex. Keys never appear in
logs, errors or reprs; errors name where the key was looked for, never its value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from switch.config import LedgerConfig
from switch.private_files import read_private_file

#: Shortest HMAC key accepted for PAN hashes (bytes).
MIN_PAN_HASH_KEY_BYTES = 16
CHECKPOINT_DOMAIN = b"switch-ledger-checkpoint/v1\n"


class LedgerKeyError(ValueError):
    """A key that is missing or malformed; the message says where it was looked for."""


def _read_hex(env: str, file: str, what: str) -> bytes | None:
    text = None
    if file:
        text = read_private_file(file, f"{what} file", LedgerKeyError)
    elif env and env in os.environ:
        text = os.environ[env]
    if text is None:
        return None
    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        raise LedgerKeyError(f"{what} from {file or '$' + env} is not hex") from None


def load_pan_hash_key(cfg: LedgerConfig) -> bytes:
    key = _read_hex(cfg.pan_hash_key_env, cfg.pan_hash_key_file, "PAN hash key")
    if key is None:
        raise LedgerKeyError(
            f"no PAN hash key: set ${cfg.pan_hash_key_env} or ledger.pan_hash_key_file (hex)"
        )
    if len(key) < MIN_PAN_HASH_KEY_BYTES:
        raise LedgerKeyError(f"PAN hash key must be at least {MIN_PAN_HASH_KEY_BYTES} bytes")
    return key


def pan_hash(key: bytes, pan: str) -> str:
    """HMAC-SHA-256 of the PAN digits, lower-case hex: links a card's entries without storing it."""
    digits = pan.strip()
    if not (12 <= len(digits) <= 19 and digits.isdigit()):
        raise ValueError("PAN must be 12-19 digits")
    return hmac.new(key, digits.encode("ascii"), hashlib.sha256).hexdigest()


def load_signing_key(cfg: LedgerConfig) -> Ed25519PrivateKey:
    seed = _read_hex(cfg.checkpoint_key_env, cfg.checkpoint_key_file, "checkpoint signing key")
    if seed is None:
        raise LedgerKeyError(
            f"no checkpoint signing key: set ${cfg.checkpoint_key_env} or ledger.checkpoint_key_file "
            "(64 hex digits, an Ed25519 seed; `switch ledger keygen --out FILE` makes one)"
        )
    if len(seed) != 32:
        raise LedgerKeyError("checkpoint signing key must be a 32-byte Ed25519 seed (64 hex digits)")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """Short fingerprint stored with each checkpoint so a verifier knows which key signed it."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


def checkpoint_message(tree_size: int, root: bytes, at_ms: int) -> bytes:
    return CHECKPOINT_DOMAIN + struct.pack(">Q", tree_size) + root + struct.pack(">q", at_ms)


def sign_checkpoint(
    key: Ed25519PrivateKey, tree_size: int, root: bytes, at_ms: int
) -> tuple[int, bytes, int, str, bytes]:
    """A `checkpoints` row: (tree_size, root, at_ms, key_id, signature)."""
    sig = key.sign(checkpoint_message(tree_size, root, at_ms))
    return (tree_size, root, at_ms, key_id(key.public_key()), sig)


def checkpoint_valid(key: Ed25519PublicKey, tree_size: int, root: bytes, at_ms: int, sig: bytes) -> bool:
    try:
        key.verify(sig, checkpoint_message(tree_size, root, at_ms))
    except InvalidSignature:
        return False
    return True


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text.strip())
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise LedgerKeyError("public key must be 64 hex digits (raw Ed25519)") from None
