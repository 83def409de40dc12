"""The plain MAC implementations on the `cryptography` package: baseline of bench/codec.py, oracle of tests.

Deliberately the obvious code and nothing clever: fresh cipher objects on every call, single DES as
3DES(K, K, K) (`cryptography` has no single DES), padding by concatenation, and AES-CMAC written out
from RFC 4493 on AES-ECB so that it checks `switch.codec.mac`'s use of the library CMAC independently.
Same signatures as switch.codec.mac. Do not optimise this module; its slowness is the point.
"""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_BLOCK = 8


def _pad(data: bytes, padding: int) -> bytes:
    """ISO 9797-1 padding method 1 (zeros; empty data -> one zero block) or 2 (0x80 then zeros)."""
    if padding == 1:
        if not data:
            return bytes(_BLOCK)
        return data + bytes(-len(data) % _BLOCK)
    if padding == 2:
        data = data + b"\x80"
        return data + bytes(-len(data) % _BLOCK)
    raise ValueError(f"unknown MAC padding method {padding} (use 1 or 2)")


def _cbc_last_block(key8: bytes, padded: bytes) -> bytes:
    encryptor = Cipher(TripleDES(key8 * 3), modes.CBC(bytes(_BLOCK))).encryptor()
    return (encryptor.update(padded) + encryptor.finalize())[-_BLOCK:]


def cbc_mac(key8: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 1: single-DES CBC with IV 0; the MAC is the last block."""
    if len(key8) != 8:
        raise ValueError(f"DES key must be 8 bytes, got {len(key8)}")
    return _cbc_last_block(bytes(key8), _pad(bytes(data), padding))


def retail_mac(key16: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (ANSI X9.19): H = CBC-MAC with K1, MAC = E_K1(D_K2(H))."""
    if len(key16) != 16:
        raise ValueError(f"retail MAC key must be 16 bytes, got {len(key16)}")
    key16 = bytes(key16)
    k1, k2 = key16[:8], key16[8:]
    h = _cbc_last_block(k1, _pad(bytes(data), padding))
    h = Cipher(TripleDES(k2 * 3), modes.ECB()).decryptor().update(h)
    return Cipher(TripleDES(k1 * 3), modes.ECB()).encryptor().update(h)


def _double(block: bytes) -> bytes:
    """Multiplication by x in GF(2^128), RFC 4493 section 2.3."""
    value = int.from_bytes(block, "big") << 1
    if value >> 128:
        value = (value & ((1 << 128) - 1)) ^ 0x87
    return value.to_bytes(16, "big")


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """AES-CMAC per RFC 4493, written out on AES-ECB."""
    if len(key) not in (16, 24, 32):
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")
    ecb = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
    k1 = _double(ecb.update(bytes(16)))
    k2 = _double(k1)
    data = bytes(data)
    blocks = [data[i : i + 16] for i in range(0, len(data), 16)] or [b""]
    last = blocks[-1]
    if len(last) == 16:
        last = bytes(a ^ b for a, b in zip(last, k1, strict=True))
    else:
        last = last + b"\x80" + bytes(15 - len(last))
        last = bytes(a ^ b for a, b in zip(last, k2, strict=True))
    state = bytes(16)
    for block in [*blocks[:-1], last]:
        state = ecb.update(bytes(a ^ b for a, b in zip(state, block, strict=True)))
    return state
