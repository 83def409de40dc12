"""Key management crypto for terminal sign-on, shared by the switch and the terminal simulator.

Key hierarchy (as on CUP-style bank-card POS terminals)
- KEK: the switch's key-encryption key, AES (16/24/32 bytes, hex) from the environment variable or the
  file named by switch.config.KeysConfig. It protects terminal master keys at rest, and data keys are
  derived from it (`Kek.derive_data_key`, HKDF-SHA256) for the card data that state files must keep
  (switch.codec.sealing); the KEK itself never encrypts data.
- TMK: each terminal's master key, a double-length 3DES key loaded into the terminal at installation.
  Stored in the config as `master_key_encrypted_hex`, sealed under the KEK with AES-GCM:
  version 0x01 (1) || nonce (12) || ciphertext || tag (16), hex. The associated data binds the terminal
  id, so a sealed key copied to another terminal's entry does not open.
- Acquirer link MAC keys: one double-length DES key per acquirer (ANSI X9.19 retail MAC on its links),
  stored as `AcquirerConfig.mac_key_sealed_hex`, sealed like a TMK but with its own associated-data
  prefix bound to the acquirer's name (a TMK or another acquirer's value pasted in its place does not
  open). The clear form is refused by the config.
- Working keys: a PIN key and a MAC key (double-length 3DES, odd parity), fresh at every sign-on,
  sent to the terminal encrypted under its TMK with 3DES-ECB.

Field 62 of the 0810 sign-on answer (40 bytes, binary; pyiso8583 shows it as 80 hex characters)
    offset  0  enc_TMK(PIN key)    16 bytes   3DES-ECB under the TMK
    offset 16  KCV(PIN key)         4 bytes   first 4 bytes of 3DES_PINkey(00..00)
    offset 20  enc_TMK(MAC key)    16 bytes
    offset 36  KCV(MAC key)         4 bytes
The check values are computed over the clear keys; the terminal (and `parse_signon_field`) decrypts
each key and refuses it when its check value differs: a wrong TMK or a damaged message never installs.

KEK rotation: `KeysConfig.previous_kek_envs/_files` give KEKs that only open (`Kek.previous`);
`Kek.reseal`/`reseal_link_mac_key` rewrite a value sealed under one of them under the current KEK, and
`switch keys reseal` does that for every store (docs/operations.md has the procedure).

Hygiene: key bytes never appear in a repr, an error or a log line. Containers hold keys as `SecretKey`,
whose repr shows its length and check value only, and which refuses to be pickled.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from switch.config import AcquirerConfig, KeysConfig, TerminalConfig
from switch.private_files import read_private_file

#: Working keys (PIN and MAC) are double-length 3DES keys.
WORKING_KEY_BYTES: Final = 16
#: Check value length used in logs and by operators.
KCV_BYTES: Final = 3
#: Check value length carried in field 62 of the sign-on answer.
SIGNON_KCV_BYTES: Final = 4
#: Size of field 62 in the sign-on answer.
SIGNON_FIELD_BYTES: Final = 2 * (WORKING_KEY_BYTES + SIGNON_KCV_BYTES)
#: Version byte of sealed master keys.
SEALED_VERSION: Final = 1
SEALED_NONCE_BYTES: Final = 12
SEALED_TAG_BYTES: Final = 16
_AAD_PREFIX: Final = b"switch.tmk.v1:"
_LINK_AAD_PREFIX: Final = b"switch.linkmac.v1:"
#: Acquirer link MAC keys are double-length DES keys (ANSI X9.19 retail MAC).
LINK_MAC_KEY_BYTES: Final = 16
#: HKDF info prefix of data keys; the purpose (say "saf") follows, so each store has its own keys.
_DEK_INFO_PREFIX: Final = b"switch.dek.v1:"
#: Data keys are AES-256.
DATA_KEY_BYTES: Final = 32

#: DES weak and semi-weak keys (odd parity form); a generated key half is never one of them.
WEAK_DES_KEYS: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0101010101010101", "FEFEFEFEFEFEFEFE", "E0E0E0E0F1F1F1F1", "1F1F1F1F0E0E0E0E",
        "01FE01FE01FE01FE", "FE01FE01FE01FE01", "1FE01FE00EF10EF1", "E01FE01FF10EF10E",
        "01E001E001F101F1", "E001E001F101F101", "1FFE1FFE0EFE0EFE", "FE1FFE1FFE0EFE0E",
        "011F011F010E010E", "1F011F010E010E01", "E0FEE0FEF1FEF1FE", "FEE0FEE0FEF1FEF1",
    )
)


class KeyCheckError(ValueError):
    """A key whose check value does not match (wrong TMK, damaged or forged field 62)."""


class KeyStoreError(ValueError):
    """The KEK or a sealed master key cannot be loaded or opened; the message never holds key bytes."""


def _raw(key: KeyMaterial, what: str) -> bytes:
    if isinstance(key, SecretKey):
        return key.value
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise TypeError(f"{what} must be bytes or SecretKey, got {type(key).__name__}")


def _tdes(key: bytes, what: str) -> TripleDES:
    # Always hand `cryptography` the 24-byte form (its 8- and 16-byte forms are deprecated).
    if len(key) == 8:
        key = key * 3
    elif len(key) == 16:
        key = key + key[:8]
    elif len(key) != 24:
        raise ValueError(f"{what} must be an 8, 16 or 24-byte DES key, got {len(key)} bytes")
    return TripleDES(key)


def kcv(key: KeyMaterial, length: int = KCV_BYTES) -> bytes:
    """Key check value: the first `length` bytes of 3DES-encrypting eight zero bytes under `key`."""
    if not 1 <= length <= 8:
        raise ValueError(f"check value length must be 1-8 bytes, got {length}")
    encryptor = Cipher(_tdes(_raw(key, "key"), "key"), modes.ECB()).encryptor()
    return encryptor.update(bytes(8))[:length]


class SecretKey:
    """Key bytes that stay out of reprs, logs and pickles; `.value` hands them to crypto code."""

    __slots__ = ("_value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: bytes | bytearray) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"key must be bytes, got {type(value).__name__}")
        self._value = bytes(value)

    @property
    def value(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def check_value(self, length: int = KCV_BYTES) -> str:
        """Hex check value for operators (3DES keys; other lengths show their size only)."""
        if len(self._value) in (8, 16, 24):
            return kcv(self._value, length).hex().upper()
        return "n/a"

    def __repr__(self) -> str:
        return f"SecretKey(<{len(self._value)} bytes>, kcv={self.check_value()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretKey):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __reduce__(self) -> Any:
        raise TypeError("keys cannot be pickled")


#: Anything a key parameter accepts.
KeyMaterial = bytes | bytearray | memoryview | SecretKey


# ---- DES key material ----


def set_odd_parity(key: bytes) -> bytes:
    """Each byte with its low bit set so the byte has an odd number of one bits (DES key parity)."""
    return bytes((b & 0xFE) | ((b >> 1).bit_count() + 1) % 2 for b in key)


def has_odd_parity(key: bytes) -> bool:
    return all(b.bit_count() % 2 == 1 for b in key)


def generate_working_key(token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """A fresh double-length 3DES key with odd parity; halves differ and neither is (semi-)weak.

    `token_bytes` is the randomness source (a seeded one for reproducible simulations only).
    """
    while True:
        key = set_odd_parity(token_bytes(WORKING_KEY_BYTES))
        k1, k2 = key[:8], key[8:]
        if k1 != k2 and k1 not in WEAK_DES_KEYS and k2 not in WEAK_DES_KEYS:
            return key


def encrypt_key(kek: KeyMaterial, key: KeyMaterial) -> bytes:
    """`key` encrypted under a 3DES key-encryption key with ECB, as terminals expect."""
    clear = _raw(key, "key")
    if not clear or len(clear) % 8:
        raise ValueError(f"key to encrypt must be a multiple of 8 bytes, got {len(clear)}")
    return Cipher(_tdes(_raw(kek, "KEK"), "KEK"), modes.ECB()).encryptor().update(clear)


def decrypt_key(kek: KeyMaterial, encrypted: bytes) -> bytes:
    """Inverse of encrypt_key."""
    if not encrypted or len(encrypted) % 8:
        raise ValueError(f"encrypted key must be a multiple of 8 bytes, got {len(encrypted)}")
    return Cipher(_tdes(_raw(kek, "KEK"), "KEK"), modes.ECB()).decryptor().update(bytes(encrypted))


# ---- field 62 of the sign-on answer ----


class WorkingKeys:
    """The PIN and MAC keys a sign-on installs; repr shows check values only."""

    __slots__ = ("mac_key", "pin_key")

    def __init__(self, pin_key: SecretKey, mac_key: SecretKey) -> None:
        self.pin_key = pin_key
        self.mac_key = mac_key

    def __repr__(self) -> str:
        return f"WorkingKeys(pin_kcv={self.pin_key.check_value()}, mac_kcv={self.mac_key.check_value()})"

    def __reduce__(self) -> Any:
        raise TypeError("keys cannot be pickled")


def build_signon_field(tmk: KeyMaterial, pin_key: KeyMaterial, mac_key: KeyMaterial) -> bytes:
    """Field 62 of the 0810 answer: enc(PIN key) || KCV || enc(MAC key) || KCV (40 bytes)."""
    parts = []
    for name, key in (("PIN key", pin_key), ("MAC key", mac_key)):
        clear = _raw(key, name)
        if len(clear) != WORKING_KEY_BYTES:
            raise ValueError(f"{name} must be {WORKING_KEY_BYTES} bytes, got {len(clear)}")
        parts.append(encrypt_key(tmk, clear))
        parts.append(kcv(clear, SIGNON_KCV_BYTES))
    return b"".join(parts)


def parse_signon_field(tmk: KeyMaterial, field: bytes | str) -> WorkingKeys:
    """Decrypt the working keys of field 62 (bytes, or hex text as pyiso8583 decodes it) and check both
    KCVs; raises KeyCheckError when a check value differs, ValueError when the field is malformed."""
    if isinstance(field, str):
        try:
            data = bytes.fromhex(field)
        except ValueError:
            raise ValueError("field 62 is not hex text") from None
    else:
        data = bytes(field)
    if len(data) != SIGNON_FIELD_BYTES:
        raise ValueError(f"field 62 must carry {SIGNON_FIELD_BYTES} bytes of working keys, got {len(data)}")
    keys = []
    step = WORKING_KEY_BYTES + SIGNON_KCV_BYTES
    for name, offset in (("PIN key", 0), ("MAC key", step)):
        clear = decrypt_key(tmk, data[offset : offset + WORKING_KEY_BYTES])
        sent = data[offset + WORKING_KEY_BYTES : offset + step]
        got = kcv(clear, SIGNON_KCV_BYTES)
        if not hmac.compare_digest(sent, got):
            raise KeyCheckError(
                f"{name} check value mismatch: field 62 says {sent.hex().upper()}, the key decrypted under "
                f"this TMK checks as {got.hex().upper()} (wrong TMK or damaged message)"
            )
        keys.append(SecretKey(clear))
    return WorkingKeys(keys[0], keys[1])


# ---- terminal master keys at rest, under the KEK ----


class Kek:
    """The AES key-encryption key: seals and opens stored keys, and derives data keys.

    A Kek may carry `previous` KEKs (KEK rotation): they only open what was sealed under them; every
    new seal, re-seal and derived data key uses this one. Sealed keys carry no KEK identifier, so
    opening tries this KEK first and then each previous one (AES-GCM tells a wrong key by its tag).
    """

    __slots__ = ("_aead", "_kcv", "_previous", "_secret")

    def __init__(self, key: bytes, previous: Iterable[Kek] = ()) -> None:
        if len(key) not in (16, 24, 32):
            raise KeyStoreError(f"KEK must be 16, 24 or 32 bytes (AES), got {len(key)}")
        self._aead = AESGCM(bytes(key))
        self._secret = SecretKey(key)
        zero = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor().update(bytes(16))
        self._kcv = zero[:KCV_BYTES].hex().upper()
        kept: dict[str, Kek] = {}
        for old in previous:
            if not isinstance(old, Kek):
                raise TypeError(f"previous KEKs must be Kek objects, got {type(old).__name__}")
            if old.check_value != self._kcv:  # the current KEK listed again as previous: ignore it
                kept.setdefault(old.check_value, old._alone())
        self._previous: tuple[Kek, ...] = tuple(kept.values())

    def _alone(self) -> Kek:
        return self if not self._previous else Kek(self._secret.value)

    @property
    def check_value(self) -> str:
        """AES check value (first 3 bytes of AES(0^128)) so operators can tell KEKs apart."""
        return self._kcv

    @property
    def previous(self) -> tuple[Kek, ...]:
        """KEKs accepted only for opening (rotation in progress); empty in normal operation."""
        return self._previous

    def with_previous(self, previous: Iterable[Kek]) -> Kek:
        """This KEK, also opening what the `previous` KEKs sealed."""
        return Kek(self._secret.value, previous)

    def __repr__(self) -> str:
        old = f", previous={[k.check_value for k in self._previous]}" if self._previous else ""
        return f"Kek(<hidden>, kcv={self._kcv}{old})"

    def __reduce__(self) -> Any:
        raise TypeError("keys cannot be pickled")

    # --- sealed keys: version 0x01 || nonce (12) || AES-GCM(key) || tag (16), hex -----------------
    def _seal(self, aad: bytes, clear: bytes) -> str:
        nonce = os.urandom(SEALED_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, clear, aad)
        return (bytes([SEALED_VERSION]) + nonce + sealed).hex().upper()

    def _open(self, aad: bytes, sealed_hex: str, what: str, why: str) -> tuple[SecretKey, Kek]:
        """The clear key and the KEK (this one or a previous one) that opened it."""
        try:
            blob = bytes.fromhex(sealed_hex)
        except ValueError:
            raise KeyStoreError(f"{what} is not hex") from None
        if len(blob) < 1 + SEALED_NONCE_BYTES + SEALED_TAG_BYTES + 16 or blob[0] != SEALED_VERSION:
            raise KeyStoreError(f"{what} is not a sealed key of version {SEALED_VERSION}")
        nonce, sealed = blob[1 : 1 + SEALED_NONCE_BYTES], blob[1 + SEALED_NONCE_BYTES :]
        for kek in (self, *self._previous):
            try:
                return SecretKey(kek._aead.decrypt(nonce, sealed, aad)), kek
            except InvalidTag:
                continue
        tried = ", ".join((self._kcv, *(k.check_value for k in self._previous)))
        plural = "s" if self._previous else ""
        raise KeyStoreError(
            f"{what} does not open under the KEK{plural} with check value{plural} {tried} "
            f"(wrong KEK, altered value, or {why})"
        )

    def seal(self, terminal_id: str, tmk: KeyMaterial) -> str:
        """Sealed, hex form of a terminal master key (TerminalConfig.master_key_encrypted_hex)."""
        clear = _raw(tmk, "master key")
        if len(clear) not in (16, 24):
            raise ValueError(f"master key must be a 16 or 24-byte 3DES key, got {len(clear)} bytes")
        return self._seal(_AAD_PREFIX + terminal_id.encode(), clear)

    def open(self, terminal_id: str, sealed_hex: str) -> SecretKey:
        """The master key of `terminal_id`; KeyStoreError if it does not open under this KEK (or a
        previous one)."""
        return self._open(
            _AAD_PREFIX + terminal_id.encode(),
            sealed_hex,
            f"master key of terminal {terminal_id!r}",
            "a value sealed for another terminal",
        )[0]

    def reseal(self, terminal_id: str, sealed_hex: str) -> str | None:
        """The master key sealed under this KEK when it was sealed under a previous one; None when it
        already is under this KEK (nothing to rewrite). KeyStoreError if it does not open at all."""
        aad = _AAD_PREFIX + terminal_id.encode()
        what = f"master key of terminal {terminal_id!r}"
        key, kek = self._open(aad, sealed_hex, what, "a value sealed for another terminal")
        return None if kek is self else self._seal(aad, key.value)

    def seal_link_mac_key(self, acquirer: str, key: KeyMaterial) -> str:
        """Sealed, hex form of an acquirer link's MAC key (AcquirerConfig.mac_key_sealed_hex). The
        associated data binds the acquirer's name and a purpose of its own, so neither another link's
        value nor a terminal master key pasted in its place opens."""
        clear = _raw(key, "link MAC key")
        if len(clear) != LINK_MAC_KEY_BYTES:
            raise ValueError(
                f"link MAC key must be {LINK_MAC_KEY_BYTES} bytes (double-length DES), got {len(clear)}"
            )
        return self._seal(_LINK_AAD_PREFIX + acquirer.encode(), clear)

    def open_link_mac_key(self, acquirer: str, sealed_hex: str) -> SecretKey:
        """The MAC key of acquirer `acquirer`'s links; KeyStoreError if it does not open."""
        key = self._open(
            _LINK_AAD_PREFIX + acquirer.encode(),
            sealed_hex,
            f"link MAC key of acquirer {acquirer!r}",
            "a value sealed for another acquirer",
        )[0]
        if len(key) != LINK_MAC_KEY_BYTES:
            raise KeyStoreError(f"link MAC key of acquirer {acquirer!r} is not {LINK_MAC_KEY_BYTES} bytes")
        return key

    def reseal_link_mac_key(self, acquirer: str, sealed_hex: str) -> str | None:
        """As `reseal`, for a link MAC key."""
        aad = _LINK_AAD_PREFIX + acquirer.encode()
        what = f"link MAC key of acquirer {acquirer!r}"
        key, kek = self._open(aad, sealed_hex, what, "a value sealed for another acquirer")
        return None if kek is self else self._seal(aad, key.value)

    def derive_data_key(self, purpose: str, key_id: bytes) -> SecretKey:
        """The AES-256 data key `key_id` of `purpose`: HKDF-SHA256 with the KEK as input key material,
        `key_id` as salt and b"switch.dek.v1:" + purpose as info.

        Why derived rather than stored: a key id (random, 16 bytes) in each sealed record is all a
        reader needs, so stores keep no key table and rotate keys by picking a new id. The KEK is only
        HKDF input here, never an AES-GCM key for data, so the two uses cannot interact.
        """
        if not purpose or not key_id:
            raise ValueError("a data key needs a purpose and a non-empty key id")
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=DATA_KEY_BYTES,
            salt=bytes(key_id),
            info=_DEK_INFO_PREFIX + purpose.encode(),
        )
        return SecretKey(hkdf.derive(self._secret.value))


def generate_kek() -> str:
    """A new 256-bit KEK as hex text, for the environment variable or the KEK file."""
    return secrets.token_hex(32).upper()


def _parse_kek_text(text: str, where: str) -> Kek:
    cleaned = "".join(text.split())
    try:
        key = bytes.fromhex(cleaned)
    except ValueError:
        key = None
    if key is None:  # raised outside the handler, so no exception chain leads back to the text
        raise KeyStoreError(f"KEK from {where} is not hex text")
    if len(key) not in (16, 24, 32):
        raise KeyStoreError(f"KEK from {where} must be 16, 24 or 32 bytes of hex, got {len(key)} bytes")
    return Kek(key)


def _read_kek_file(file: str) -> Kek:
    return _parse_kek_text(read_private_file(file, "KEK file", KeyStoreError), f"file {file}")


def _read_kek_env(name: str, env: Mapping[str, str], hint: str) -> Kek:
    text = env.get(name, "")
    if not text:
        raise KeyStoreError(f"no KEK: set the environment variable {name}{hint}")
    return _parse_kek_text(text, f"environment variable {name}")


def load_kek(config: KeysConfig, environ: Mapping[str, str] | None = None) -> Kek:
    """The KEK from KeysConfig.kek_file when set (which must not be readable by group or others),
    otherwise from the environment variable KeysConfig.kek_env; with the previous KEKs of
    `previous_kek_envs`/`previous_kek_files` (rotation) attached for opening only. Every configured
    previous KEK must be present: a rotation half set up fails at start, not at the first old record.
    Errors name the source, never the key."""
    env = os.environ if environ is None else environ
    if config.kek_file:
        current = _read_kek_file(config.kek_file)
    else:
        current = _read_kek_env(config.kek_env, env, " or keys.kek_file")
    previous = [_read_kek_env(name, env, " (keys.previous_kek_envs)") for name in config.previous_kek_envs]
    previous += [_read_kek_file(file) for file in config.previous_kek_files]
    return current.with_previous(previous) if previous else current


def load_link_mac_keys(acquirers: Iterable[AcquirerConfig], kek: Kek) -> dict[str, SecretKey]:
    """Open the sealed MAC key of every acquirer that has one (acquirers without one are left out:
    their links are not MACed). Any key that does not open stops the load, as for master keys."""
    return {
        acq.name: kek.open_link_mac_key(acq.name, acq.mac_key_sealed_hex)
        for acq in acquirers
        if acq.mac_key_sealed_hex
    }


def load_master_keys(terminals: Iterable[TerminalConfig], kek: Kek) -> dict[str, SecretKey]:
    """Open every configured terminal master key (terminals without one are left out). Any key that
    does not open stops the load: a switch must not start with a KEK that is not the one of its keys."""
    keys: dict[str, SecretKey] = {}
    for terminal in terminals:
        if terminal.master_key_encrypted_hex:
            keys[terminal.id] = kek.open(terminal.id, terminal.master_key_encrypted_hex)
    return keys
