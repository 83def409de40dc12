"""Field-level sealing of card data that a state file must keep: AES-256-GCM under derived data keys.

Why: the store-and-forward queue and the armed-reversal store must keep the PAN (the acquirer needs it
to find the original of a reversal or an advice), and PCI DSS 3.5 requires a stored PAN to be
unreadable. So the sensitive fields of a stored message (`SEALED_FIELDS`) are encrypted, the fields
that must never be stored at all (`masking.WIPED_FIELDS`: track data, PIN block, ICC data, MACs) are
dropped, and the rest stays readable so operators can still see RRN, STAN, amount and terminal.

Stored form (`SealedRecord`, JSON): ``{"clear": {field: value}, "sealed": base64}`` where ``sealed`` is

    version (1) || KEK check value (3) || key id (16) || nonce (12) || AES-GCM(ciphertext || tag 16)

and the plaintext is the JSON of the sealed fields. The associated data binds the purpose, the caller's
row identity (``context``, see `row_context`), the header and the clear fields as stored: a sealed part
moved to another row, or a clear field (the amount of a reversal) changed in the file, does not open.

Keys and nonces: each key id names a data key derived from the KEK (`Kek.derive_data_key`, HKDF). A
sealer draws a fresh random 128-bit key id when it is made (so every process start) and again after
`max_seals_per_key` seals, and no other sealer ever uses that key. Under it the nonce is a counter, so
nonces are unique by construction (NIST SP 800-38D 8.2.1, deterministic construction) with no durable
counter and no random-nonce collision bound; `max_seals_per_key` (2**32) caps how much one key seals.
Records name their key id, so older records open for as long as the KEK that derived them is given
(`previous` KEKs while rotating the KEK; re-seal pending records under the new one, then drop the old).

Pure: no I/O besides the randomness source. Thread-safe (the durable writer thread and the trio thread
may both seal).
"""

from __future__ import annotations

import base64
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from switch.codec.keys import Kek
from switch.codec.masking import WIPED_FIELDS

#: Fields kept in a stored message but only sealed: PAN (2), expiry (14), extended PAN (34), account
#: identification (102, 103). Card data that must not be stored at all is in masking.WIPED_FIELDS.
SEALED_FIELDS: Final = frozenset({"2", "14", "34", "102", "103"})
FORMAT_VERSION: Final = 1
KCV_BYTES: Final = 3
KEY_ID_BYTES: Final = 16
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
HEADER_BYTES: Final = 1 + KCV_BYTES + KEY_ID_BYTES
#: Seals under one data key before the sealer moves to a fresh key id.
DEFAULT_MAX_SEALS_PER_KEY: Final = 2**32
#: Data keys kept derived for opening; a miss costs one HKDF (microseconds).
MAX_CACHED_KEYS: Final = 64

_AAD_PREFIX: Final = b"switch.sealed.v1\x00"


class SealingError(ValueError):
    """A record that does not open: wrong KEK, altered file, or a sealed part moved from another row.
    The message names the purpose, the key's KEK check value and the caller's context, never a value."""


class SealedRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a stored message looks on disk: readable fields, and the sealed ones (None once stripped)."""

    clear: dict[str, str]
    sealed: bytes | None = None


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(SealedRecord)
_fields_decoder = msgspec.json.Decoder(dict[str, str])
_json = msgspec.json.Encoder()


def split_fields(fields: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(clear, secret): WIPED_FIELDS dropped, SEALED_FIELDS in `secret`, every value as text."""
    clear: dict[str, str] = {}
    secret: dict[str, str] = {}
    for k, v in fields.items():
        if k in WIPED_FIELDS:
            continue
        (secret if k in SEALED_FIELDS else clear)[k] = v if isinstance(v, str) else str(v)
    return clear, secret


def _aad(purpose: bytes, context: bytes, header: bytes, clear_json: bytes) -> bytes:
    # clear_json: the clear fields exactly as stored; a decoded record re-encodes to the same bytes
    # (msgspec keeps key order and writes strings one way)
    return b"".join((_AAD_PREFIX, purpose, b"\x00", context, b"\x00", header, clear_json))


def decode_record(data: bytes) -> SealedRecord:
    """The stored record without opening it (clear fields only need no key). SealingError when `data`
    is not a sealed record (a legacy row with clear fields: see `is_legacy`)."""
    try:
        return _record_decoder.decode(data)
    except msgspec.DecodeError:
        raise SealingError("stored fields are not a sealed record") from None


def is_legacy(data: bytes) -> bool:
    """True for a row written before sealing (a plain field dict): it must be re-sealed."""
    try:
        _record_decoder.decode(data)
        return False
    except msgspec.DecodeError:
        pass
    try:
        _fields_decoder.decode(data)
    except msgspec.DecodeError:
        return False
    return True


def decode_legacy(data: bytes) -> dict[str, str]:
    """The field dict of a legacy (unsealed) row, for re-sealing it."""
    try:
        return _fields_decoder.decode(data)
    except msgspec.DecodeError:
        raise SealingError("stored fields are neither a sealed record nor a field dict") from None


def strip_sealed(data: bytes) -> bytes:
    """The record with its sealed part removed: for rows that stay after their card data is no longer
    needed (a delivered store-and-forward item)."""
    return _record_encoder.encode(SealedRecord(decode_record(data).clear, None))


class FieldSealer:
    """Seals and opens the sensitive fields of field dicts for one purpose (one store).

    `kek` derives the keys new records are sealed under; `previous` KEKs, and those `kek` carries
    (`Kek.previous`), only open (KEK rotation).
    `token_bytes` draws key ids; it must be a CSPRNG (two sealers drawing the same key id would reuse
    nonces), so only a test that checks the key-id rotation itself passes another one.
    """

    __slots__ = (
        "_active",
        "_active_header",
        "_cache",
        "_keks",
        "_lock",
        "_max_seals",
        "_purpose",
        "_sealing_kek",
        "_seals",
        "_token_bytes",
        "purpose",
    )

    def __init__(
        self,
        kek: Kek,
        purpose: str,
        *,
        previous: Iterable[Kek] = (),
        max_seals_per_key: int = DEFAULT_MAX_SEALS_PER_KEY,
        token_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not purpose or "\x00" in purpose:
            raise ValueError("a sealer needs a purpose without NUL characters")
        if not 1 <= max_seals_per_key <= 2**64:
            raise ValueError(f"max_seals_per_key must be 1..2**64 (counter nonces), got {max_seals_per_key}")
        self.purpose = purpose
        self._purpose = purpose.encode()
        self._sealing_kek = kek
        self._keks: dict[bytes, Kek] = {}
        # previous KEKs: given here, or attached to `kek` (switch.codec.keys.load_kek during a rotation);
        # the sealing KEK wins a (1 in 2**24) check-value clash
        for k in (*previous, *kek.previous, kek):
            self._keks[bytes.fromhex(k.check_value)] = k
        self._max_seals = max_seals_per_key
        self._token_bytes = token_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, AESGCM] = OrderedDict()
        self._seals = 0
        self._active_header = b""
        self._active: AESGCM | None = None
        self._rotate()

    def __repr__(self) -> str:
        return f"FieldSealer({self.purpose!r}, kek_kcv={self._sealing_kek.check_value})"

    def __reduce__(self) -> Any:
        raise TypeError("sealers hold keys and cannot be pickled")

    @property
    def key_header(self) -> bytes:
        """Version, KEK check value and key id that new records carry (tests, operators)."""
        return self._active_header

    def _rotate(self) -> None:
        key_id = self._token_bytes(KEY_ID_BYTES)
        if len(key_id) != KEY_ID_BYTES:
            raise ValueError("randomness source returned the wrong number of bytes")
        header = bytes([FORMAT_VERSION]) + bytes.fromhex(self._sealing_kek.check_value) + key_id
        self._active = self._derive(header)
        self._active_header = header
        self._seals = 0

    def _derive(self, header: bytes) -> AESGCM:
        aead = self._cache.get(header)
        if aead is not None:
            self._cache.move_to_end(header)
            return aead
        kek = self._keks.get(header[1 : 1 + KCV_BYTES])
        if kek is None:
            raise SealingError(
                f"{self.purpose} record sealed under the KEK with check value "
                f"{header[1 : 1 + KCV_BYTES].hex().upper()}; this switch has "
                f"{self._sealing_kek.check_value} (give the old KEK as a previous KEK and re-seal)"
            )
        aead = AESGCM(kek.derive_data_key(self.purpose, header[1 + KCV_BYTES :]).value)
        self._cache[header] = aead
        if len(self._cache) > MAX_CACHED_KEYS:
            self._cache.popitem(last=False)
        return aead

    def seal(self, fields: Mapping[str, Any], context: bytes) -> bytes:
        """The stored form of `fields` for the row named by `context`: WIPED_FIELDS dropped,
        SEALED_FIELDS encrypted. Always seals (an empty secret part still authenticates the clear one)."""
        clear, secret = split_fields(fields)
        with self._lock:
            if self._seals >= self._max_seals:
                self._rotate()
            counter = self._seals
            self._seals += 1
            aead, header = self._active, self._active_header
        assert aead is not None
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        clear_json = _json.encode(clear)
        body = aead.encrypt(nonce, _json.encode(secret), _aad(self._purpose, context, header, clear_json))
        # the SealedRecord JSON, built around the clear bytes already encoded
        return b"".join(
            (b'{"clear":', clear_json, b',"sealed":"', base64.b64encode(header + nonce + body), b'"}')
        )

    def open(self, data: bytes, context: bytes) -> dict[str, str]:
        """All stored fields of a record sealed for the row named by `context`; SealingError if the
        record does not open (its message holds no field value)."""
        record = decode_record(data)
        blob = record.sealed
        if blob is None:
            raise SealingError(f"{self.purpose} record {_ctx(context)}: its sealed fields were removed")
        if len(blob) < HEADER_BYTES + NONCE_BYTES + TAG_BYTES or blob[0] != FORMAT_VERSION:
            raise SealingError(f"{self.purpose} record {_ctx(context)}: not a version {FORMAT_VERSION} seal")
        header = blob[:HEADER_BYTES]
        with self._lock:
            aead = self._derive(header)
        nonce = blob[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
        try:
            aad = _aad(self._purpose, context, header, _json.encode(record.clear))
            plain = aead.decrypt(nonce, blob[HEADER_BYTES + NONCE_BYTES :], aad)
        except InvalidTag:
            raise SealingError(
                f"{self.purpose} record {_ctx(context)} does not open under the KEK with check value "
                f"{header[1 : 1 + KCV_BYTES].hex().upper()} (altered, or moved from another row)"
            ) from None
        try:
            secret = _fields_decoder.decode(plain)
        except msgspec.DecodeError:
            raise SealingError(f"{self.purpose} record {_ctx(context)}: sealed part is malformed") from None
        return {**record.clear, **secret}

    def sealed_under_current_kek(self, data: bytes) -> bool:
        """True when the record is sealed under the sealing KEK (re-sealing the others rotates a KEK)."""
        blob = decode_record(data).sealed
        return blob is not None and blob[1 : 1 + KCV_BYTES] == self._active_header[1 : 1 + KCV_BYTES]


def row_context(*parts: str | int) -> bytes:
    """The `context` of a row from its identity (say row_context("saf", 17, "alpha", "0400")): parts
    joined by NUL, so ("a:b", "c") and ("a", "b:c") differ."""
    out = []
    for part in parts:
        text = str(part)
        if "\x00" in text:
            raise ValueError("a row identity part contains a NUL character")
        out.append(text.encode())
    return b"\x00".join(out)


def _ctx(context: bytes) -> str:
    # contexts are row identities (ids, acquirer names, RRNs): printable, never card data
    return context.decode("ascii", "replace").replace("\x00", "/")
