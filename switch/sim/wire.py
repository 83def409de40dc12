"""The simulators' binding of one profile: spec, encode/decode, framing, MAC over field 64.

Why the simulators have their own small binding rather than switch.server.wire: the layer rules let sim
import only codec and config, and a simulator must be able to *break* the wire on purpose (garbage
frames, a wrong MAC), which the server's helper rightly cannot.

MAC: switch.codec.mac (retail MAC; which bytes are covered is defined there only). Framing: a small
stand-in for the 2-byte / 4-digit length prefix and TPDU until switch.codec.framing lands.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from switch import codec
from switch.codec import mac
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
MacFn = Callable[[bytes], bytes]


def retail_mac_fn(key16: bytes) -> MacFn:
    """ANSI X9.19 retail MAC under a double-length key (switch.codec.mac)."""
    if len(key16) != 16:
        raise SimWireError("MAC key must be 16 bytes (double-length DES)")
    return functools.partial(mac.retail_mac, key16)


class SimWire:
    """Encode/decode/MAC/frame for one profile. The MAC goes in field 64, or 128 when the message has
    fields above 64, always as the last field; which bytes it covers is switch.codec.mac's rule."""

    def __init__(self, profile: str, framing: str, mac_key_hex: str = "", tpdu: bool = False) -> None:
        self.profile = profile
        self.spec = spec_for(profile)
        self.framing = framing
        self.tpdu = tpdu
        self.mac_fn: MacFn | None = None
        self.set_mac_key(bytes.fromhex(mac_key_hex) if mac_key_hex else None)
        frame(b"", framing)  # validates the framing kind now, not at the first message

    def set_mac_key(self, key16: bytes | None) -> None:
        """Start (or stop, with None) MACing: e.g. after a sign-on delivered a new MAC working key."""
        self.mac_fn = retail_mac_fn(key16) if key16 is not None else None

    def reader(self, max_frame_bytes: int) -> FrameReader:
        return FrameReader(self.framing, max_frame_bytes, self.tpdu)

    def encode(self, fields: dict[str, Any], *, wrong_mac: bool = False) -> bytes:
        """Encode; MACed when a key is set. ``wrong_mac`` sends a MAC that cannot verify."""
        fields = dict(fields)
        fields.pop("64", None)
        fields.pop("128", None)
        mac_field = None
        if self.mac_fn is not None or wrong_mac:
            mac_field = "128" if any(k.isdigit() and int(k) > 64 for k in fields) else "64"
            fields[mac_field] = "00" * MAC_BYTES if self.spec[mac_field]["data_enc"] == "b" else "0" * 16
        try:
            raw, _ = codec.encode(fields, self.spec)
        except codec.EncodeError as exc:
            raise SimWireError(scrub_text(str(exc))) from None
        raw = bytes(raw)
        if mac_field is not None:
            mac_fn = self.mac_fn or retail_mac_fn(b"\x01" * 16)
            raw = mac.sign_message(raw, self.spec, mac_fn)
            if wrong_mac:
                raw = raw[:-1] + bytes([raw[-1] ^ 0x01])
        return raw

    def decode(self, payload: bytes) -> dict[str, Any]:
        return self.decode_with_mac(payload)[0]

    def decode_with_mac(self, payload: bytes) -> tuple[dict[str, Any], bool]:
        """Fields, and whether the MAC is right (True when no key is set)."""
        try:
            fields, _ = codec.decode(payload, self.spec)
        except codec.DecodeError as exc:
            raise SimWireError(scrub_text(str(exc))) from None
        except (KeyError, ValueError, IndexError) as exc:  # pyiso8583 on a bitmap naming an unknown field
            raise SimWireError(f"undecodable message: {type(exc).__name__}") from None
        if self.mac_fn is None:
            return fields, True
        try:
            return fields, mac.verify_message(payload, self.spec, self.mac_fn)
        except mac.MacError:
            return fields, False  # no MAC field, or not the last field

    def frame(self, payload: bytes, tpdu: bytes | None = None) -> bytes:
        return frame(payload, self.framing, tpdu if self.tpdu else None)
