"""One wire profile bound once: spec + encode/decode + MAC sign/verify + framing.

Why one object, used by the server's listeners, its acquirer links AND the simulators: a terminal, the
switch and an acquirer host must agree byte for byte on how a profile is encoded, where its MAC sits and
how it is framed. Two bindings of the same thing drift; one cannot. Binding the spec, its MAC layout and
the framing kind once also keeps the hot path to a few plain calls (no per-message spec or layout
lookups, no pyiso8583 "encoded" dict: `switch.codec.decode_fields`/`encode_bytes`).

What the simulators need to break the wire on purpose is one keyword here (`encode(..., wrong_mac=True)`
sends a MAC that cannot verify); garbage frames are just `frame(any_bytes)`.

MAC keys are not part of a Wire: a listener MACs with each terminal's working key, a link with its
acquirer key, a terminal simulator with the key of its last sign-on. Callers pass a `MacFn`
(`make_mac_fn(key16)` makes one: ANSI X9.19 retail MAC, key schedule prepared once). Which bytes are MACed is
switch.codec.mac's rule; framing is switch.codec.framing's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from switch import codec
from switch.codec import mac as macmod
from switch.codec.framing import Frame, FrameReader, FrameTooLongError, FramingError, frame, swap_tpdu
from switch.codec.masking import scrub_text
from switch.codec.specs import SPECS

MacFn = Callable[[bytes], bytes]

#: Field numbers above 64: a message carrying any of them has a secondary bitmap and its MAC in 128.
_HIGH_FIELDS: Final = frozenset(str(n) for n in range(65, 129))
#: Key of the MAC a `wrong_mac` message is signed with when the caller has no key (any fixed key will do:
#: the receiver's check fails either way).
_DUMMY_KEY: Final = b"\x01" * 16


class WireError(ValueError):
    """A message that cannot be encoded or decoded. The text never carries card data, and neither does
    anything else on it (no chain: the codec error it replaces is not its __context__); `mti` is set when
    the MTI of an undecodable message was still readable (so a format error can be answered 30)."""

    def __init__(self, reason: str, mti: str | None = None) -> None:
        super().__init__(reason)
        self.mti = mti


def make_mac_fn(key16: bytes) -> MacFn:
    """The MAC function of a double-length working key (ANSI X9.19 retail MAC). Its repr hides the key."""
    if len(key16) != 16:
        raise ValueError("MAC key must be 16 bytes (double-length DES)")
    return macmod.RetailMacKey(bytes(key16))


def mac_fn_from_hex(key_hex: str) -> MacFn | None:
    """`make_mac_fn` of a configured key in hex (32 digits); None for an empty setting (no MACs)."""
    if not key_hex:
        return None
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        raise ValueError("MAC key must be 32 hex digits") from None
    return make_mac_fn(key)


class Wire:
    """Encode/decode/sign/verify/frame for one profile and framing kind (optionally with a TPDU)."""

    __slots__ = ("_layout", "_mac_hex", "_mti_binary", "framing", "profile", "spec", "tpdu")

    def __init__(self, profile: str, framing_kind: str, tpdu: bool = False) -> None:
        try:
            self.spec: Mapping[str, Any] = SPECS[profile]
        except KeyError:
            raise WireError(f"unknown profile {profile!r}; known: {sorted(SPECS)}") from None
        self.profile = profile
        self.framing = framing_kind
        self.tpdu = tpdu
        FrameReader(framing_kind, tpdu)  # an unknown framing kind fails here, not at the first message
        self._layout = macmod.mac_layout(self.spec)
        self._mac_hex = {f: self.spec[f].get("data_enc") != "b" for f in ("64", "128") if f in self.spec}
        self._mti_binary = self.spec["t"].get("data_enc") == "b"

    def __repr__(self) -> str:
        return f"Wire({self.profile}, {self.framing}{'+tpdu' if self.tpdu else ''})"

    # --- framing ------------------------------------------------------------------------------------
    def reader(self, max_frame_bytes: int) -> FrameReader:
        """A FrameReader for one stream. Any TPDU id is accepted: terminals in the field do not all
        send 0x60."""
        return FrameReader(self.framing, self.tpdu, max_frame_bytes, tpdu_id=None)

    def frame(self, payload: bytes, tpdu: bytes | None = None) -> bytes:
        """Length header (+ `tpdu` as given, when this profile carries one) + payload."""
        try:
            return frame(payload, self.framing, tpdu if self.tpdu else None)
        except FramingError as exc:
            raise WireError(str(exc)) from None

    def frame_reply(self, payload: bytes, request_tpdu: bytes | None) -> bytes:
        """Frame an answer: the request's TPDU with source and destination exchanged."""
        if self.tpdu and request_tpdu is not None:
            return self.frame(payload, swap_tpdu(request_tpdu))
        return self.frame(payload)

    # --- messages -----------------------------------------------------------------------------------
    def decode(self, payload: bytes) -> dict[str, Any]:
        """The fields of a payload; WireError (with the MTI when readable) on a format error."""
        try:
            return codec.decode_fields(payload, self.spec)
        except codec.DecodeError as exc:
            reason = str(exc)
        except (KeyError, ValueError, IndexError, TypeError) as exc:  # pyiso8583 outside its own errors
            reason = f"undecodable message: {type(exc).__name__}"
        raise WireError(scrub_text(reason), self.peek_mti(payload))

    def peek_mti(self, payload: bytes) -> str | None:
        """The MTI of an undecodable message when its first bytes still read as one."""
        try:
            raw = bytes(payload[:2]).hex() if self._mti_binary else bytes(payload[:4]).decode("ascii")
        except (UnicodeDecodeError, ValueError):
            return None
        return raw if len(raw) == 4 and raw.isdigit() else None

    def encode(
        self, fields: Mapping[str, Any], mac: MacFn | None = None, *, wrong_mac: bool = False
    ) -> bytes:
        """Encode a copy of `fields` (the caller's dict is untouched). With `mac`, the MAC field is added
        as the last field (64, or 128 when the message has fields above 64) and signed. `wrong_mac`
        (simulators only) sends a MAC that cannot verify."""
        out = dict(fields)
        out.pop("64", None)
        out.pop("128", None)
        if mac is not None or wrong_mac:
            mac_field = "128" if _HIGH_FIELDS.intersection(out) else "64"
            is_hex = self._mac_hex.get(mac_field)
            if is_hex is None:
                raise WireError(f"profile {self.profile} has no MAC field {mac_field}")
            out[mac_field] = "0" * 16 if is_hex else "00" * 8
        reason = ""
        try:
            raw = codec.encode_bytes(out, self.spec)
        except codec.EncodeError as exc:
            reason = str(exc)
        except (KeyError, ValueError, TypeError) as exc:
            reason = f"cannot encode: {type(exc).__name__}: {exc}"
        if reason:  # raised outside the except block: no __context__ holding the fields
            raise WireError(scrub_text(reason))
        if mac is None and not wrong_mac:
            return bytes(raw)
        signed = macmod.sign_message(raw, self._layout, mac or macmod.RetailMacKey(_DUMMY_KEY))
        if wrong_mac:
            signed = signed[:-1] + bytes([signed[-1] ^ 0x01])
        return signed

    def verify(self, payload: bytes, mac: MacFn) -> bool:
        """True when the message's MAC (its last field) verifies; False when wrong, absent or misplaced."""
        try:
            return macmod.verify_message(payload, self._layout, mac)
        except macmod.MacError:
            return False

    def decode_verified(self, payload: bytes, mac: MacFn | None) -> tuple[dict[str, Any], bool]:
        """Fields, and whether the MAC verifies (True when `mac` is None: nothing to check)."""
        fields = self.decode(payload)
        return fields, (mac is None or self.verify(payload, mac))


def has_mac(fields: Mapping[str, Any]) -> bool:
    """Whether a decoded message carries a MAC field."""
    return "64" in fields or "128" in fields


__all__ = [
    "Frame",
    "FrameReader",
    "FrameTooLongError",
    "FramingError",
    "MacFn",
    "Wire",
    "WireError",
    "has_mac",
    "mac_fn_from_hex",
    "make_mac_fn",
    "swap_tpdu",
]
