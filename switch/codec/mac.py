"""Message authentication codes for ISO 8583, and which bytes of a message they cover.

Algorithms
- `cbc_mac(key8, data, padding=1)`: ISO/IEC 9797-1 MAC algorithm 1 with single DES (FIPS 113): CBC with
  IV 0, the MAC is the last block.
- `retail_mac(key16, data, padding=1)`: ISO/IEC 9797-1 MAC algorithm 3 = ANSI X9.19 "retail MAC":
  single-DES CBC with K1, then the last block through 3DES as E_K1(D_K2(.)). What POS terminals and
  most acquirers use for field 64/128 with a double-length MAC key.
- `aes_cmac(key, data)`: RFC 4493 (AES-CMAC), 16-byte output; keys of 16, 24 or 32 bytes.
- Padding method 1 appends zero bytes up to a multiple of 8; empty data becomes one zero block (the
  standard asks for a *positive* number of blocks). Method 2 appends 0x80 then zeros (always at least
  one byte, as ISO 7816-4 and jPOS do). Anything else is a ValueError.
- `verify_mac(expected, computed)`: constant-time compare (hmac.compare_digest) of equal-length MACs.

Speed: DES runs in C (switch._speedups.mac, single DES with a key schedule computed once per key) because
`cryptography` only offers 3DES, i.e. three times the work plus an object per call. Without the
extension, or with SWITCH_CODEC_PURE=1, a fallback on `cryptography` keeps one cipher context per key
and chains across calls instead of building objects per message. Both paths give identical MACs; the
tests hold them to each other, to switch.codec.mac_reference and to the public vectors.
Key objects (`DesMacKey`, `RetailMacKey`, `AesCmacKey`) hold the prepared key; the plain functions
look keys up in a bounded cache (`KEY_CACHE_ENTRIES`) so a key schedule is never recomputed per
message. No key byte appears in a repr, an error or a log line.

Which bytes are MACed (every profile; defined here and nowhere else)
The MAC covers the encoded ISO message from the first byte of the MTI up to, not including, the value
of the MAC field. The MAC field is field 64, or field 128 when the secondary bitmap is present and
field 128 is set, and it must be the last field of the message (the highest bit set in the bitmaps).
Excluded: the framing length header, the TPDU, and any pyiso8583 message header (spec "h") before the
MTI. The MAC field must be fixed-length in the spec; its wire form follows spec[field]["data_enc"]:
"b" carries the MAC as raw bytes (max_len 8 bytes, or fewer for a left-truncated MAC), any text
encoding carries it as upper-case hex characters (max_len 16, or fewer). `mac_layout(spec)` reads this
once from the pyiso8583 spec dict; `sign_message` and `verify_message` apply it to encoded bytes.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = logging.getLogger(__name__)

#: Environment variable that forces the pure-Python (no extension) paths of switch.codec.
PURE_ENV = "SWITCH_CODEC_PURE"
#: Prepared keys remembered by the plain functions (per algorithm); oldest dropped first beyond it.
KEY_CACHE_ENTRIES = 4096
#: DES block size in bytes.
DES_BLOCK_BYTES = 8
#: Longest MAC a DES MAC field can carry (a MAC may be left-truncated to fewer bytes, never more).
MAX_DES_MAC_BYTES = 8

MacFn = Callable[[bytes], bytes]


class MacError(ValueError):
    """A message whose MAC field cannot be located or read (a format error, not a MAC mismatch)."""


def _want_pure() -> bool:
    return os.environ.get(PURE_ENV, "").strip() not in ("", "0")


def _load_fast() -> Any:
    if _want_pure():
        return None
    try:
        from switch._speedups import mac as fast
    except ImportError as exc:  # pragma: no cover - depends on the build
        log.warning("MAC fast path unavailable (%s); using the cryptography fallback", exc)
        return None
    return fast


_fast = _load_fast()
#: True when MACs run on the C extension.
FAST_PATH: bool = _fast is not None


def _check_padding(padding: int) -> None:
    if padding not in (1, 2):
        raise ValueError(f"unknown MAC padding method {padding} (use 1 or 2)")


def _key_bytes(key: bytes | bytearray | memoryview, size: int, what: str) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"{what} key must be bytes, got {type(key).__name__}")
    if len(key) != size:
        raise ValueError(f"{what} key must be {size} bytes, got {len(key)}")
    return bytes(key)


def _pad(data: bytes, padding: int) -> bytes:
    _check_padding(padding)
    if padding == 1:
        return data + bytes(-len(data) % DES_BLOCK_BYTES) if data else bytes(DES_BLOCK_BYTES)
    data += b"\x80"
    return data + bytes(-len(data) % DES_BLOCK_BYTES)


class _CryptoDes:
    """Fallback single DES on `cryptography` (as 3DES(K,K,K)) with contexts built once per key.

    A CBC context cannot be rewound, so one stays open for the key's lifetime and each MAC XORs the
    context's current chaining block into its first block: that cancels the chaining and gives the
    IV-0 CBC-MAC. A lock keeps the chaining state consistent if threads share the key.
    """

    __slots__ = ("_cbc", "_chain", "_dec", "_enc", "_lock")

    def __init__(self, key8: bytes) -> None:
        algorithm = TripleDES(key8 * 3)
        self._cbc = Cipher(algorithm, modes.CBC(bytes(DES_BLOCK_BYTES))).encryptor()
        self._enc = Cipher(algorithm, modes.ECB()).encryptor()
        self._dec = Cipher(algorithm, modes.ECB()).decryptor()
        self._chain = 0
        self._lock = threading.Lock()

    def chain(self, padded: bytes) -> bytes:
        """Last block of the IV-0 CBC encryption of block-aligned data."""
        with self._lock:
            first = int.from_bytes(padded[:8], "big") ^ self._chain
            out = self._cbc.update(first.to_bytes(8, "big") + padded[8:])
            last = out[-8:]
            self._chain = int.from_bytes(last, "big")
        return last

    def encrypt(self, block: bytes) -> bytes:
        return self._enc.update(block)

    def decrypt(self, block: bytes) -> bytes:
        return self._dec.update(block)


class DesMacKey:
    """A single-DES key prepared for ISO 9797-1 algorithm 1 MACs."""

    __slots__ = ("_impl", "_pure")

    def __init__(self, key8: bytes, *, pure: bool | None = None) -> None:
        key8 = _key_bytes(key8, 8, "DES MAC")
        self._pure = (not FAST_PATH) if pure is None else pure
        if not self._pure and _fast is None:
            raise RuntimeError("the MAC extension switch._speedups.mac is not available")
        self._impl: Any = _CryptoDes(key8) if self._pure else _fast.DesKey(key8)

    def __repr__(self) -> str:
        return f"DesMacKey(<hidden>, pure={self._pure})"

    def __reduce__(self) -> Any:
        raise TypeError("MAC keys cannot be pickled")

    def mac(self, data: bytes, padding: int = 1) -> bytes:
        if self._pure:
            return self._impl.chain(_pad(bytes(data), padding))
        return _fast.cbc_mac(self._impl, data, padding)

    __call__ = mac


class RetailMacKey:
    """A double-length key prepared for ISO 9797-1 algorithm 3 (ANSI X9.19 retail) MACs."""

    __slots__ = ("_k1", "_k2", "_pure")

    def __init__(self, key16: bytes, *, pure: bool | None = None) -> None:
        key16 = _key_bytes(key16, 16, "retail MAC")
        self._pure = (not FAST_PATH) if pure is None else pure
        if not self._pure and _fast is None:
            raise RuntimeError("the MAC extension switch._speedups.mac is not available")
        make = _CryptoDes if self._pure else _fast.DesKey
        self._k1: Any = make(key16[:8])
        self._k2: Any = make(key16[8:])

    def __repr__(self) -> str:
        return f"RetailMacKey(<hidden>, pure={self._pure})"

    def __reduce__(self) -> Any:
        raise TypeError("MAC keys cannot be pickled")

    def mac(self, data: bytes, padding: int = 1) -> bytes:
        if not self._pure:
            return _fast.retail_mac(self._k1, self._k2, data, padding)
        h = self._k1.chain(_pad(bytes(data), padding))
        return self._k1.encrypt(self._k2.decrypt(h))

    __call__ = mac


class AesCmacKey:
    """An AES key prepared for RFC 4493 CMACs: the keyed context is built once and copied per MAC."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray | memoryview):
            raise TypeError(f"AES-CMAC key must be bytes, got {type(key).__name__}")
        if len(key) not in (16, 24, 32):
            raise ValueError(f"AES-CMAC key must be 16, 24 or 32 bytes, got {len(key)}")
        self._base = cmac.CMAC(algorithms.AES(bytes(key)))

    def __repr__(self) -> str:
        return "AesCmacKey(<hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("MAC keys cannot be pickled")

    def mac(self, data: bytes) -> bytes:
        ctx = self._base.copy()
        ctx.update(data)
        return ctx.finalize()

    __call__ = mac


class _KeyCache:
    """Bounded map key bytes -> prepared key, oldest evicted first (a full cache means key churn)."""

    __slots__ = ("_entries", "_factory", "_lock", "max_entries")

    def __init__(self, factory: Callable[[bytes], Any], max_entries: int) -> None:
        self._factory = factory
        self._entries: dict[bytes, Any] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, key: bytes) -> Any:
        prepared = self._entries.get(key)
        if prepared is None:
            prepared = self._factory(key)
            with self._lock:
                while len(self._entries) >= self.max_entries > 0:
                    self._entries.pop(next(iter(self._entries)))
                if self.max_entries > 0:
                    self._entries[key] = prepared
        return prepared

    def __repr__(self) -> str:
        return f"_KeyCache({len(self._entries)}/{self.max_entries} keys)"


_des_keys = _KeyCache(DesMacKey, KEY_CACHE_ENTRIES)
_retail_keys = _KeyCache(RetailMacKey, KEY_CACHE_ENTRIES)
_cmac_keys = _KeyCache(AesCmacKey, KEY_CACHE_ENTRIES)


def set_key_cache_entries(max_entries: int) -> None:
    """Bound the prepared-key caches of the plain functions (0 disables caching)."""
    if max_entries < 0:
        raise ValueError(f"key cache size must be >= 0, got {max_entries}")
    for cache in (_des_keys, _retail_keys, _cmac_keys):
        cache.max_entries = max_entries


def cbc_mac(key8: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 1 (single DES, IV 0) over `data`; 8 bytes."""
    if type(key8) is not bytes or len(key8) != 8:
        key8 = _key_bytes(key8, 8, "DES MAC")
    return _des_keys.get(key8).mac(data, padding)


def retail_mac(key16: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 3 / ANSI X9.19 with a double-length key K1 || K2; 8 bytes."""
    if type(key16) is not bytes or len(key16) != 16:
        key16 = _key_bytes(key16, 16, "retail MAC")
    return _retail_keys.get(key16).mac(data, padding)


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """RFC 4493 AES-CMAC; 16 bytes."""
    if type(key) is not bytes:
        if not isinstance(key, bytearray | memoryview):
            raise TypeError(f"AES-CMAC key must be bytes, got {type(key).__name__}")
        key = bytes(key)
    return _cmac_keys.get(key).mac(data)


def verify_mac(expected: bytes, computed: bytes) -> bool:
    """Constant-time MAC comparison; MACs of different lengths never match."""
    return hmac.compare_digest(bytes(expected), bytes(computed))


# ---- which bytes of an encoded message are MACed ----

#: Specs whose MAC layout is remembered (specs are module constants; more means a spec per message).
LAYOUT_CACHE_ENTRIES = 64


class MacLayout(msgspec.Struct, frozen=True):
    """Where the MACed bytes and the MAC field sit in messages of one spec (see module docstring)."""

    #: Bytes before the MTI (pyiso8583 message header "h"); not MACed.
    header_bytes: int
    #: Wire size of the MTI.
    mti_bytes: int
    #: Bitmap wire size (primary and secondary have the same encoding in pyiso8583 specs).
    bitmap_bytes: int
    #: True when bitmaps are hex text rather than raw bytes.
    bitmap_hex: bool
    #: Wire size of the MAC value in field 64 / field 128 (0 when the spec lacks the field).
    mac64_bytes: int
    mac128_bytes: int
    #: True when field 64 / field 128 carries the MAC as hex text rather than raw bytes.
    mac64_hex: bool
    mac128_hex: bool


def _fixed_wire_bytes(spec: Mapping[str, Any], field: str) -> int:
    entry = spec.get(field)
    if entry is None:
        raise MacError(f"spec has no field {field}")
    if entry.get("len_type", 0) != 0:
        raise MacError(f"field {field} must be fixed-length to locate the MAC, spec has len_type "
                       f"{entry.get('len_type')}")
    max_len = int(entry["max_len"])
    if entry.get("data_enc") == "b" and entry.get("len_count", "bytes") == "nibbles":
        return (max_len + 1) // 2
    return max_len


def _mac_field(spec: Mapping[str, Any], field: str) -> tuple[int, bool]:
    if field not in spec:
        return 0, False
    size = _fixed_wire_bytes(spec, field)
    is_hex = spec[field].get("data_enc") != "b"
    mac_bytes = size // 2 if is_hex else size
    if mac_bytes < 1 or mac_bytes > MAX_DES_MAC_BYTES or (is_hex and size % 2):
        raise MacError(f"MAC field {field} must carry 1-8 bytes (or 2-16 hex characters), spec says {size}")
    return size, is_hex


def _build_layout(spec: Mapping[str, Any]) -> MacLayout:
    header_bytes = _fixed_wire_bytes(spec, "h") if "h" in spec else 0
    mti_bytes = _fixed_wire_bytes(spec, "t")
    bitmap_bytes = _fixed_wire_bytes(spec, "p")
    bitmap_hex = spec["p"].get("data_enc") != "b"
    if bitmap_bytes != (16 if bitmap_hex else 8):
        raise MacError(f"primary bitmap must be 8 bytes or 16 hex characters, spec says {bitmap_bytes}")
    mac64_bytes, mac64_hex = _mac_field(spec, "64")
    mac128_bytes, mac128_hex = _mac_field(spec, "128")
    if not mac64_bytes and not mac128_bytes:
        raise MacError("spec has neither field 64 nor field 128")
    return MacLayout(
        header_bytes, mti_bytes, bitmap_bytes, bitmap_hex, mac64_bytes, mac128_bytes, mac64_hex, mac128_hex
    )


#: id(spec) -> (spec, layout); the spec is kept so its id cannot be reused while cached.
_layouts: dict[int, tuple[Mapping[str, Any], MacLayout]] = {}


def mac_layout(spec: Mapping[str, Any]) -> MacLayout:
    """The MAC layout of a pyiso8583 spec, read once per spec object (specs are not mutated after use,
    as switch.codec also assumes). sign_message and verify_message accept a spec or a layout."""
    cached = _layouts.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    layout = _build_layout(spec)
    if len(_layouts) >= LAYOUT_CACHE_ENTRIES:
        _layouts.pop(next(iter(_layouts)))
    _layouts[id(spec)] = (spec, layout)
    return layout


def _bitmap(raw: bytes | bytearray, offset: int, layout: MacLayout) -> int:
    chunk = raw[offset : offset + layout.bitmap_bytes]
    if len(chunk) < layout.bitmap_bytes:
        raise MacError(f"message too short for its bitmap at offset {offset}")
    if not layout.bitmap_hex:
        return int.from_bytes(chunk, "big")
    try:
        return int(bytes(chunk).decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        pass  # raised below, outside the handler: UnicodeDecodeError.object holds the message bytes
    raise MacError(f"bitmap at offset {offset} is not hex")


def _last_field(bits: int, width: int) -> int:
    """Highest field number present in a bitmap of `width` fields (field 1 = most significant bit)."""
    return width - (bits & -bits).bit_length() + 1 if bits else 0


def _locate(raw: bytes | bytearray, layout: MacLayout) -> tuple[int, int, int, bool]:
    """(start, end, size, is_hex): the MACed bytes are raw[start:end]; the MAC value is raw[end:]."""
    start = layout.header_bytes
    offset = start + layout.mti_bytes
    primary = _bitmap(raw, offset, layout)
    if primary >> 63:
        secondary = _bitmap(raw, offset + layout.bitmap_bytes, layout)
        offset += 2 * layout.bitmap_bytes
        if not secondary & 1:  # field 128 absent: find the real last field for the error
            last = _last_field((primary << 64) | secondary, 128)
            raise MacError(f"the last field of the message is {last}; the MAC must be field 64 or 128")
        size, is_hex, field = layout.mac128_bytes, layout.mac128_hex, 128
    else:
        offset += layout.bitmap_bytes
        if not primary & 1:
            last = _last_field(primary, 64)
            raise MacError(f"the last field of the message is {last}; the MAC must be field 64 or 128")
        size, is_hex, field = layout.mac64_bytes, layout.mac64_hex, 64
    if not size:
        raise MacError(f"spec has no MAC field {field}")
    end = len(raw) - size
    if end < offset:
        raise MacError(f"message of {len(raw)} bytes too short for MAC field {field}")
    return start, end, size, is_hex


def _as_layout(spec: Mapping[str, Any] | MacLayout) -> MacLayout:
    return spec if type(spec) is MacLayout else mac_layout(spec)  # type: ignore[arg-type]


def mac_input(raw: bytes | bytearray, spec: Mapping[str, Any] | MacLayout) -> bytes:
    """The bytes of an encoded message that its MAC covers."""
    start, end, _, _ = _locate(raw, _as_layout(spec))
    return bytes(raw[start:end])


def _wire_mac(mac: bytes, size: int, is_hex: bool) -> bytes:
    if is_hex:
        if len(mac) < size // 2:
            raise ValueError(f"mac_fn returned {len(mac)} bytes; the MAC field needs {size} hex characters")
        return mac[: size // 2].hex().upper().encode("ascii")
    if len(mac) < size:
        raise ValueError(f"mac_fn returned {len(mac)} bytes; the MAC field needs {size} bytes")
    return mac[:size]


def sign_message(raw: bytes | bytearray, spec: Mapping[str, Any] | MacLayout, mac_fn: MacFn) -> bytes:
    """`raw` (encoded with a placeholder in its MAC field, the last field) with the real MAC written in."""
    start, end, size, is_hex = _locate(raw, _as_layout(spec))
    value = mac_fn(bytes(raw[start:end]))
    return bytes(raw[:end]) + _wire_mac(value, size, is_hex)


def verify_message(raw: bytes | bytearray, spec: Mapping[str, Any] | MacLayout, mac_fn: MacFn) -> bool:
    """True when the MAC field of `raw` matches mac_fn over the MACed bytes (constant-time compare).

    A message whose MAC field cannot be located raises MacError (a format error); a MAC field that is
    present but wrong, non-hex text included, is simply False. Hex MACs compare case-insensitively.
    """
    start, end, size, is_hex = _locate(raw, _as_layout(spec))
    expected = _wire_mac(mac_fn(bytes(raw[start:end])), size, is_hex)
    received = bytes(raw[end:])
    return hmac.compare_digest(expected, received.upper() if is_hex else received)
