"""The simulators' binding of one profile: spec, encode/decode, framing, MAC over field 64.

Why the simulators have their own small binding rather than switch.server.wire: the layer rules let sim
import only codec and config, and a simulator must be able to *break* the wire on purpose (garbage
frames, a wrong MAC), which the server's helper rightly cannot.

MAC: switch.codec.mac (retail MAC; which bytes are covered is defined there only). Framing:
switch.codec.framing (FrameReader yields Frame(payload, tpdu)).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from switch import codec
from switch.codec import framing, mac
from switch.codec.framing import Frame, FrameReader, FramingError, swap_tpdu
from switch.codec.masking import scrub_text

MAC_BYTES = 8


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
        FrameReader(framing, tpdu)  # validates the framing kind now, not at the first message

    def set_mac_key(self, key16: bytes | None) -> None:
        """Start (or stop, with None) MACing: e.g. after a sign-on delivered a new MAC working key."""
        self.mac_fn = retail_mac_fn(key16) if key16 is not None else None

    def reader(self, max_frame_bytes: int) -> FrameReader:
        return FrameReader(self.framing, self.tpdu, max_frame_bytes, tpdu_id=None)

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
        try:
            return framing.frame(payload, self.framing, tpdu if self.tpdu else None)
        except FramingError as exc:
            raise SimWireError(str(exc)) from None


__all__ = ["Frame", "FrameReader", "FramingError", "SimWire", "SimWireError", "retail_mac_fn", "swap_tpdu"]
