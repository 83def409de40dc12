"""The simulators' binding of one profile: spec, encode/decode, framing, MAC over field 64.

Why the simulators have their own small binding rather than switch.server.wire: the layer rules let sim
import only codec and config, and a simulator must be able to *break* the wire on purpose (garbage
frames, a wrong MAC), which the server's helper rightly cannot.

Stand-ins: switch.codec.framing / switch.codec.mac may not be importable yet while the codec is being
built; until they are, the two small fallbacks below (2-byte / 4-digit length framing, ANSI X9.19
retail MAC with `cryptography`) are used. They implement the same standards, so both sides agree either
way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from switch import codec
from switch.codec.masking import scrub_text

MAC_BYTES = 8
TPDU_BYTES = 5


class SimWireError(ValueError):
    """A frame or message the simulator cannot read; the text never carries card data."""


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_specs_mod = _optional("switch.codec.specs")
_mac_mod = _optional("switch.codec.mac")


def spec_for(profile: str) -> dict:
    """The pyiso8583 spec of a profile (pyiso8583's default spec until switch.codec.specs lands)."""
    if _specs_mod is not None:
        try:
            return _specs_mod.SPECS[profile]
        except KeyError:
            raise SimWireError(f"unknown profile {profile!r}; known: {sorted(_specs_mod.SPECS)}") from None
    import iso8583.specs

    return iso8583.specs.default


# --- framing -----------------------------------------------------------------------------------------
def frame(payload: bytes, kind: str, tpdu: bytes | None = None) -> bytes:
    """Length-prefix a message: ``binary2`` (2-byte big-endian) or ``ascii4`` (4 ASCII digits)."""
    body = (tpdu or b"") + payload
    if kind == "binary2":
        if len(body) > 0xFFFF:
            raise SimWireError(f"frame of {len(body)} bytes does not fit a 2-byte length")
        return len(body).to_bytes(2, "big") + body
    if kind == "ascii4":
        if len(body) > 9999:
            raise SimWireError(f"frame of {len(body)} bytes does not fit a 4-digit length")
        return f"{len(body):04d}".encode() + body
    raise SimWireError(f"unknown framing {kind!r}")


class FrameReader:
    """Split a byte stream into message payloads; refuses frames above ``max_frame_bytes``."""

    def __init__(self, kind: str, max_frame_bytes: int, tpdu: bool = False) -> None:
        if kind not in ("binary2", "ascii4"):
            raise SimWireError(f"unknown framing {kind!r}")
        self.kind = kind
        self.max_frame_bytes = max_frame_bytes
        self.tpdu = tpdu
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes | None]]:
        """Complete frames in ``data`` (plus what was buffered): (payload, tpdu or None) each."""
        self._buf += data
        out: list[tuple[bytes, bytes | None]] = []
        header = 2 if self.kind == "binary2" else 4
        while len(self._buf) >= header:
            if self.kind == "binary2":
                size = int.from_bytes(self._buf[:2], "big")
            else:
                digits = bytes(self._buf[:4])
                if not digits.isdigit():
                    raise SimWireError("ascii4 length prefix is not 4 digits")
                size = int(digits)
            if size > self.max_frame_bytes:
                raise SimWireError(f"frame of {size} bytes exceeds max_frame_bytes={self.max_frame_bytes}")
            if len(self._buf) < header + size:
                break
            body = bytes(self._buf[header : header + size])
            del self._buf[: header + size]
            if self.tpdu:
                if len(body) < TPDU_BYTES:
                    raise SimWireError("frame shorter than its TPDU")
                out.append((body[TPDU_BYTES:], body[:TPDU_BYTES]))
            else:
                out.append((body, None))
        return out


def swap_tpdu(tpdu: bytes) -> bytes:
    """The answer's TPDU: same ID, destination and source addresses swapped."""
    if len(tpdu) != TPDU_BYTES:
        raise SimWireError("TPDU must be 5 bytes")
    return tpdu[:1] + tpdu[3:5] + tpdu[1:3]


# --- MAC ---------------------------------------------------------------------------------------------
def _fallback_retail_mac(key16: bytes, data: bytes) -> bytes:
    """ANSI X9.19 retail MAC, ISO 9797-1 padding method 1: single-DES CBC under K1, then D(K2), E(K1)."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    k1, k2 = key16[:8], key16[8:16]
    if len(data) % 8:
        data = data + b"\0" * (8 - len(data) % 8)
    enc1 = Cipher(TripleDES(k1 * 3), modes.CBC(b"\0" * 8)).encryptor()
    last = (enc1.update(data) + enc1.finalize())[-8:]
    dec2 = Cipher(TripleDES(k2 * 3), modes.ECB()).decryptor()
    mid = dec2.update(last) + dec2.finalize()
    enc3 = Cipher(TripleDES(k1 * 3), modes.ECB()).encryptor()
    return enc3.update(mid) + enc3.finalize()


def retail_mac(key16: bytes, data: bytes) -> bytes:
    if len(key16) != 16:
        raise SimWireError("MAC key must be 16 bytes (double-length DES)")
    if _mac_mod is not None and hasattr(_mac_mod, "retail_mac"):
        return bytes(_mac_mod.retail_mac(key16, data))
    return _fallback_retail_mac(key16, data)


MacFn = Callable[[bytes], bytes]


def _mac_offset(raw: bytes, encoded: dict[str, Any]) -> int:
    """Where field 64's 8 bytes start: before every encoded field numbered above 64."""
    after = sum(len(v["len"]) + len(v["data"]) for k, v in encoded.items() if k.isdigit() and int(k) > 64)
    return len(raw) - after - MAC_BYTES


class SimWire:
    """Encode/decode/MAC/frame for one profile. The MAC (field 64, 8 bytes) covers every other byte of
    the message: MTI, bitmaps, and every field before and after 64."""

    def __init__(self, profile: str, framing: str, mac_key_hex: str = "", tpdu: bool = False) -> None:
        self.profile = profile
        self.spec = spec_for(profile)
        self.framing = framing
        self.tpdu = tpdu
        self.mac_key = bytes.fromhex(mac_key_hex) if mac_key_hex else None
        if self.mac_key is not None and len(self.mac_key) != 16:
            raise SimWireError("mac_key_hex must be 32 hex digits")
        frame(b"", framing)  # validates the framing kind now, not at the first message

    def set_mac_key(self, key16: bytes | None) -> None:
        self.mac_key = key16

    def reader(self, max_frame_bytes: int) -> FrameReader:
        return FrameReader(self.framing, max_frame_bytes, self.tpdu)

    def encode(self, fields: dict[str, Any], *, mac: bool | None = None, wrong_mac: bool = False) -> bytes:
        """Encode; MAC field 64 when a key is set (or ``mac`` says so). ``wrong_mac`` flips its bits."""
        use_mac = self.mac_key is not None if mac is None else mac
        fields = dict(fields)
        if use_mac or wrong_mac:
            fields["64"] = "00" * MAC_BYTES if self.spec["64"]["data_enc"] == "b" else "0" * 16
        else:
            fields.pop("64", None)
        try:
            raw, encoded = codec.encode(fields, self.spec)
        except codec.EncodeError as exc:
            raise SimWireError(scrub_text(str(exc))) from None
        raw = bytes(raw)
        if use_mac or wrong_mac:
            at = _mac_offset(raw, encoded)
            covered = raw[:at] + raw[at + MAC_BYTES :]
            tag = retail_mac(self.mac_key, covered) if self.mac_key else b"\0" * MAC_BYTES
            if wrong_mac:
                tag = bytes(b ^ 0xFF for b in tag)
            raw = raw[:at] + tag + raw[at + MAC_BYTES :]
        return raw

    def decode(self, payload: bytes) -> dict[str, Any]:
        return self.decode_with_mac(payload)[0]

    def decode_with_mac(self, payload: bytes) -> tuple[dict[str, Any], bool]:
        """Fields, and whether the MAC is right (True when no key is set)."""
        try:
            fields, encoded = codec.decode(payload, self.spec)
        except codec.DecodeError as exc:
            raise SimWireError(scrub_text(str(exc))) from None
        except (KeyError, ValueError, IndexError) as exc:  # pyiso8583 on a bitmap naming an unknown field
            raise SimWireError(f"undecodable message: {type(exc).__name__}") from None
        if self.mac_key is None:
            return fields, True
        if "64" not in fields:
            return fields, False
        at = _mac_offset(payload, encoded)
        tag = retail_mac(self.mac_key, payload[:at] + payload[at + MAC_BYTES :])
        return fields, tag == payload[at : at + MAC_BYTES]

    def frame(self, payload: bytes, tpdu: bytes | None = None) -> bytes:
        return frame(payload, self.framing, tpdu if self.tpdu else None)
